"""Running commands on fleet servers: one interface, a local and an SSH implementation.

Commands are always argument lists. What goes over the wire is ``quote_argv(argv)``: every
argument shell-quoted, so a customer name or a path can never become shell syntax on the server.

Every command run is recorded once through the optional ``record(kind, subject, payload)``
callable (the event log): ``remote.command`` with its exit code, or ``remote.error`` when the
server could not be reached or the command did not finish in time. Standard input is never
recorded, since it may carry a dump or a password.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import paramiko

from core.errors import DbopsError, Unreachable
from core.fleet import Fleet, Server

Recorder = Callable[[str, str, dict[str, Any]], None]

DEFAULT_TIMEOUT = 30.0
_READ_CHUNK = 65536
_MESSAGE_MAX = 200


def quote_argv(argv: Sequence[str]) -> str:
    """The command line sent to a shell: each argument quoted so it arrives literally."""
    if isinstance(argv, str | bytes):
        raise TypeError("commands are argument lists, not shell strings")
    if not argv:
        raise ValueError("a command needs at least one argument")
    return " ".join(shlex.quote(a) for a in argv)


# A password that a failing command echoed back (a DSN in an error line) must not reach Slack.
_SECRETS = re.compile(r"(password\s*=\s*)\S+|(://[^:/@\s]+:)[^@\s]+(@)", re.IGNORECASE)


def _redact(text: str) -> str:
    return _SECRETS.sub(lambda m: f"{m[1]}***" if m[1] else f"{m[2]}***{m[3]}", text)


def _short(text: str, limit: int = _MESSAGE_MAX) -> str:
    text = " ".join(_redact(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class CommandResult:
    server: str
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def command(self) -> str:
        return quote_argv(self.argv)

    def check(self) -> CommandResult:
        """Return self when the command succeeded, else raise a DbopsError fit to show a user.

        The message names the server, the program and the exit code, plus the last line of
        stderr (truncated): enough to act on, without dumping output that may hold secrets.
        """
        if self.ok:
            return self
        name = os.path.basename(self.argv[0]) if self.argv else "command"
        detail = _last_line(self.stderr) or _last_line(self.stdout)
        message = f"{name} failed on {self.server} (exit {self.exit_code})"
        raise DbopsError(f"{message}: {_short(detail)}" if detail else f"{message}.")


@runtime_checkable
class Runner(Protocol):
    server: str

    def run(
        self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, stdin: bytes | None = None
    ) -> CommandResult: ...

    def close(self) -> None: ...


class _TimedOut(Exception):
    """A command outlived its timeout; the runner has already stopped waiting for it."""


def _runuser(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


class _RecordingRunner:
    """What both runners share: the argv check, timing and the one record per command."""

    transport_name = ""

    def __init__(self, server: str, record: Recorder | None, command_timeout: float) -> None:
        self.server = server
        self._record = record
        self.command_timeout = command_timeout

    def _prefix(self) -> list[str]:
        return []

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        if self._record is not None:
            self._record(kind, self.server, {"server": self.server, **payload})

    def run(
        self, argv: Sequence[str], *, timeout: float | None = None, stdin: bytes | None = None
    ) -> CommandResult:
        quote_argv(argv)  # rejects shell strings and empty commands before anything runs
        args = list(argv)
        sent = quote_argv([*self._prefix(), *args])
        limit = self.command_timeout if timeout is None else timeout
        started = time.monotonic()
        try:
            try:
                code, out, err = self._execute(sent, [*self._prefix(), *args], limit, stdin)
            except _TimedOut:
                raise Unreachable(
                    f"{os.path.basename(args[0])} on {self.server} did not finish within "
                    f"{limit:g}s and was stopped."
                ) from None
        except DbopsError as exc:
            self._emit(
                "remote.error",
                {
                    "command": sent,
                    "error": exc.message,
                    "duration_ms": int((time.monotonic() - started) * 1000),
                    "transport": self.transport_name,
                },
            )
            raise
        duration = time.monotonic() - started
        self._emit(
            "remote.command",
            {
                "command": sent,
                "exit_code": code,
                "duration_ms": int(duration * 1000),
                "transport": self.transport_name,
            },
        )
        return CommandResult(
            server=self.server,
            argv=args,
            exit_code=code,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            duration_s=duration,
        )

    def _execute(
        self, command: str, argv: list[str], timeout: float, stdin: bytes | None
    ) -> tuple[int, bytes, bytes]:
        raise NotImplementedError

    def close(self) -> None:
        return None


class LocalRunner(_RecordingRunner):
    """Runs commands on this machine (the sandbox fleet, or a bot that lives on its server)."""

    transport_name = "local"

    def __init__(
        self,
        server_name: str,
        run_as: str | None = None,
        record: Recorder | None = None,
        command_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(server_name, record, command_timeout)
        self.run_as = run_as

    def _prefix(self) -> list[str]:
        # Only root can switch users without a password; anyone else runs as themselves.
        return _runuser(self.run_as) if self.run_as and os.geteuid() == 0 else []

    def _execute(
        self, command: str, argv: list[str], timeout: float, stdin: bytes | None
    ) -> tuple[int, bytes, bytes]:
        try:
            # A session of its own so a timeout can kill the whole process group: a grandchild
            # holding the pipes open would otherwise keep communicate() waiting forever.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            return 127, b"", f"{argv[0]}: command not found".encode()
        except PermissionError:
            return 126, b"", f"{argv[0]}: permission denied".encode()
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # Something that left our process group may still hold the pipes: do not wait on it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=1)
            raise _TimedOut from None
        return proc.returncode, out, err


def key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _UnknownHostKey(Exception):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("host key not in known_hosts")
        self.key = key


class _RejectUnknown(paramiko.RejectPolicy):  # type: ignore[misc]  # paramiko is untyped
    """RejectPolicy that keeps the offered key, so the error can show its fingerprint."""

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(key)


class SSHRunner(_RecordingRunner):
    """Runs commands over one reused SSH connection per server (paramiko).

    Host keys are checked against the fleet's known_hosts file only, never trusted on first use:
    `dbops fleet trust SERVER` records a key deliberately. Safe to call from several threads.
    """

    transport_name = "ssh"

    def __init__(
        self,
        server: Server,
        known_hosts: Path,
        record: Recorder | None = None,
        connect_timeout: float = 5.0,
        command_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(server.name, record, command_timeout)
        self.config = server
        self.known_hosts = Path(known_hosts)
        self.connect_timeout = connect_timeout
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._close_pending = False  # close() asked while a connect held the lock
        # sshd allows 10 sessions per connection by default (MaxSessions); stay under it when
        # many threads share this runner.
        self._sessions = threading.BoundedSemaphore(8)

    def _prefix(self) -> list[str]:
        if self.config.run_as and self.config.ssh_user == "root":
            return _runuser(self.config.run_as)
        return []

    def connect(self) -> paramiko.Transport:
        """The live transport, opening (or re-opening after a drop) the connection if needed."""
        with self._lock:
            try:
                transport = self._connect_locked()
            finally:
                # close() was called meanwhile and could not wait for us: close for it.
                closing, self._close_pending = self._close_pending, False
                if closing:
                    self._drop()
            if closing:
                raise Unreachable(f"the connection to {self.server} was closed as it opened.")
            return transport

    def _connect_locked(self) -> paramiko.Transport:
        client = self._client
        transport = client.get_transport() if client is not None else None
        if transport is not None and transport.is_active():
            return transport
        if client is not None:
            client.close()
            self._client = None
        self._client = self._open()
        transport = self._client.get_transport()
        if transport is None:  # pragma: no cover - connect() returned without a transport
            raise Unreachable(f"SSH connection to {self.server} closed right after opening.")
        transport.set_keepalive(15)
        return transport

    def _open(self) -> paramiko.SSHClient:
        cfg = self.config
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_RejectUnknown())
        key = os.path.expanduser(cfg.ssh_key) if cfg.ssh_key else None
        limit = self.connect_timeout
        try:
            sock = socket.create_connection((cfg.host, cfg.ssh_port), timeout=limit)
        except OSError as exc:
            raise self._connect_error(exc) from None
        try:
            client.connect(
                cfg.host,
                port=cfg.ssh_port,
                username=cfg.ssh_user,
                key_filename=key,
                sock=sock,
                # paramiko stops waiting for the handshake at `timeout` without saying why; a
                # little slack lets the banner timeout fire first and name the real problem.
                timeout=limit + 1,
                banner_timeout=limit,
                auth_timeout=limit,
                channel_timeout=limit,
                # With a key configured, use only it: an agent's keys could log in as someone else.
                allow_agent=key is None,
                look_for_keys=key is None,
            )
        except Exception as exc:
            client.close()
            sock.close()
            raise self._connect_error(exc) from None
        return client

    def _connect_error(self, exc: Exception) -> DbopsError:
        name, port = self.server, self.config.ssh_port
        if isinstance(exc, _UnknownHostKey):
            # The remedy is in the message itself: callers often show only `message`.
            return Unreachable(
                f"the SSH host key of {name} is not in the known_hosts file (it offers "
                f"{exc.key.get_name()} {key_fingerprint(exc.key)}); if that is the server's key, "
                f"run `dbops fleet trust {name}` to record it."
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return Unreachable(
                f"the SSH host key of {name} has CHANGED (now {key_fingerprint(exc.key)}): a "
                "rebuilt server, or someone intercepting the connection. Check with the provider; "
                f"if the server was rebuilt, run `dbops fleet trust {name}` to record the new key."
            )
        if isinstance(exc, paramiko.AuthenticationException):
            return Unreachable(
                f"SSH login to {name} as {self.config.ssh_user} was refused; check ssh_user and "
                "ssh_key in the fleet file."
            )
        if isinstance(exc, TimeoutError | socket.timeout):
            return Unreachable(
                f"{name} did not answer on SSH port {port} within {self.connect_timeout:g}s."
            )
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError | ConnectionError):
            return Unreachable(f"{name} refused the SSH connection on port {port}.")
        if isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower():
            return Unreachable(
                f"{name} accepted the connection on port {port} but sent no SSH banner within "
                f"{self.connect_timeout:g}s."
            )
        if isinstance(exc, OSError | paramiko.SSHException | EOFError):
            return Unreachable(f"cannot open an SSH connection to {name}: {_short(str(exc), 120)}")
        return Unreachable(f"cannot open an SSH connection to {name} ({type(exc).__name__}).")

    def _execute(
        self, command: str, argv: list[str], timeout: float, stdin: bytes | None
    ) -> tuple[int, bytes, bytes]:
        with self._sessions:
            chan = self._open_session()
            with contextlib.closing(chan):
                chan.exec_command(command)
                writer = self._feed(chan, stdin)
                out, err, code = self._collect(chan, timeout)
                if writer is not None:
                    writer.join(timeout=1)
        return code, out, err

    def _open_session(self) -> paramiko.Channel:
        transport = self.connect()
        try:
            return transport.open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError):
            # A transport can look active after the server went away (sshd restarted, NAT
            # timeout); one fresh connection tells a stale link from a down server.
            transport.close()
        try:
            return self.connect().open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Unreachable(
                f"{self.server} did not open an SSH session: {_short(str(exc), 120)}"
            ) from None

    @staticmethod
    def _feed(chan: paramiko.Channel, stdin: bytes | None) -> threading.Thread | None:
        if stdin is None:
            chan.shutdown_write()
            return None

        # Its own thread: a command that echoes input back would fill our receive window while we
        # were still sending, and both sides would wait on each other.
        def send() -> None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                chan.sendall(stdin)
                chan.shutdown_write()

        thread = threading.Thread(target=send, name=f"ssh-stdin-{chan.get_id()}", daemon=True)
        thread.start()
        return thread

    @staticmethod
    def _collect(chan: paramiko.Channel, timeout: float) -> tuple[bytes, bytes, int]:
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        # Drain both streams as they arrive until EOF, then wait for the exit status: reading one
        # stream to its end first deadlocks once the other fills the SSH window.
        while True:
            while chan.recv_ready():
                out += chan.recv(_READ_CHUNK)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(_READ_CHUNK)
            done = chan.eof_received or chan.closed
            if done and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOut
            select.select([chan], [], [], min(remaining, 0.5))
        remaining = deadline - time.monotonic()
        if not chan.status_event.wait(max(remaining, 0.0)):
            raise _TimedOut
        return bytes(out), bytes(err), chan.recv_exit_status()

    def close(self) -> None:
        """Close the connection without waiting on one being opened (a hung server can hold a
        connect for the whole connect timeout): that connect closes what it opens instead."""
        self._close_pending = True
        if self._lock.acquire(timeout=0.2):
            try:
                self._close_pending = False
                self._drop()
            finally:
                self._lock.release()

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def fetch_host_key(host: str, port: int = 22, timeout: float = 5.0) -> paramiko.PKey:
    """The host key a server offers, read from the SSH handshake without logging in."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise Unreachable(f"cannot reach SSH port {port}: {_short(str(exc), 120)}") from None
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise Unreachable(f"no SSH handshake on port {port}: {_short(str(exc), 120)}") from None
    finally:
        transport.close()


