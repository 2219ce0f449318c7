"""Every PostgreSQL major from 13 to 18 in the sandbox: `dbops sandbox up --pg-version V`.

PG_VERSIONS (default "13 17", what `make test` fetches) picks the majors; `make test-matrix`
sets all six. Each major gets one sandbox for the whole session (one server, two customers,
pgBouncer in front), brought up side by side through the CLI; 13 to 15 are reached locally, 16
to 18 over SSH, so both transports meet an old and a new major. The binaries come from the
Makefile's cache (`make pg-bin PG=V`, a no-op once fetched); 15 is the machine's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from core import health, pgbins
from core import sandbox as sandbox_mod
from core.backups import Backups, admin_conninfo
from core.backups.client import client_for
from core.customers import Customer, upsert_customers
from core.errors import DbopsError
from core.fleet import APP_NAME, load_fleet, parse_fleet
from core.remote import RunnerPool
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests import test_health_oracle as oracle_mod

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = [int(v) for v in os.environ.get("PG_VERSIONS", "13 17").split()]
VERDICTS = {"ok", "warn", "crit", "unknown"}
# The sandbox's log_line_prefix is '%m [%p] %q%u@%d %a ': time, pid, user@database, application.
_LOG_LINE = re.compile(
    r"^\S+ \S+ \S+ \[\d+\] (?P<user>[^@ ]*)@(?P<db>\S*) (?P<app>\S*) ?"
    r"(?P<level>[A-Z]+):  (?P<msg>.*)"
)


def _dbops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], env=env, capture_output=True, text=True, timeout=300
    )


class Major:
    """One major's sandbox: its state, the CLI's environment, and how long it took to come up."""

    def __init__(self, version: int, directory: Path) -> None:
        self.version = version
        self.dir = directory
        self.env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{directory.parent / f'dbops-{version}.db'}",
            "DBOPS_FLEET": str(directory / "fleet.toml"),
        }
        self.ssh = version >= 16
        self.state: dict[str, Any] = {}
        self.up_seconds = 0.0


@pytest.fixture(scope="session")
def majors() -> Iterator[dict[int, Major]]:
    """Fetch (make pg-bin) and bring up one sandbox per major in PG_VERSIONS, all at once."""
    for version in VERSIONS:
        fetched = subprocess.run(
            ["make", "--no-print-directory", "pg-bin", f"PG={version}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert fetched.returncode == 0, (fetched.stdout[-2000:], fetched.stderr[-2000:])
    # Not tmp_path_factory: pytest makes its base 0700, which the postgres user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="dbops-pgv-"))
    base.chmod(0o755)
    found = {v: Major(v, base / f"pg{v}") for v in VERSIONS}
    started: dict[int, tuple[subprocess.Popen[str], float]] = {}
    try:
        for major in found.values():
            argv = [sys.executable, "-m", "bot", "sandbox", "up", "--dir", str(major.dir)]
            argv += ["--servers", "1", "--customers", "2", "--pg-version", str(major.version)]
            argv += ["--ssh"] if major.ssh else []
            process = subprocess.Popen(
                argv, env=major.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            started[major.version] = (process, time.monotonic())
        for version, (process, at) in started.items():
            out, err = process.communicate(timeout=600)
            found[version].up_seconds = time.monotonic() - at
            assert process.returncode == 0, (version, err[-3000:])
            found[version].state = json.loads(out)
        yield found
    finally:
        for major in found.values():
            if (major.dir / sandbox_mod.STATE_FILE).exists():
                sandbox_mod.down(major.dir, remove=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture(scope="session")
def statuses(majors: dict[int, Major]) -> dict[int, tuple[dict[str, Any], list[dict[str, str]]]]:
    """`dbops status acme --json` on each major, with every statement of the monitoring role
    logged meanwhile (ALTER ROLE ... SET log_statement, for new sessions only): the status and
    the server log's lines of that run."""
    out = {}
    runs = {}
    for version, major in majors.items():
        server = load_fleet(major.state["fleet"]).server("vps1")
        log = Path(server.log_path)
        monitor = conninfo_to_dict(server.dsn)["user"]
        with psycopg.connect(server.admin_dsn or "", autocommit=True) as admin:
            admin.execute(f"ALTER ROLE \"{monitor}\" SET log_statement = 'all'")
        argv = [sys.executable, "-m", "bot", "status", "acme", "--json"]
        process = subprocess.Popen(
            argv, env=major.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        runs[version] = (server, log, log.stat().st_size, monitor, process)
    for version, (server, log, offset, monitor, process) in runs.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        finally:
            with psycopg.connect(server.admin_dsn or "", autocommit=True) as admin:
                admin.execute(f'ALTER ROLE "{monitor}" RESET log_statement')
        assert process.returncode == 0, (version, stderr[-3000:])
        with log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").splitlines()
        parsed = [m.groupdict() for m in map(_LOG_LINE.match, lines) if m]
        out[version] = (json.loads(stdout), parsed)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_the_sandbox_runs_the_major_asked_for_behind_pgbouncer(
    majors: dict[int, Major], version: int
) -> None:
    major = majors[version]
    server = load_fleet(major.state["fleet"]).server("vps1")
    assert server.transport == ("ssh" if major.ssh else "local")
    assert server.pg_bin == str(pgbins.server_bin(version))  # fleet.toml records it
    assert pgbins.major_of(server.pg_bin) == version
    with psycopg.connect(server.admin_dsn or "", autocommit=True) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None and int(row[0]) // 10000 == version
    through = sandbox_mod.customer_conninfo(major.state, "acme", pgbouncer=True)
    with psycopg.connect(through, autocommit=True) as conn:
        assert conn.info.server_version // 10000 == version
        assert conn.info.port == server.pgbouncer_port
    # Its pg_dump is at least as new as the server (the first backups were taken with it).
    dump = subprocess.run(
        [f"{server.pg_bin}/pg_dump", "--version"], capture_output=True, text=True, check=True
    )
    assert int(re.findall(r"\d+", dump.stdout)[0]) >= version
    assert list(Path(server.backup_path).rglob("*")), "up took no first backup"


@pytest.mark.parametrize("version", VERSIONS)
def test_status_gives_every_check_a_verdict(
    statuses: dict[int, tuple[dict[str, Any], list[dict[str, str]]]], version: int
) -> None:
    status, _ = statuses[version]
    assert status["customer"] == "acme" and status["database"]["online"] is True
    checks = [c for part in ("server", "database") for c in status[part].get("checks", [])]
    assert len(checks) >= 10, status
    for check in checks:
        assert check["verdict"] in VERDICTS, check


@pytest.mark.parametrize("version", VERSIONS)
def test_health_sessions_carry_dbops_application_name(
    statuses: dict[int, tuple[dict[str, Any], list[dict[str, str]]]],
    majors: dict[int, Major],
    version: int,
) -> None:
    _, lines = statuses[version]
    server = load_fleet(majors[version].state["fleet"]).server("vps1")
    monitor = conninfo_to_dict(server.dsn)["user"]
    statements = [x for x in lines if x["user"] == monitor and x["msg"].startswith("statement:")]
    assert statements, "no statement of the health check was logged"
    names = {x["app"] for x in statements}
    # Every session of dbops says exactly dbops: the health checks' own and whatever connects
    # through the fleet's DSNs as they are (psql, pg_dump, pg_restore).
    assert APP_NAME == "dbops" and names == {"dbops"}, names
    assert conninfo_to_dict(server.dsn)["application_name"] == APP_NAME
    assert conninfo_to_dict(server.admin_dsn or "")["application_name"] == APP_NAME


# --- checks, check_postgres, backups and the log on every major -------------------------------
# The majors of PG_VERSIONS in their own sandboxes, and the machine's 15 in the session's
# sandbox (acme on vps1 there too) unless PG_VERSIONS has 15 itself.
CHECKED = sorted({*VERSIONS, 15})
ORACLE_ACTIONS = [
    ("connection", "postgres"), ("connection", "acme"), ("backends", "postgres"),
    ("txn_idle", "postgres"), ("locks", "postgres"), ("prepared_txns", "postgres"),
    ("last_vacuum", "acme"), ("replication_slots", "postgres"),
]  # fmt: skip
SLOT_LIMITS = ("100MB", "1GB")  # the fleet's defaults for replication_slots, given to both


class Target:
    """Where one major's checks, backups and log are: its server, the fleet with the oracle's
    thresholds, the server's own port, and where its log stood when these tests began."""

    def __init__(self, version: int, state: dict[str, Any]) -> None:
        fleet = load_fleet(state["fleet"])
        data = fleet.model_dump(exclude={"base_dir"})
        data["thresholds"] = {
            name: {"warn": pair[0], "crit": pair[1]}
            for name, pair in {**oracle_mod.THRESHOLDS, "replication_slots": SLOT_LIMITS}.items()
            if pair is not None
        }
        self.version = version
        self.state = state
        self.fleet = parse_fleet(data, base_dir=fleet.base_dir)
        self.server = self.fleet.server("vps1")
        self.port = int(next(s["port"] for s in state["servers"] if s["name"] == "vps1"))
        self.log = Path(self.server.log_path)
        self.log_from = self.log.stat().st_size if version not in VERSIONS else 0

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.server.admin_dsn or "", autocommit=True)


