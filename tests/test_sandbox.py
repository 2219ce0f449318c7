"""The sandbox fleet: what `up` builds, and every fault breaking and healing for real.

check_postgres (Debian's check-postgres) serves as an independent oracle where it has an action
for the state a fault creates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.errors import DbopsError
from core.fleet import Fleet, load_fleet
from core.remote import LocalRunner, runner_for
from core.sandbox import (
    break_fault,
    customer_conninfo,
    down,
    heal,
    load_state,
    up,
    write_backup,
)

Break = Callable[[str, str], dict[str, Any]]


def _server(state: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in state["servers"] if s["name"] == name)


def _monitor(state: dict[str, Any], server: str, dbname: str = "postgres") -> str:
    return (
        f"host=127.0.0.1 port={_server(state, server)['port']} user=dbops_monitor dbname={dbname}"
    )


def _query(conninfo: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, connect_timeout=3, autocommit=True) as conn:
        return conn.execute(query, params or None).fetchall()


def check_postgres(state: dict[str, Any], server: str, action: str, *args: str) -> tuple[int, str]:
    """Run one check_postgres action as the monitoring role; (Nagios exit code, output)."""
    assert shutil.which("check_postgres"), (
        "check_postgres is missing: apt-get install check-postgres"
    )
    out = subprocess.run(
        ["check_postgres", f"--action={action}", "-H", "127.0.0.1", "-u", "dbops_monitor",
         "-p", str(_server(state, server)["port"]), *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return out.returncode, out.stdout + out.stderr


OK, WARNING, CRITICAL = 0, 1, 2


# --- what up builds ----------------------------------------------------------------------------


def test_up_describes_servers_and_customers(sandbox: dict[str, Any]) -> None:
    assert [s["name"] for s in sandbox["servers"]] == ["vps1", "vps2", "vps3"]
    ports = [p for s in sandbox["servers"] for p in (s["port"], s["ssh_port"], s["pgbouncer_port"])]
    assert len(set(ports)) == 9
    customers = sandbox["customers"]
    assert len(customers) == 6 and customers[0]["name"] == "acme"
    assert [c["server"] for c in customers] == ["vps1", "vps2", "vps3"] * 2
    assert set(customers[0]) == {"name", "server", "database", "role", "plan", "email"}
    assert len({c["name"] for c in customers}) == 6
    assert json.loads((Path(sandbox["dir"]) / "sandbox.json").read_text()) == sandbox


def test_the_fleet_file_loads_and_points_at_the_sandbox(
    sandbox: dict[str, Any], sandbox_fleet: Fleet
) -> None:
    assert Path(sandbox["fleet"]).is_absolute()
    assert [s.transport for s in sandbox_fleet.servers] == ["ssh"] * 3
    vps2 = sandbox_fleet.server("vps2")
    assert vps2.ssh_port == _server(sandbox, "vps2")["ssh_port"]
    assert vps2.data_path.startswith(sandbox["dir"])
    assert sandbox_fleet.known_hosts_path.read_text().count("ssh-ed25519") == 3
    assert set(sandbox_fleet.plans) == {"small", "medium", "large"}
    assert sandbox_fleet.oncall.primary == "U_ALICE"
    assert sandbox_fleet.oncall.secondary == "U_CAROL"
    assert {c["plan"] for c in sandbox["customers"]} <= set(sandbox_fleet.plans)


def test_up_again_returns_the_running_sandbox(sandbox: dict[str, Any]) -> None:
    assert up(Path(sandbox["dir"]), servers=3, customers=6, ssh=True) == sandbox
    with pytest.raises(DbopsError, match="already holds a sandbox with 3 servers"):
        up(Path(sandbox["dir"]), servers=2, customers=6, ssh=True)


def test_customers_reach_only_their_own_database(sandbox: dict[str, Any]) -> None:
    acme_port = _server(sandbox, "vps1")["port"]
    acme = customer_conninfo(sandbox, "acme")
    assert _query(acme, "SELECT count(*) FROM accounts")[0][0] >= 100
    assert _query(acme, "SELECT count(*) FROM orders")[0][0] >= 300

    umbrella_on_acme = f"host=127.0.0.1 port={acme_port} user=umbrella dbname=acme"
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        _query(umbrella_on_acme, "SELECT 1")

    monitor = _monitor(sandbox, "vps1", "acme")
    assert _query(monitor, "SELECT pg_has_role('pg_monitor', 'member')") == [(True,)]
    assert _query(monitor, "SELECT current_setting('max_connections')") == [("30",)]


def test_the_log_is_parseable_and_clean(sandbox: dict[str, Any]) -> None:
    path = Path(_server(sandbox, "vps2")["log_path"])
    log = path.read_text()
    # A heal earlier in the session moves the log's lines to <log>.1 (as logrotate would).
    written = log or Path(f"{path}.1").read_text()
    first = written.splitlines()[0]
    assert " [" in first and "UTC" in first
    assert "ERROR" not in log and "FATAL" not in log


def test_every_customer_has_a_complete_first_backup(sandbox: dict[str, Any]) -> None:
    for customer in sandbox["customers"]:
        root = Path(_server(sandbox, customer["server"])["backup_path"]) / customer["name"]
        (backup,) = root.iterdir()
        db = customer["database"]
        assert sorted(p.name for p in backup.iterdir()) == sorted(
            [f"{db}.dump", f"{db}.dump.sha256", "rowcounts.json", "status"]
        )
        dump = (backup / f"{db}.dump").read_bytes()
        digest = hashlib.sha256(dump).hexdigest()
        assert (backup / f"{db}.dump.sha256").read_text() == f"{digest}  {db}.dump\n"
        status = json.loads((backup / "status").read_text())
        assert status["ok"] is True and status["sha256"] == digest
        assert status["size_bytes"] == len(dump) and dump.startswith(b"PGDMP")
        assert (status["customer"], status["database"]) == (customer["name"], db)
        assert status["started_at"] <= status["finished_at"]
        assert backup.name.endswith("Z") and len(backup.name) == len("20261122T080000Z")
        counts = json.loads((backup / "rowcounts.json").read_text())
        actual = _query(
            customer_conninfo(sandbox, customer["name"]),
            "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM orders)",
        )[0]
        assert (counts["public.accounts"], counts["public.orders"]) == actual


def test_write_backup_works_through_ssh(sandbox: dict[str, Any], sandbox_fleet: Fleet) -> None:
    vps3 = sandbox_fleet.server("vps3")
    runner = runner_for(vps3, sandbox_fleet)
    try:
        status = write_backup(runner, vps3, "initech")
    finally:
        runner.close()
    path = Path(status["path"])
    assert path.parent.name == "initech" and (path / "status").exists()
    listed = subprocess.run(
        [f"{vps3.pg_bin}/pg_restore", "--list", str(path / "initech.dump")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "TABLE DATA public accounts" in listed.stdout
    shutil.rmtree(path)  # the other tests expect one backup per customer


def _pgbouncer_console(state: dict[str, Any], server: str, command: str) -> list[tuple[Any, ...]]:
    port = _server(state, server)["pgbouncer_port"]
    return _query(f"host=127.0.0.1 port={port} user=dbops_monitor dbname=pgbouncer", command)


def test_each_server_has_a_pgbouncer_in_front_of_its_customers(
    sandbox: dict[str, Any], sandbox_fleet: Fleet
) -> None:
    for spec in sandbox["servers"]:
        server = sandbox_fleet.server(spec["name"])
        assert server.pgbouncer_port == spec["pgbouncer_port"]
        assert server.pgbouncer_ini == f"{spec['pgbouncer_dir']}/pgbouncer.ini"
        mine = sorted(c["database"] for c in sandbox["customers"] if c["server"] == spec["name"])
        listed = _pgbouncer_console(sandbox, spec["name"], "SHOW DATABASES")
        # name, host, port, database: as provisioning registers a database.
        assert sorted(row[:4] for row in listed if row[0] != "pgbouncer") == [
            (db, "127.0.0.1", spec["port"], db) for db in mine
        ]
    # Seeded customers get in as they do on the cluster (loopback is trusted), through it.
    acme = customer_conninfo(sandbox, "acme", pgbouncer=True)
    assert f"port={_server(sandbox, 'vps1')['pgbouncer_port']}" in acme
    assert _query(acme, "SELECT current_user, count(*) FROM accounts")[0][0] == "acme"
    # Everyone else needs a password (provisioning puts its SCRAM secret in the auth_file).
    stranger = acme.replace("user=acme", "user=dbops_monitor")
    with pytest.raises(psycopg.OperationalError, match="password"):
        _query(stranger, "SELECT 1")


@pytest.mark.parametrize("transport", ["ssh", "local"])
def test_pgbouncer_reload_command_works_without_sudo(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, transport: str
) -> None:
    server = sandbox_fleet.server("vps3").model_copy(update={"transport": transport})
    log = Path(_server(sandbox, "vps3")["pgbouncer_dir"]) / "pgbouncer.log"
    before = log.read_text().count("got SIGHUP")
    runner = runner_for(server, sandbox_fleet)
    try:
        runner.run(server.argv(server.pgbouncer_reload_command)).check()
    finally:
        runner.close()
    assert _wait(lambda: log.read_text().count("got SIGHUP") == before + 1)
    assert _pgbouncer_console(sandbox, "vps3", "SHOW VERSION")


def _wait(done: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _postmaster_start(state: dict[str, Any], server: str) -> Any:
    return _query(_monitor(state, server), "SELECT pg_postmaster_start_time()")[0][0]


@pytest.mark.parametrize("transport", ["ssh", "local"])
def test_restart_command_restarts_the_cluster(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, transport: str
) -> None:
    server = sandbox_fleet.server("vps2").model_copy(update={"transport": transport})
    before = _postmaster_start(sandbox, "vps2")
    runner = runner_for(server, sandbox_fleet)
    pg_ctl = [f"{server.pg_bin}/pg_ctl", "-D", server.data_path]
    try:
        runner.run(server.argv(server.restart_command), timeout=60).check()
        runner.run(server.argv(server.reload_command)).check()
        restarted = _postmaster_start(sandbox, "vps2")
        runner.run([*pg_ctl, "-m", "fast", "-w", "stop"]).check()
        assert runner.run([*pg_ctl, "status"]).exit_code == 3
        runner.run(server.argv(server.start_command), timeout=60).check()
    finally:
        runner.close()
    assert before < restarted < _postmaster_start(sandbox, "vps2")


# --- faults ------------------------------------------------------------------------------------


def test_db_down_refuses_connections_until_healed(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    acme = customer_conninfo(sandbox, "acme")
    sandbox_break("db-down", "acme")

    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        _query(acme, "SELECT 1")
    code, out = check_postgres(sandbox, "vps1", "connection", "-db", "acme")
    assert code == CRITICAL, out
    assert check_postgres(sandbox, "vps2", "connection", "-db", "globex")[0] == OK

    heal(Path(sandbox["dir"]))
    assert _query(acme, "SELECT 1") == [(1,)]
    assert check_postgres(sandbox, "vps1", "connection", "-db", "acme")[0] == OK


def test_server_down_stops_the_cluster_until_healed(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    sandbox_break("server-down", "vps3")

    with pytest.raises(psycopg.OperationalError, match="refused"):
        _query(_monitor(sandbox, "vps3"), "SELECT 1")
    # Other servers carry on.
    assert _query(_monitor(sandbox, "vps1"), "SELECT 1") == [(1,)]

    heal(Path(sandbox["dir"]))
    assert _query(_monitor(sandbox, "vps3"), "SELECT 1") == [(1,)]


def test_connections_fills_the_server_until_healed(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    count = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    fault = sandbox_break("connections", "vps2")

    used = _query(_monitor(sandbox, "vps2"), count)[0][0]
    assert used >= math.ceil(0.96 * 30)
    code, out = check_postgres(sandbox, "vps2", "backends", "-db", "postgres")
    assert code == CRITICAL, out

    heal(Path(sandbox["dir"]))
    assert _query(_monitor(sandbox, "vps2"), count)[0][0] <= 2
    assert not Path(f"/proc/{fault['pid']}").exists() or _is_zombie(fault["pid"])


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except OSError:
        return True


def test_idle_txn_leaves_a_session_idle_in_transaction(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    idle = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = 'umbrella' AND state = 'idle in transaction'"
    )
    sandbox_break("idle-txn", "umbrella")

    assert _query(_monitor(sandbox, "vps1"), idle) == [(1,)]
    zero = ("txn_idle", "-db", "postgres", "--warning=0", "--critical=0")
    code, out = check_postgres(sandbox, "vps1", *zero)
    assert code == CRITICAL and "longest idle in txn" in out, out

    heal(Path(sandbox["dir"]))
    assert _query(_monitor(sandbox, "vps1"), idle) == [(0,)]
    assert check_postgres(sandbox, "vps1", *zero)[0] == OK


def test_lock_makes_one_session_wait_on_another(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    waiting = (
        "SELECT l.mode, l.granted FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE d.datname = 'globex' AND l.relation = 'accounts'::regclass ORDER BY l.granted"
    )
    sandbox_break("lock", "globex")

    rows = _query(_monitor(sandbox, "vps2", "globex"), waiting)
    assert ("AccessShareLock", False) in rows and ("AccessExclusiveLock", True) in rows
    code, out = check_postgres(sandbox, "vps2", "locks", "-db", "postgres", "--critical=waiting=1")
    assert code == CRITICAL, out

    heal(Path(sandbox["dir"]))
    assert _query(_monitor(sandbox, "vps2", "globex"), waiting) == []
    assert _query(customer_conninfo(sandbox, "globex"), "SELECT count(*) > 0 FROM accounts")


def test_log_errors_writes_real_errors_and_heal_rotates_them(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    log = Path(_server(sandbox, "vps3")["log_path"])
    sandbox_break("log-errors", "vps3")

    lines = log.read_text().splitlines()
    assert any(" ERROR:  division by zero" in line for line in lines)
    assert any(" FATAL:  " in line for line in lines)

    heal(Path(sandbox["dir"]))
    assert "ERROR" not in log.read_text() and "FATAL" not in log.read_text()
    assert "division by zero" in log.with_name(log.name + ".1").read_text()
    # PostgreSQL goes on writing to the truncated file.
    with pytest.raises(psycopg.Error):
        _query(_monitor(sandbox, "vps3"), "SELECT 1/0")
    assert "division by zero" in log.read_text()
    os.truncate(log, 0)  # leave the log as clean as the other tests expect it


def test_backup_missing_hides_the_status_file_until_healed(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    root = Path(_server(sandbox, "vps2")["backup_path"]) / "hooli"
    sandbox_break("backup-missing", "hooli")

    assert list(root.glob("*/status")) == []
    assert list(root.glob("*/hooli.dump"))

    heal(Path(sandbox["dir"]))
    assert len(list(root.glob("*/status"))) == 1


def test_pgbouncer_down_refuses_connections_through_it_until_healed(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    through = customer_conninfo(sandbox, "globex", pgbouncer=True)
    sandbox_break("pgbouncer-down", "vps2")

    with pytest.raises(psycopg.OperationalError, match="refused"):
        _query(through, "SELECT 1")
    # Straight to the cluster still works: only pgBouncer is down.
    assert _query(customer_conninfo(sandbox, "globex"), "SELECT 1") == [(1,)]

    heal(Path(sandbox["dir"]))
    assert _query(through, "SELECT 1") == [(1,)]


def test_breaking_twice_and_healing_twice_are_harmless(
    sandbox: dict[str, Any], sandbox_break: Break
) -> None:
    first = sandbox_break("db-down", "initech")
    assert sandbox_break("db-down", "initech") == first
    assert load_state(Path(sandbox["dir"]))["faults"] == [first]

    assert heal(Path(sandbox["dir"])) == [first]
    assert heal(Path(sandbox["dir"])) == []
    assert load_state(Path(sandbox["dir"]))["faults"] == []


def test_several_faults_heal_together(sandbox: dict[str, Any], sandbox_break: Break) -> None:
    sandbox_break("db-down", "acme")
    sandbox_break("idle-txn", "stark")
    sandbox_break("server-down", "vps1")

    healed = heal(Path(sandbox["dir"]))

    assert [f["fault"] for f in healed] == ["server-down", "idle-txn", "db-down"]
    assert _query(customer_conninfo(sandbox, "acme"), "SELECT 1") == [(1,)]


@pytest.mark.parametrize(
    ("fault", "target", "message"),
    [
        ("melt", "acme", "unknown fault 'melt'.*db-down, server-down, connections"),
        ("db-down", "vps1", "no customer 'vps1'.*acme, globex, initech"),
        ("server-down", "acme", "no server 'acme'.*vps1, vps2, vps3"),
        ("db-down", "acme; DROP TABLE x", "not a valid customer name"),
        ("lock", "Acme", "not a valid customer name"),
    ],
)
def test_bad_fault_or_target_lists_the_valid_ones(
    sandbox: dict[str, Any], fault: str, target: str, message: str
) -> None:
    with pytest.raises(DbopsError, match=message):
        break_fault(Path(sandbox["dir"]), fault, target)
    assert load_state(Path(sandbox["dir"]))["faults"] == []


# --- a small local sandbox, from up to down ----------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="dbops-sbx-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_local_sandbox_goes_up_down_and_up_again(scratch: Path) -> None:
    state = up(scratch, servers=1, customers=2, ssh=False)
    try:
        fleet = load_fleet(state["fleet"])
        (vps1,) = fleet.servers
        assert vps1.transport == "local" and fleet.known_hosts is None
        assert [c["name"] for c in state["customers"]] == ["acme", "globex"]
        runner = runner_for(vps1, fleet)
        assert isinstance(runner, LocalRunner)
        assert runner.run(["ls", vps1.data_path]).ok

        break_fault(scratch, "db-down", "globex")
        break_fault(scratch, "pgbouncer-down", "vps1")
        down(scratch)  # heals first, then stops
        with pytest.raises(psycopg.OperationalError):
            _query(_monitor(state, "vps1"), "SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            _query(customer_conninfo(state, "globex", pgbouncer=True), "SELECT 1")

        again = up(scratch, servers=1, customers=2, ssh=False)
        assert again["servers"] == state["servers"] and again["faults"] == []
        assert _query(customer_conninfo(state, "globex"), "SELECT 1") == [(1,)]
        assert _query(customer_conninfo(state, "globex", pgbouncer=True), "SELECT 1") == [(1,)]
    finally:
        down(scratch, remove=True)
    assert not scratch.exists()


def test_up_refuses_a_directory_with_other_things_in_it(scratch: Path) -> None:
    (scratch / "notes.txt").write_text("mine")
    with pytest.raises(DbopsError, match="not empty"):
        up(scratch, servers=1, customers=1)
    assert (scratch / "notes.txt").read_text() == "mine"


def test_down_without_a_sandbox_says_so(scratch: Path) -> None:
    with pytest.raises(DbopsError, match="no sandbox in"):
        down(scratch)
