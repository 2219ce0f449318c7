"""Running commands locally and over real SSH (the sandbox's sshd on vps1)."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import DbopsError, Unreachable
from core.fleet import Fleet, Server
from core.remote import (
    CommandResult,
    LocalRunner,
    Runner,
    RunnerPool,
    SSHRunner,
    quote_argv,
    runner_for,
    trust_host,
)

# Arguments a shell would love to interpret; each must arrive as the very same string.
NASTY = [
    "plain",
    "two  spaces",
    "it's",
    'say "hi"',
    "$(touch {canary})",
    "`touch {canary}`",
    "a; touch {canary}",
    "x && touch {canary} || y",
    "$HOME",
    "*",
    "~",
    "back\\slash",
    "new\nline",
    "",
    "-n",
    "ünïcødé",
]
EXPECTED_USER = "postgres" if os.geteuid() == 0 else getpass.getuser()
RUNUSER = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
MB = 1024 * 1024
BIG_BOTH = f"yes 0123456789abcdef | head -c {MB}; yes err | head -c {MB} >&2; exit 3"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, kind: str, subject: str, payload: dict[str, Any]) -> None:
        self.calls.append((kind, subject, payload))


@pytest.fixture
def record() -> Recorder:
    return Recorder()


@pytest.fixture
def vps1(sandbox_fleet: Fleet) -> Server:
    return sandbox_fleet.server("vps1")


@pytest.fixture
def ssh(vps1: Server, sandbox_fleet: Fleet, record: Recorder) -> Iterator[SSHRunner]:
    runner = SSHRunner(vps1, sandbox_fleet.known_hosts_path, record=record)
    yield runner
    runner.close()


@pytest.fixture
def local(record: Recorder) -> LocalRunner:
    return LocalRunner("vps1", run_as="postgres", record=record)


@pytest.fixture(params=["local", "ssh"])
def runner(request: pytest.FixtureRequest) -> Runner:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


# --- both transports ---------------------------------------------------------------------------


def test_stdout_stderr_and_exit_code_come_back(runner: Runner) -> None:
    result = runner.run(["sh", "-c", "echo out; echo err >&2; exit 3"])

    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok
    assert result.server == "vps1"
    assert result.argv == ["sh", "-c", "echo out; echo err >&2; exit 3"]


def test_commands_run_as_the_configured_user(runner: Runner) -> None:
    assert runner.run(["id", "-un"]).check().stdout.strip() == EXPECTED_USER


def test_arguments_arrive_literally(runner: Runner) -> None:
    # In /tmp itself, so that an injected `touch` running as postgres would succeed and show.
    canary = Path(tempfile.gettempdir()) / f"dbops-canary-{uuid.uuid4().hex}"
    args = [a.format(canary=canary) for a in NASTY]

    result = runner.run(["printf", "%s\\0", *args]).check()

    assert result.stdout.split("\0")[:-1] == args
    assert not canary.exists()


def test_a_megabyte_on_both_streams_does_not_deadlock(runner: Runner) -> None:
    result = runner.run(["sh", "-c", BIG_BOTH], timeout=20)

    assert result.exit_code == 3
    assert len(result.stdout) == MB and len(result.stderr) == MB
    assert result.stdout.startswith("0123456789abcdef\n")


def test_stdin_larger_than_the_ssh_window_is_echoed_back(runner: Runner) -> None:
    data = os.urandom(3 * MB).hex().encode()[: 3 * MB]

    result = runner.run(["sha256sum"], stdin=data).check()

    expected = subprocess.run(["sha256sum"], input=data, capture_output=True, check=True)
    assert result.stdout == expected.stdout.decode()


def test_a_command_that_hangs_is_stopped_at_its_timeout(runner: Runner, record: Recorder) -> None:
    # The timeout covers the whole exchange, an SSH connect included: open it first, so that
    # it is the command that runs out of time.
    runner.run(["true"])
    started = time.monotonic()
    with pytest.raises(Unreachable, match=r"sleep on vps1 did not finish within 0.5s"):
        runner.run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 3
    assert record.calls[-1][0] == "remote.error"
    # The runner is still good for the next command.
    assert runner.run(["true"]).ok


def test_every_command_is_recorded_once_without_its_stdin(runner: Runner, record: Recorder) -> None:
    runner.run(["cat"], stdin=b"s3cret-password")
    runner.run(["false"])

    assert [(kind, subject) for kind, subject, _ in record.calls] == [
        ("remote.command", "vps1"),
        ("remote.command", "vps1"),
    ]
    first, second = (payload for _, _, payload in record.calls)
    assert set(first) == {"server", "command", "exit_code", "duration_ms", "transport"}
    assert first["command"] == quote_argv([*RUNUSER, "cat"])
    assert isinstance(first["duration_ms"], int)
    assert second["exit_code"] == 1
    assert first["transport"] == ("ssh" if isinstance(runner, SSHRunner) else "local")
    assert "s3cret" not in repr(record.calls)


def test_shell_strings_are_refused(runner: Runner) -> None:
    with pytest.raises(TypeError, match="argument lists"):
        runner.run("rm -rf /tmp/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        runner.run([])


# --- CommandResult -----------------------------------------------------------------------------


def test_check_names_server_program_exit_code_and_last_stderr_line() -> None:
    result = CommandResult(
        server="vps2",
        argv=["/usr/lib/postgresql/15/bin/pg_ctl", "start"],
        exit_code=1,
        stdout="",
        stderr="waiting for server to start....\npg_ctl: could not start server\n",
        duration_s=0.2,
    )
    with pytest.raises(DbopsError) as caught:
        result.check()
    assert str(caught.value) == "pg_ctl failed on vps2 (exit 1): pg_ctl: could not start server"


def test_check_truncates_a_long_stderr_line() -> None:
    result = CommandResult("vps1", ["x"], 2, "", "e" * 5000, 0.0)
    with pytest.raises(DbopsError) as caught:
        result.check()
    assert len(str(caught.value)) < 260


def test_check_does_not_repeat_a_password_from_stderr() -> None:
    stderr = 'psql: error: "host=db1 password=hunter2" and postgresql://app:hunter2@db1/x failed'
    with pytest.raises(DbopsError) as caught:
        CommandResult("vps1", ["psql"], 2, "", stderr, 0.0).check()
    assert "hunter2" not in str(caught.value)
    assert "password=***" in str(caught.value) and "app:***@db1" in str(caught.value)


def test_check_passes_a_successful_result_through() -> None:
    result = CommandResult("vps1", ["true"], 0, "", "", 0.0)
    assert result.check() is result and result.ok


# --- local only --------------------------------------------------------------------------------


def test_local_timeout_kills_the_whole_process_group(local: LocalRunner) -> None:
    started = time.monotonic()
    with pytest.raises(Unreachable):
        # The background sleep keeps the pipes open; only killing the group frees them.
        local.run(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.3)
    assert time.monotonic() - started < 3


def test_local_missing_program_is_exit_127(local: LocalRunner) -> None:
    result = LocalRunner("vps1").run(["/nonexistent/dbops-no-such-program"])
    assert result.exit_code == 127 and "not found" in result.stderr


# --- SSH connections ---------------------------------------------------------------------------


def test_one_connection_is_reused_and_reopened_when_dropped(ssh: SSHRunner) -> None:
    ssh.run(["true"]).check()
    first = ssh.connect()
    ssh.run(["true"]).check()
    assert ssh.connect() is first

    first.close()
    assert ssh.run(["echo", "again"]).check().stdout == "again\n"
    assert ssh.connect() is not first and ssh.connect().is_active()


def test_threads_share_one_runner(ssh: SSHRunner) -> None:
    results: list[CommandResult] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        result = ssh.run(["sh", "-c", f"sleep 0.1; echo {n}"])
        with lock:
            results.append(result)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(int(r.stdout) for r in results) == list(range(12))
    assert all(r.ok for r in results)


def _host_key_fingerprint(sandbox: dict[str, Any], server: str) -> str:
    spec = next(s for s in sandbox["servers"] if s["name"] == server)
    pub = Path(spec["sshd_dir"]) / "ssh_host_ed25519_key.pub"
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
    return out.stdout.split()[1]


def test_unknown_host_key_is_refused_with_the_trust_command(
    vps1: Server, tmp_path: Path, record: Recorder, sandbox: dict[str, Any]
) -> None:
    runner = SSHRunner(vps1, tmp_path / "known_hosts", record=record)

    with pytest.raises(Unreachable) as caught:
        runner.run(["true"])

    message = caught.value.message  # the remedy must not hide in the hint
    assert "not in the known_hosts file" in message
    assert "dbops fleet trust vps1" in message
    assert _host_key_fingerprint(sandbox, "vps1") in message
    assert record.calls[-1][0] == "remote.error"
    assert record.calls[-1][2]["server"] == "vps1"


def test_trust_host_records_the_key_and_then_commands_run(
    vps1: Server, tmp_path: Path, sandbox: dict[str, Any]
) -> None:
    known_hosts = tmp_path / "ssh" / "known_hosts"

    fingerprint = trust_host(vps1, known_hosts)

    assert fingerprint == _host_key_fingerprint(sandbox, "vps1")
    assert known_hosts.read_text().startswith(f"[127.0.0.1]:{vps1.ssh_port} ssh-ed25519 ")
    runner = SSHRunner(vps1, known_hosts)
    try:
        assert runner.run(["echo", "trusted"]).check().stdout == "trusted\n"
    finally:
        runner.close()


def _other_key(tmp_path: Path, name: str = "impostor") -> str:
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


def test_a_changed_host_key_is_refused_until_trusted_again(
    vps1: Server, tmp_path: Path, sandbox: dict[str, Any]
) -> None:
    known_hosts = tmp_path / "known_hosts"
    other = f"[127.0.0.1]:{vps1.ssh_port} {_other_key(tmp_path)}"
    unrelated = "[10.0.0.9]:22 " + _other_key(tmp_path, "unrelated")
    known_hosts.write_text(f"{unrelated}\n{other}\n")
    runner = SSHRunner(vps1, known_hosts)

    with pytest.raises(Unreachable) as caught:
        runner.run(["true"])
    assert "host key of vps1 has CHANGED" in caught.value.message
    assert "dbops fleet trust vps1" in caught.value.message

    trust_host(vps1, known_hosts)
    lines = known_hosts.read_text().splitlines()
    assert other not in lines and unrelated in lines and len(lines) == 2
    try:
        assert runner.run(["true"]).ok
    finally:
        runner.close()


def test_wrong_client_key_is_a_refused_login(
    vps1: Server, sandbox_fleet: Fleet, tmp_path: Path
) -> None:
    _other_key(tmp_path)
    stranger = vps1.model_copy(update={"ssh_key": str(tmp_path / "impostor")})
    runner = SSHRunner(stranger, sandbox_fleet.known_hosts_path)
    with pytest.raises(Unreachable, match=r"SSH login to vps1 as \w+ was refused"):
        runner.run(["true"])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (no SSH banner)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


def test_a_server_that_sends_no_banner_fails_within_the_connect_timeout(
    vps1: Server, sandbox_fleet: Fleet, silent_port: int, record: Recorder
) -> None:
    mute = vps1.model_copy(update={"ssh_port": silent_port})
    runner = SSHRunner(mute, sandbox_fleet.known_hosts_path, record=record, connect_timeout=1)

    started = time.monotonic()
    with pytest.raises(Unreachable, match="sent no SSH banner within 1s"):
        runner.run(["true"])

    assert time.monotonic() - started < 2.5
    kind, subject, payload = record.calls[-1]
    assert (kind, subject, payload["transport"]) == ("remote.error", "vps1", "ssh")


def test_a_closed_port_is_unreachable(vps1: Server, sandbox_fleet: Fleet) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = SSHRunner(vps1.model_copy(update={"ssh_port": port}), sandbox_fleet.known_hosts_path)
    with pytest.raises(Unreachable, match="refused the SSH connection"):
        runner.run(["true"])


# --- choosing a runner -------------------------------------------------------------------------


def test_runner_for_follows_the_transport(sandbox_fleet: Fleet, tmp_path: Path) -> None:
    vps1 = sandbox_fleet.server("vps1")
    ssh_runner = runner_for(vps1, sandbox_fleet)
    assert isinstance(ssh_runner, SSHRunner)
    assert ssh_runner.known_hosts == sandbox_fleet.known_hosts_path

    local = vps1.model_copy(update={"transport": "local"})
    local_runner = runner_for(local, sandbox_fleet)
    assert isinstance(local_runner, LocalRunner) and local_runner.run_as == "postgres"

    relative = vps1.model_copy(update={"ssh_key": "keys/id_ed25519"})
    fleet = sandbox_fleet.model_copy(update={"base_dir": tmp_path})
    resolved = runner_for(relative, fleet)
    assert isinstance(resolved, SSHRunner)
    assert resolved.config.ssh_key == str(tmp_path / "keys" / "id_ed25519")


def test_runner_pool_keeps_one_runner_per_server(sandbox_fleet: Fleet) -> None:
    with RunnerPool(sandbox_fleet) as pool:
        assert pool.get("vps2") is pool.get("vps2")
        assert pool.get("vps2").run(["hostname"]).ok
        with pytest.raises(DbopsError, match="no server 'vps9'"):
            pool.get("vps9")


def test_close_does_not_wait_for_a_connect_to_a_hung_server(
    vps1: Server, sandbox_fleet: Fleet, record: Recorder
) -> None:
    """Shutting down (a reload, the end of a scheduler run) must not hang for the connect timeout
    because one server accepted the TCP connection and then said nothing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        mute = vps1.model_copy(update={"ssh_port": listener.getsockname()[1]})
        runner = SSHRunner(mute, sandbox_fleet.known_hosts_path, record=record, connect_timeout=3)
        outcome: list[BaseException] = []

        def use() -> None:
            try:
                runner.run(["true"])
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=use)
        thread.start()
        listener.settimeout(5)
        conn, _ = listener.accept()  # the connect is under way, waiting for a banner
        with conn:
            started = time.monotonic()
            runner.close()
            assert time.monotonic() - started < 1.0  # not the 3 s the connect may still take
            thread.join(10)
            # The connect under way is cut short too, not left to its 3 s.
            assert time.monotonic() - started < 1.5
            assert len(outcome) == 1 and isinstance(outcome[0], Unreachable)
            assert "closed as it opened" in outcome[0].message
            conn.settimeout(5)
            said = b""
            while chunk := conn.recv(4096):  # our client's banner if sent yet, then the end
                said += chunk
            assert said == b"" or said.startswith(b"SSH-2.0-")  # nothing left open behind us