@pytest.fixture(scope="module")
def targets(majors: dict[int, Major], request: pytest.FixtureRequest) -> dict[int, Target]:
    found = {v: Target(v, m.state) for v, m in majors.items()}
    if 15 not in found:
        found[15] = Target(15, request.getfixturevalue("sandbox"))
    return found


def _ours(target: Target, action: str, dbname: str) -> health.Check:
    if action == "connection" and dbname != "postgres":
        probe = health.probe_database(target.server, dbname, health.Limits())
        return health.check_database_connection(probe)
    if action == "last_vacuum":
        probe = health.probe_database(target.server, dbname, health.Limits())
        db = health.fetch_cluster(target.server, health.Limits()).databases.get(dbname)
        vac = health.with_cluster_stats(probe.vacuum, db)
        limits = oracle_mod.THRESHOLDS["last_vacuum"] or ("", "")
        return health.check_last_vacuum(vac, *limits, error=probe.vacuum_error or probe.error)
    return next(c for c in health.check_cluster(target.server, target.fleet) if c.name == action)


def _eol_verdict(version: int, today: date) -> str:
    """What the version check must say, from the project's dates (the fleet's 182d/0d)."""
    eol = health.END_OF_LIFE[version]
    return "crit" if today > eol else "warn" if (eol - today).days < 182 else "ok"


