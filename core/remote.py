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
import heapq
import itertools
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
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from core.errors import DbopsError, Unreachable
from core.fleet import Fleet, Server
from storage.spool import record

if TYPE_CHECKING:  # imported where an SSH server is contacted: local fleets never load it
    import paramiko

Recorder = Callable[[str, str, dict[str, Any]], None]

DEFAULT_TIMEOUT = 30.0
# sshd allows 10 sessions per connection by default (MaxSessions): stay under it.
SESSIONS_PER_SERVER = 8
# An SSH packet this often keeps NAT and firewalls from dropping an idle connection.
KEEPALIVE_S = 15
# The share of a call's time left that a reused connection gets to answer a session open (the
# liveness probe); the rest is for one fresh connection when it does not. Never less than the
# floor (or all the time left): a fresh connection would not fit in less anyway, and a busy
# but healthy server must not be taken for a dead one.
_PROBE_SHARE = 0.5
_PROBE_FLOOR_S = 1.0
# How long closing a channel may take before the connection is closed under it: to a peer that
# stopped reading, paramiko can wait for ever to send the close. A healthy peer, even while
# re-keying a busy connection, takes milliseconds.
_CLOSE_GRACE = 1.0
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
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Calls inside ``run`` right now: after a hung server's deadline this is back to 0."""
        return self._in_flight

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
        with self._in_flight_lock:
            self._in_flight += 1
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
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
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


def _reject_unknown() -> paramiko.MissingHostKeyPolicy:
    """RejectPolicy that keeps the offered key, so the error can show its fingerprint. Made
    here rather than at import time: importing this module must not import paramiko."""
    import paramiko

    class RejectUnknown(paramiko.RejectPolicy):  # type: ignore[misc]  # paramiko is untyped
        def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
            raise _UnknownHostKey(key)

    return RejectUnknown()


class _Alarm:
    """One deadline on the watchdog: its action runs once, unless cancelled first."""

    def __init__(self, action: Callable[[], None]) -> None:
        self._action = action
        self._lock = threading.Lock()
        self.cancelled = False
        self.fired = False

    def fire(self) -> None:
        with self._lock:
            if self.cancelled or self.fired:
                return
            self.fired = True
            with contextlib.suppress(Exception):
                self._action()

    def cancel(self) -> bool:
        """Disarm; False when the action has already run. Once this returns it never will."""
        with self._lock:
            self.cancelled = True
            return not self.fired