def _names_host(entry: paramiko.hostkeys.HostKeyEntry, name: str) -> bool:
    for pattern in entry.hostnames:
        if pattern == name:
            return True
        if pattern.startswith("|1|") and paramiko.HostKeys.hash_host(name, pattern) == pattern:
            return True
    return False


def trust_host(server: Server, known_hosts_path: Path, timeout: float = 5.0) -> str:
    """Record the key `server` offers now in known_hosts, replacing any old one for it.

    Returns the SHA256 fingerprint, for the operator to compare with the server's own
    (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the console).
    """
    key = fetch_host_key(server.host, server.ssh_port, timeout)
    name = known_hosts_name(server.host, server.ssh_port)
    path = Path(known_hosts_path).expanduser()
    kept: list[str] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = None
            if line.strip() and not line.lstrip().startswith("#"):
                with contextlib.suppress(Exception):
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            if entry is None or not _names_host(entry, name):
                kept.append(line)
    kept.append(f"{name} {key.get_name()} {key.get_base64()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return key_fingerprint(key)


def _resolved(server: Server, base_dir: Path) -> Server:
    if not server.ssh_key:
        return server
    key = Path(server.ssh_key).expanduser()
    if key.is_absolute():
        return server
    return server.model_copy(update={"ssh_key": str(base_dir / key)})


def runner_for(server: Server, fleet: Fleet, record: Recorder | None = None) -> Runner:
    """The runner for a server's configured transport."""
    if server.transport == "local":
        return LocalRunner(server.name, run_as=server.run_as, record=record)
    return SSHRunner(_resolved(server, fleet.base_dir), fleet.known_hosts_path, record=record)


class RunnerPool:
    """One runner per server, created on first use, so SSH connections are reused."""

    def __init__(self, fleet: Fleet, record: Recorder | None = None) -> None:
        self.fleet = fleet
        self._record = record
        self._runners: dict[str, Runner] = {}
        self._lock = threading.Lock()

    def get(self, server: str) -> Runner:
        with self._lock:
            if server not in self._runners:
                config = self.fleet.server(server)
                self._runners[server] = runner_for(config, self.fleet, self._record)
            return self._runners[server]

    def close(self) -> None:
        with self._lock:
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            runner.close()

    def __enter__(self) -> RunnerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FleetAccess:
    """For the operation desks (backups, provisioning): ``fleet`` (a Fleet, or a callable giving
    the current one) and, built on first use unless one is shared in, a RunnerPool whose every
    command is an event. Subclasses call ``_init_fleet_access`` and set ``events``."""

    events: Any  # storage.events.EventLog: append(kind, subject, payload, actor=)

    def _init_fleet_access(
        self, fleet: Fleet | Callable[[], Fleet], runners: RunnerPool | None
    ) -> None:
        self._fleet = fleet
        self._runners = runners
        self._runners_lock = threading.Lock()

    @property
    def fleet(self) -> Fleet:
        return self._fleet() if callable(self._fleet) else self._fleet

    @property
    def runners(self) -> RunnerPool:
        with self._runners_lock:
            if self._runners is None:
                self._runners = RunnerPool(self.fleet, record=self._record)
            return self._runners

    def _record(self, kind: str, subject: str, payload: dict[str, Any]) -> None:
        self.events.append(kind, subject, payload, actor="dbops")