@pytest.mark.parametrize("version", CHECKED)
def test_every_check_has_a_verdict_and_check_postgres_agrees(
    targets: dict[int, Target], version: int
) -> None:
    target = targets[version]
    checks = {c.name: c for c in health.check_cluster(target.server, target.fleet)}
    assert set(checks) == {"connection", *(s.name for s in health.CLUSTER_CHECKS)}
    assert {c.verdict for c in checks.values()} <= VERDICTS
    assert all(c.verdict != "unknown" for c in checks.values()), checks
    assert checks["replication_slots"].detail.startswith("no replication slots")
    assert "ago" in checks["checkpoint"].detail, checks["checkpoint"]
    source = "pg_stat_checkpointer" if version >= 17 else "pg_stat_bgwriter"
    assert source in checks["checkpoint"].detail or "no WAL" in checks["checkpoint"].detail
    version_check = checks["version"]
    assert version_check.verdict == _eol_verdict(version, datetime.now(UTC).date())
    assert f"PostgreSQL {version}." in version_check.detail, version_check
    for action, dbname in ORACLE_ACTIONS:
        mine = _ours(target, action, dbname)
        limits = SLOT_LIMITS if action == "replication_slots" else None
        theirs, said = oracle_mod.oracle(target.port, action, dbname, limits)
        assert mine.verdict == theirs, f"{version} {action} on {dbname}: {mine}; {said}"


def _wal_switches(conn: psycopg.Connection[Any], count: int) -> None:
    """``count`` WAL segments: a row, then a switch to the next segment, each time."""
    conn.execute("CREATE TABLE IF NOT EXISTS public.dbops_wal_filler (n int)")
    for n in range(count):
        conn.execute("INSERT INTO public.dbops_wal_filler VALUES (%s)", (n,))
        conn.execute("SELECT pg_switch_wal()")