class _Watchdog:
    """Runs actions at their deadlines, on one daemon thread for the whole process.

    paramiko waits without a limit in places: the reply to an ``exec`` request, a send to a peer
    that stopped reading. Closing the connection from outside is what ends those waits, and that
    is all the actions here do; they must not block, since they share this one thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._compact_at = 256

    def arm(self, at: float, action: Callable[[], None]) -> _Alarm:
        """``action()`` at monotonic time ``at``, unless the returned alarm is cancelled."""
        alarm = _Alarm(action)
        with self._cond:
            if len(self._heap) > self._compact_at:  # most alarms are cancelled long before due
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._compact_at = 2 * len(self._heap) + 256
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (at, next(self._seq), alarm))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dbops-ssh-watchdog", daemon=True
                )
                self._thread.start()
            elif earliest is None or at < earliest:
                self._cond.notify()
        return alarm

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        alarm = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(wait)
            alarm.fire()


_WATCHDOG = _Watchdog()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _secs(seconds: float) -> str:
    return f"{round(seconds, 1):g}s"


class _Link:
    """One SSH connection and the number of calls using it.

    A connection found dead or silent is retired: no new call gets it, and it is closed when the
    last call on it leaves (each has its own deadline), so replacing a suspect connection never
    cuts a command that is still running well on it. A peer that let a call's deadline pass
    without answering its ``exec`` is dead for every call: that link is closed at once.
    """

    def __init__(self, client: paramiko.SSHClient, transport: paramiko.Transport) -> None:
        self.client = client
        self.transport = transport
        self.users = 0
        self.retired = False


class SSHRunner(_RecordingRunner):
    """Runs commands over one reused SSH connection per server (paramiko).

    Host keys are checked against the fleet's known_hosts file only, never trusted on first use:
    `dbops fleet trust SERVER` records a key deliberately. Safe to call from several threads.

    A call's timeout is a deadline for all of it: a free session slot, the connection (opened or
    reused), the session, the ``exec`` request and the output. A server that accepts connections
    and then says nothing costs each call its own timeout, never more, and no thread stays
    blocked on it: every wait is bounded, and the watchdog closes the connection under a wait
    paramiko does not bound. A reused connection must answer a session open within part of the
    time left (the liveness probe) or it is replaced once by a fresh one.
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
        self._connecting = threading.Lock()  # held by the one call opening a connection
        self._state = threading.Lock()  # guards the links; never held across the network
        self._link: _Link | None = None  # the connection new calls get
        self._links: set[_Link] = set()  # every open one, retired ones still in use included
        self._generation = 0  # bumped by close(): a connect begun before it closes what it opens
        self._opening: socket.socket | None = None  # the socket of a connect under way
        # Waited for within the call's deadline only: calls stuck on a hung server must not
        # queue the next ones (a health sweep, a status) behind them for ever.
        self._sessions = threading.BoundedSemaphore(SESSIONS_PER_SERVER)

    def _prefix(self) -> list[str]:
        if self.config.run_as and self.config.ssh_user == "root":
            return _runuser(self.config.run_as)
        return []

    # -- connections ------------------------------------------------------------------------

    def connect(self, timeout: float | None = None) -> paramiko.Transport:
        """The live transport, opening (or re-opening after a drop) the connection if needed,
        within ``timeout`` seconds (default: the connect timeout)."""
        limit = self.connect_timeout if timeout is None else timeout
        link, _opened = self._checkout(time.monotonic() + limit)
        self._release(link)
        return link.transport

    def _current(self) -> _Link | None:
        """The connection to reuse, if it is still up; a dropped one is let go. Under _state."""
        link = self._link
        if link is not None and not link.transport.is_active():
            self._retire_locked(link)
            link = None
        return link

    def _checkout(self, deadline: float) -> tuple[_Link, bool]:
        """A connection for one call (counted as in use), and whether this call just opened it."""
        with self._state:
            link = self._current()
            if link is not None:
                link.users += 1
                return link, False
        waited = time.monotonic()
        if not self._connecting.acquire(timeout=_left(deadline)):
            raise Unreachable(
                f"{self.server} did not answer SSH within {_secs(time.monotonic() - waited)} "
                "(another call's connect to it is still waiting)."
            )
        try:
            with self._state:  # opened by another call while this one waited
                link = self._current()
                if link is not None:
                    link.users += 1
                    return link, False
                generation = self._generation
            client, transport = self._open(deadline, generation)
            with self._state:
                if generation == self._generation:
                    link = _Link(client, transport)
                    link.users += 1
                    self._link = link
                    self._links.add(link)
                    return link, True
            # close() was called meanwhile and could not wait for us: close for it.
            client.close()
            raise Unreachable(f"the connection to {self.server} was closed as it opened.")
        finally:
            self._connecting.release()

    def _release(self, link: _Link) -> None:
        with self._state:
            link.users -= 1
            if link.retired and link.users <= 0:
                self._close_locked(link)

    def _retire(self, link: _Link) -> None:
        with self._state:
            self._retire_locked(link)

    def _retire_locked(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
        link.retired = True
        if link.users <= 0:
            self._close_locked(link)

    def _kill(self, link: _Link) -> None:
        """Close a connection whose peer stopped answering, under whoever still waits on it."""
        with self._state:
            self._retire_locked(link)
            self._close_locked(link)

    def _close_locked(self, link: _Link) -> None:
        # Quick: paramiko's close marks the transport dead and closes the socket; its waits
        # notice within 0.1 s.
        self._links.discard(link)
        link.client.close()

    def _open(
        self, deadline: float, generation: int
    ) -> tuple[paramiko.SSHClient, paramiko.Transport]:
        import paramiko

        cfg = self.config
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_reject_unknown())
        key = os.path.expanduser(cfg.ssh_key) if cfg.ssh_key else None
        started = time.monotonic()
        limit = min(self.connect_timeout, _left(deadline))
        if limit <= 0:
            raise Unreachable(f"no time was left to open an SSH connection to {self.server}.")
        try:
            sock = socket.create_connection((cfg.host, cfg.ssh_port), timeout=limit)
        except OSError as exc:
            raise self._connect_error(exc, limit) from None
        with self._state:
            closed = generation != self._generation
            self._opening = None if closed else sock
        if closed:
            sock.close()
            raise Unreachable(f"the connection to {self.server} was closed as it opened.")
        # paramiko bounds each step of the handshake on its own (banner, key exchange, login);
        # the watchdog bounds them together, TCP connect included, by shutting the socket.
        alarm = _WATCHDOG.arm(min(started + limit + 0.2, deadline), lambda: _shut(sock))
        left = max(0.05, started + limit - time.monotonic())
        try:
            client.connect(
                cfg.host,
                port=cfg.ssh_port,
                username=cfg.ssh_user,
                key_filename=key,
                sock=sock,
                # paramiko stops waiting for the handshake at `timeout` without saying why; a
                # little slack lets the banner timeout fire first and name the real problem.
                timeout=left + 1,
                banner_timeout=left,
                auth_timeout=left,
                channel_timeout=left,
                # With a key configured, use only it: an agent's keys could log in as someone else.
                allow_agent=key is None,
                look_for_keys=key is None,
            )
            transport = client.get_transport()
            if transport is None or not transport.is_active():
                raise EOFError("the connection closed right after opening")
        except Exception as exc:
            fired = not alarm.cancel()
            client.close()
            sock.close()
            with self._state:
                self._opening = None
                closed = generation != self._generation
            if closed:
                raise Unreachable(
                    f"the connection to {self.server} was closed as it opened."
                ) from None
            if fired:
                raise Unreachable(
                    f"{self.server} accepted the SSH connection on port {cfg.ssh_port} but did "
                    f"not complete the handshake within {_secs(limit)}."
                ) from None
            raise self._connect_error(exc, limit) from None
        with self._state:
            self._opening = None
        if not alarm.cancel():  # the handshake finished just as the time ran out
            client.close()
            raise Unreachable(f"the SSH handshake with {self.server} took over {_secs(limit)}.")
        # An SSH packet every so often keeps NAT and firewalls from dropping an idle connection
        # and lets TCP notice a peer that is gone; a silent one is caught by the session probe.
        transport.set_keepalive(KEEPALIVE_S)
        return client, transport

    def _connect_error(self, exc: Exception, limit: float) -> DbopsError:
        import paramiko

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
            return Unreachable(f"{name} did not answer on SSH port {port} within {_secs(limit)}.")
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError | ConnectionError):
            return Unreachable(f"{name} refused the SSH connection on port {port}.")
        if isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower():
            return Unreachable(
                f"{name} accepted the connection on port {port} but sent no SSH banner within "
                f"{_secs(limit)}."
            )
        if isinstance(exc, OSError | paramiko.SSHException | EOFError):
            return Unreachable(f"cannot open an SSH connection to {name}: {_short(str(exc), 120)}")
        return Unreachable(f"cannot open an SSH connection to {name} ({type(exc).__name__}).")

    # -- one command --------------------------------------------------------------------------

    def _execute(
        self, command: str, argv: list[str], timeout: float, stdin: bytes | None
    ) -> tuple[int, bytes, bytes]:
        deadline = time.monotonic() + timeout
        if not self._sessions.acquire(timeout=_left(deadline)):
            raise Unreachable(
                f"all {SESSIONS_PER_SERVER} SSH sessions to {self.server} stayed busy for "
                f"{timeout:g}s (calls waiting on a server that does not answer)."
            )
        try:
            chan, link = self._open_session(deadline)
            writer: threading.Thread | None = None
            # The backstop: whatever paramiko may still be waiting on past the deadline (a send
            # to a peer that stopped reading), the connection is closed under it.
            backstop = _WATCHDOG.arm(deadline + _CLOSE_GRACE, lambda: self._kill(link))
            try:
                # Reads and writes on the channel end at the deadline too (the stdin feeder's).
                chan.settimeout(max(_left(deadline), 0.01))
                self._exec(chan, link, command, deadline, timeout)
                writer = self._feed(chan, stdin)
                out, err, code = self._collect(chan, deadline)
                if code == -1 and not link.transport.is_active():
                    raise Unreachable(
                        f"the SSH connection to {self.server} was lost before the command finished."
                    )
            finally:
                self._close_channel(chan, link)
                if writer is not None:
                    writer.join(timeout=_CLOSE_GRACE)
                backstop.cancel()
                self._release(link)
        finally:
            self._sessions.release()
        return code, out, err

    def _open_session(self, deadline: float) -> tuple[paramiko.Channel, _Link]:
        link, opened = self._checkout(deadline)
        if not opened:
            # The liveness probe: a reused connection must answer a session open within part of
            # the time left, the rest being for one fresh connection if it does not. A transport
            # looks active after its peer went silent (a stopped sshd, a NAT that forgot us).
            left = _left(deadline)
            probe = min(self.connect_timeout, max(left * _PROBE_SHARE, min(left, _PROBE_FLOOR_S)))
            chan, _error = self._try_session(link, probe)
            if chan is not None:
                return chan, link
            self._retire(link)
            self._release(link)
            link, opened = self._checkout(deadline)
        limit = _left(deadline)
        chan, error = self._try_session(link, limit)
        if chan is None:
            self._retire(link)
            self._release(link)
            raise Unreachable(
                f"{self.server} did not open an SSH session within {_secs(limit)}: {error}"
            )
        return chan, link

    @staticmethod
    def _try_session(link: _Link, timeout: float) -> tuple[paramiko.Channel | None, str]:
        import paramiko

        if timeout <= 0:
            return None, "no time left"
        try:
            return link.transport.open_session(timeout=timeout), ""
        except (paramiko.SSHException, OSError, EOFError) as exc:
            return None, _short(str(exc) or type(exc).__name__, 120)

    def _exec(
        self, chan: paramiko.Channel, link: _Link, command: str, deadline: float, timeout: float
    ) -> None:
        import paramiko

        # paramiko waits for the reply to an exec request without a limit: at the deadline the
        # watchdog closes the connection, which ends that wait (and the peer has had the whole
        # deadline to answer, so it is not a slow one being cut short).
        alarm = _WATCHDOG.arm(deadline, lambda: self._kill(link))
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if not alarm.cancel():
                raise Unreachable(
                    f"{self.server} opened an SSH session but did not answer the command within "
                    f"{timeout:g}s; the connection was closed."
                ) from None
            raise Unreachable(
                f"{self.server} refused to run the command over SSH: {_short(str(exc), 120)}"
            ) from None
        if not alarm.cancel():
            raise Unreachable(
                f"{self.server} answered the command only at the {timeout:g}s deadline; "
                "the connection was closed."
            )

    def _close_channel(self, chan: paramiko.Channel, link: _Link) -> None:
        import paramiko

        # Closing sends a message; to a peer that stopped reading, paramiko may wait for ever to
        # send it. Past a short grace, the whole connection is closed under it.
        alarm = _WATCHDOG.arm(time.monotonic() + _CLOSE_GRACE, lambda: self._kill(link))
        try:
            with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                chan.close()
        finally:
            alarm.cancel()

    @staticmethod
    def _feed(chan: paramiko.Channel, stdin: bytes | None) -> threading.Thread | None:
        import paramiko

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
    def _collect(chan: paramiko.Channel, deadline: float) -> tuple[bytes, bytes, int]:
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
        if not chan.status_event.wait(_left(deadline)):
            raise _TimedOut
        return bytes(out), bytes(err), chan.recv_exit_status()

    @property
    def connections(self) -> int:
        """Open SSH connections: the current one plus retired ones still finishing calls."""
        with self._state:
            return len(self._links)

    def close(self) -> None:
        """Close every connection, without waiting on one being opened (a hung server can hold
        a connect for the whole connect timeout): that connect closes what it opens instead."""
        with self._state:
            self._generation += 1
            if self._opening is not None:
                _shut(self._opening)
            for link in list(self._links):
                self._retire_locked(link)
                self._close_locked(link)


def _shut(sock: socket.socket) -> None:
    """End every wait on ``sock`` now: a close alone does not wake a thread blocked on it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def fetch_host_key(host: str, port: int = 22, timeout: float = 5.0) -> paramiko.PKey:
    """The host key a server offers, read from the SSH handshake without logging in."""
    import paramiko

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
    import paramiko

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
    import paramiko

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

    def in_flight(self) -> dict[str, int]:
        """Calls under way per server (the runners made so far)."""
        with self._lock:
            runners = dict(self._runners)
        return {name: int(getattr(runner, "in_flight", 0)) for name, runner in runners.items()}

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
        # After the command ran: its record is never the reason it is reported as failed.
        record(self.events, kind, subject, payload, actor="dbops")