@pytest.mark.parametrize("version", VERSIONS)
def test_replication_slot_retaining_wal_then_lost(targets: dict[int, Target], version: int) -> None:
    target = targets[version]
    slot = "dbops_test_slot"

    def check() -> health.Check:
        got = health.check_cluster(target.server, target.fleet)
        return next(c for c in got if c.name == "replication_slots")

    with target.admin() as conn:
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        try:
            _wal_switches(conn, 13)  # 13 segments of 16 MB: about 208 MB held by the slot
            got = check()
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            assert row is not None
            assert got.verdict == "warn", got
            assert isinstance(got.value, int) and abs(got.value - row[0]) <= 0.05 * row[0], got
            assert 190 * 2**20 <= got.value <= 240 * 2**20, got
            assert "inactive: dbops_test_slot" in got.detail
            assert "max_slot_wal_keep_size = -1" in got.detail
            theirs, said = oracle_mod.oracle(target.port, "replication_slots", limits=SLOT_LIMITS)
            assert theirs == "warn", said
            # A small max_slot_wal_keep_size: the next checkpoint removes the WAL it held.
            conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '32MB'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 60
            while True:
                _wal_switches(conn, 1)
                conn.execute("CHECKPOINT")
                got = check()
                if got.verdict == "crit" or time.monotonic() > deadline:
                    break
            assert got.verdict == "crit" and "lost" in got.detail, got
            assert got.value == 0  # a lost slot has no restart_lsn: it holds nothing now
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute("DROP TABLE IF EXISTS public.dbops_wal_filler")
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")


@pytest.mark.parametrize("version", CHECKED)
def test_backup_and_restore_test_with_a_client_as_new_as_the_server(
    targets: dict[int, Target], version: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    target = targets[version]
    if version not in VERSIONS:
        request.getfixturevalue("sandbox_backups_kept")  # the session's sandbox, as it was
    engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
    upgrade(engine)
    acme = next(c for c in target.state["customers"] if c["name"] == "acme")
    upsert_customers(engine, [Customer("acme", "vps1", acme["database"], acme["role"], "small")])
    events = EventLog(engine)
    with RunnerPool(target.fleet) as pool:
        backups = Backups(engine, events, target.fleet, pool)
        info = backups.take_backup("acme", "alice")
        status = json.loads((Path(info.path) / "status").read_text())
        client = re.fullmatch(r"pg_dump (\d+)\.\d+", status["client"])
        assert client is not None and int(client.group(1)) >= version, status
        assert status["server_version"].startswith(f"{version}."), status
        outcome = backups.verify("acme", info.stamp, actor="alice")
        assert outcome.verification.verdict == "ok", outcome.verification
        if version > 15:
            # The old failure: Debian's pg_dump 15 refuses the newer server outright, and a
            # fleet that pins it gets that said before anything is written.
            pinned = target.server.model_copy(update={"client_bin": "/usr/lib/postgresql/15/bin"})
            debian = subprocess.run(
                ["/usr/lib/postgresql/15/bin/pg_dump", "-d", admin_conninfo(pinned, "acme")],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert debian.returncode != 0 and "server version mismatch" in debian.stderr
            with pytest.raises(DbopsError, match="older than its PostgreSQL"):
                client_for(pool.get("vps1"), pinned, fresh=True)
    engine.dispose()


@pytest.mark.parametrize("version", CHECKED)
def test_no_error_of_dbops_in_the_server_log(targets: dict[int, Target], version: int) -> None:
    """Last in the file: everything above, and the sandbox's own life (up, its first backups),
    left no ERROR, FATAL or PANIC line of a session named dbops in the server's log."""
    target = targets[version]
    # A line of our own first, through the fleet's DSN as it is: the log names dbops sessions.
    with psycopg.connect(target.server.dsn, autocommit=True) as conn:
        conn.execute("DO $$BEGIN RAISE LOG 'dbops-pgv-marker'; END$$")
    deadline = time.monotonic() + 10
    while True:
        with target.log.open("rb") as f:
            f.seek(target.log_from)
            lines = f.read().decode("utf-8", "replace").splitlines()
        parsed = [m.groupdict() for m in map(_LOG_LINE.match, lines) if m]
        ours = [x for x in parsed if x["app"] == APP_NAME]
        if any(x["msg"] == "dbops-pgv-marker" for x in ours):
            break
        assert time.monotonic() < deadline, "the marker never reached the log as dbops's"
        time.sleep(0.1)
    errors = [x for x in ours if x["level"] in ("ERROR", "FATAL", "PANIC")]
    assert errors == [], errors[:5]
