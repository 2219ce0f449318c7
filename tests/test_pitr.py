"""Point-in-time recovery (core.pitr) on the session sandbox, whose clusters archive their WAL
with pgBackRest, and the archiving verdict and the restore plan as plain functions.

The restore story: a customer writes rows, a time T is noted, the table is dropped and more
work is done in that customer's database and in another customer's on the same server; the
database restored to T (a scratch instance, dumped as the customer, brought in by the existing
safe swap) holds exactly what it held at T, the other customer's later work is untouched, and
the scratch instance is gone (no process, no directory, no socket, the port free).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from core import pitr
from core.backups import Backups
from core.customers import Customer, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.remote import LocalRunner, Runner, RunnerPool
from storage.events import EventLog
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    Seeded,
    query,
    restore_server_logs,
    seeded_customer,
)

SERVER = "vps1"
CAROL = "U0CAROL"
NOW = datetime(2026, 11, 22, 15, 0, tzinfo=UTC)


# --- the archiving verdict, as a plain function ------------------------------------------------


def row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "archive_mode": "on",
        "archived_count": 10,
        "last_archived_wal": "000000010000000000000010",
        "last_archived_time": (NOW - timedelta(seconds=30)).isoformat(),
        "failed_count": 0,
        "last_failed_wal": None,
        "last_failed_time": None,
        "ready_count": 0,
        "oldest_ready_time": None,
    }
    return {**base, **kw}


def test_archiving_ok_when_the_last_archive_is_recent() -> None:
    v = pitr.archiving_verdict(row(), NOW)
    assert (v.verdict, v.value) == ("ok", 30)


def test_archiving_warns_when_the_last_failure_is_after_the_last_success() -> None:
    failed = row(failed_count=3, last_failed_time=(NOW - timedelta(seconds=5)).isoformat())
    failed["last_failed_wal"] = "000000010000000000000011"
    v = pitr.archiving_verdict(failed, NOW)
    assert v.verdict == "warn" and "000000010000000000000011" in v.detail
    never = row(last_archived_time=None, archived_count=0, failed_count=1)
    never["last_failed_time"] = NOW.isoformat()
    assert pitr.archiving_verdict(never, NOW).verdict == "warn"


def test_an_old_failure_with_successes_since_is_not_an_alert() -> None:
    old = row(failed_count=4, last_failed_time=(NOW - timedelta(days=1, hours=2)).isoformat())
    assert pitr.archiving_verdict(old, NOW).verdict == "ok"


def test_crit_when_wal_waits_fifteen_minutes_with_nothing_archived() -> None:
    stuck = row(
        last_archived_time=(NOW - timedelta(minutes=40)).isoformat(),
        ready_count=3,
        oldest_ready_time=(NOW - timedelta(minutes=15)).isoformat(),
        failed_count=50,
        last_failed_time=(NOW - timedelta(seconds=10)).isoformat(),
    )
    assert pitr.archiving_verdict(stuck, NOW).verdict == "crit"
    # 14 minutes of waiting: still the failing archiver's warn, not crit.
    sooner = {**stuck, "oldest_ready_time": (NOW - timedelta(minutes=14)).isoformat()}
    assert pitr.archiving_verdict(sooner, NOW).verdict == "warn"
    # Something archived 5 minutes ago: the archiver moves, however long the backlog.
    moving = {**stuck, "last_archived_time": (NOW - timedelta(minutes=5)).isoformat()}
    moving["last_failed_time"] = None
    assert pitr.archiving_verdict(moving, NOW).verdict == "ok"


def test_an_idle_server_that_archived_nothing_for_hours_is_ok() -> None:
    idle = row(last_archived_time=(NOW - timedelta(hours=9)).isoformat())
    assert pitr.archiving_verdict(idle, NOW).verdict == "ok"


def test_archive_mode_off_warns() -> None:
    assert pitr.archiving_verdict(row(archive_mode="off"), NOW).verdict == "warn"


# --- the plan, as a plain function ---------------------------------------------------------


def info(*stops: datetime) -> pitr.StanzaInfo:
    backups = tuple(
        pitr.BaseBackup(
            label=f"b{i}",
            type="full" if i == 0 else "diff",
            start=stop - timedelta(minutes=1),
            stop=stop,
            size_bytes=40 << 20,
            repo_bytes=8 << 20,
            wal_start=f"0000000100000000000000{0x10 * (i + 1):02X}",
            wal_stop=f"0000000100000000000000{0x10 * (i + 1):02X}",
        )
        for i, stop in enumerate(stops)
    )
    return pitr.StanzaInfo("vps1", "ok", backups, "15-1", None, "000000010000000000000030")


SIZES = pitr._Sizes(database=100 << 20, system=20 << 20, segment=16 << 20, max_wal=64 << 20)


def decide(target: datetime, free: int = 50 << 30, *stops: datetime) -> pitr.RestorePlan:
    got = info(*(stops or (NOW - timedelta(hours=10), NOW - timedelta(hours=2))))
    window = pitr.window_of(got, NOW - timedelta(seconds=20), NOW)
    return pitr.decide(
        got,
        window,
        target,
        NOW,
        sizes=SIZES,
        free_bytes=free,
        total_bytes=100 << 30,
        server="vps1",
        database="acme",
        root="/var/lib/postgresql/15",
    )


def test_the_plan_takes_the_newest_backup_that_ended_before_the_target() -> None:
    plan = decide(NOW - timedelta(hours=3))
    assert plan.backup.label == "b0"
    assert plan.wal_segments == 0x30 - 0x10 + 1  # from b0's first segment to the newest
    assert plan.window.rpo_seconds == 20
    plan = decide(NOW - timedelta(minutes=30))
    assert plan.backup.label == "b1" and plan.wal_segments == 0x30 - 0x20 + 1
    assert any("Base backup: b1" in line for line in plan.lines())


@pytest.mark.parametrize(
    ("target", "free", "said"),
    [
        (NOW - timedelta(hours=11), 50 << 30, "before the recovery window"),
        (NOW + timedelta(minutes=5), 50 << 30, "in the future"),
        (NOW - timedelta(hours=1), 100 << 20, "not enough disk"),
    ],
)
def test_refusals_say_why(target: datetime, free: int, said: str) -> None:
    with pytest.raises(pitr.Refused, match=said) as caught:
        decide(target, free)
    assert "nothing was changed" in caught.value.message


def test_parse_target_reads_offsets_z_and_the_default_zone() -> None:
    assert pitr.parse_target("2026-11-22T14:30:00Z", "UTC") == datetime(
        2026, 11, 22, 14, 30, tzinfo=UTC
    )
    assert pitr.parse_target("2026-11-22 09:30-05:00", "UTC") == datetime(
        2026, 11, 22, 14, 30, tzinfo=UTC
    )
    assert pitr.parse_target("2026-11-22T09:30", "America/New_York") == datetime(
        2026, 11, 22, 14, 30, tzinfo=UTC
    )
    with pytest.raises(DbopsError, match="not a time"):
        pitr.parse_target("yesterday", "UTC")


# --- on the sandbox --------------------------------------------------------------------------


@pytest.fixture
def pool(sandbox_fleet: Fleet, sqlite_engine: Engine) -> Iterator[RunnerPool]:
    events = EventLog(sqlite_engine)
    with RunnerPool(
        sandbox_fleet, record=lambda k, s, p: events.append(k, s, p, actor="dbops")
    ) as runners:
        yield runners


def _server(fleet: Fleet) -> Any:
    return next(s for s in fleet.servers if s.name == SERVER)


def _spec(sandbox: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in sandbox["servers"] if s["name"] == SERVER)


def _admin(sandbox: dict[str, Any]) -> str:
    return f"host=127.0.0.1 port={_spec(sandbox)['port']} user=postgres dbname=postgres"


def _wait_archived(admin: str, timeout: float = 30) -> None:
    """Switch the WAL and wait until the archiver has stored that segment."""
    segment = query(admin, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    deadline = time.monotonic() + timeout
    while query(admin, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0] < segment:
        assert time.monotonic() < deadline, f"{segment} not archived within {timeout}s"
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["ssh", "local"])
def test_recovery_window_starts_at_the_first_base_backup(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, pool: RunnerPool, transport: str
) -> None:
    server = _server(sandbox_fleet)
    runner: Runner = (
        pool.get(SERVER) if transport == "ssh" else LocalRunner(SERVER, run_as=server.run_as)
    )
    query(_admin(sandbox), "SELECT txid_current()")  # some WAL to archive
    before = datetime.now(UTC).replace(microsecond=0)
    _wait_archived(_admin(sandbox))
    window = pitr.recovery_window(runner, server)
    assert window is not None
    first = datetime.fromisoformat(_spec(sandbox)["first_base_backup_at"])
    assert window.earliest <= first
    assert window.latest >= before
    assert window.rpo_seconds < 120
    shown = window.as_json()
    assert set(shown) == {"earliest", "latest", "rpo_seconds"}
    assert shown["earliest"].endswith("Z") and shown["latest"].endswith("Z")


@pytest.fixture
def two_customers(
    sandbox: dict[str, Any], sqlite_engine: Engine
) -> Iterator[tuple[Seeded, Seeded]]:
    with (
        seeded_customer(sandbox, SERVER, prefix="pitr") as one,
        seeded_customer(sandbox, SERVER, prefix="pitr") as other,
    ):
        upsert_customers(
            sqlite_engine,
            [Customer(c.name, SERVER, c.name, c.name, "small") for c in (one, other)],
        )
        yield one, other


def _scratch_dirs(server: Any) -> list[Path]:
    return sorted(Path(pitr.scratch_root(server)).glob(f"{pitr.SCRATCH_PREFIX}*"))


def _scratch_processes(server: Any) -> list[int]:
    """Processes of ``server``'s scratch instances: named by their directory, which is under
    this session's sandbox (another worker's restore has scratch instances of its own)."""
    return _processes_naming(f"{pitr.scratch_root(server)}/{pitr.SCRATCH_PREFIX}")


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.heavy
def test_restore_to_a_time_brings_back_exactly_that_moment(
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    sqlite_engine: Engine,
    two_customers: tuple[Seeded, Seeded],
) -> None:
    one, other = two_customers
    server = _server(sandbox_fleet)
    runner = pool.get(SERVER)
    query(one.conninfo, "CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    query(one.conninfo, "INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 50) g")
    at_t = {
        "accounts": query(one.conninfo, "SELECT count(*) FROM accounts")[0][0],
        "ledger": query(one.conninfo, "SELECT count(*), sum(id) FROM ledger")[0],
    }
    target = datetime.now(UTC)
    time.sleep(0.01)  # the work below commits strictly after T
    query(one.conninfo, "DROP TABLE ledger")
    query(one.conninfo, "INSERT INTO accounts (email) VALUES ('after-t@example.com')")
    query(other.conninfo, "INSERT INTO accounts (email) VALUES ('other-after-t@example.com')")
    other_before = query(other.conninfo, "SELECT count(*) FROM accounts")[0][0]

    dump = pitr.restore_to_time(
        runner, server, customer=one.name, database=one.name, role=one.name, target=target
    )

    assert dump.steps == ["planned", "archived", "restored", "recovered", "dumped", "cleaned"]
    assert dump.target == target and dump.path.startswith(str(one.backup_root))
    # The scratch instance is gone: no directory, no process, no socket, the port free.
    assert not Path(dump.scratch).exists() and _scratch_dirs(server) == []
    assert _processes_naming(dump.scratch) == []
    assert _port_free(dump.port)
    # Brought in through the existing safe swap, from the dump stamped T.
    events = EventLog(sqlite_engine)
    backups = Backups(sqlite_engine, events, sandbox_fleet, pool)
    result = backups.restore(one.name, dump.stamp, one.name, CAROL)
    assert "swapped" in result.steps
    assert query(one.conninfo, "SELECT count(*), sum(id) FROM ledger")[0] == at_t["ledger"]
    assert query(one.conninfo, "SELECT count(*) FROM accounts")[0][0] == at_t["accounts"]
    assert (
        query(one.conninfo, "SELECT count(*) FROM accounts WHERE email = 'after-t@example.com'")[0][
            0
        ]
        == 0
    )
    # The database as it was before the restore is kept aside, with the work after T.
    kept = result.kept_as
    query(one.admin, f'ALTER DATABASE "{kept}" ALLOW_CONNECTIONS true')  # closed by the swap
    rows = query(
        one.admin.replace("dbname=postgres", f"dbname={kept}"),
        "SELECT count(*) FROM accounts WHERE email = 'after-t@example.com'",
    )
    assert rows[0][0] == 1
    # The other customer on the same server: untouched, its work after T still there.
    assert query(other.conninfo, "SELECT count(*) FROM accounts")[0][0] == other_before
    assert (
        query(other.conninfo, "SELECT count(*) FROM accounts WHERE email LIKE 'other-after-t%'")[0][
            0
        ]
        == 1
    )


@pytest.mark.heavy
def test_the_dump_runs_as_the_customer_and_a_failure_removes_the_scratch_instance(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, pool: RunnerPool, two_customers: Any
) -> None:
    """A table in the customer's database the customer's role may not read (the admin's):
    a superuser's pg_dump would take it, the customer's cannot, so the restore fails, and
    the scratch instance goes all the same."""
    one, _ = two_customers
    server = _server(sandbox_fleet)
    query(
        one.admin.replace("dbname=postgres", f"dbname={one.name}"),
        "CREATE TABLE admins_only (x int); REVOKE ALL ON admins_only FROM PUBLIC",
    )
    target = datetime.now(UTC)
    with pytest.raises(DbopsError, match="permission denied"):
        pitr.restore_to_time(
            pool.get(SERVER),
            server,
            customer=one.name,
            database=one.name,
            role=one.name,
            target=target,
        )
    assert _scratch_dirs(server) == []
    assert _scratch_processes(server) == []


def test_targets_outside_the_window_are_refused_and_nothing_is_made(
    sandbox_fleet: Fleet, pool: RunnerPool
) -> None:
    server = _server(sandbox_fleet)
    runner = pool.get(SERVER)
    window = pitr.recovery_window(runner, server)
    assert window is not None
    for target, said in (
        (window.earliest - timedelta(hours=1), "before the recovery window"),
        (datetime.now(UTC) + timedelta(hours=1), "in the future"),
    ):
        with pytest.raises(pitr.Refused, match=said):
            pitr.restore_to_time(
                runner, server, customer="acme", database="acme", role="acme", target=target
            )
    assert _scratch_dirs(server) == []


def test_archive_command_false_warns_at_once_and_is_crit_fifteen_minutes_later(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, pool: RunnerPool
) -> None:
    admin = _admin(sandbox)
    server = _server(sandbox_fleet)
    query(admin, "ALTER SYSTEM SET archive_command = '/bin/false'")
    query(admin, "SELECT pg_reload_conf()")
    try:
        time.sleep(0.2)  # the archiver reads the reloaded setting
        failed_before = query(admin, "SELECT failed_count FROM pg_stat_archiver")[0][0]
        query(admin, "SELECT txid_current()")
        query(admin, "SELECT pg_switch_wal()")
        deadline = time.monotonic() + 20
        while query(admin, "SELECT failed_count FROM pg_stat_archiver")[0][0] <= failed_before:
            assert time.monotonic() < deadline, "archive_command '/bin/false' never failed"
            time.sleep(0.1)
        # Read as the monitoring role, as the health sweep would.
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            got = conn.execute(pitr.ARCHIVER_SQL).fetchone()
        assert got is not None
        seen = dict(got[0])
        now = datetime.now(UTC)
        first = pitr.archiving_verdict(seen, now)
        assert first.verdict == "warn", first
        later = pitr.archiving_verdict(seen, now + timedelta(minutes=15, seconds=1))
        assert later.verdict == "crit", later
    finally:
        query(admin, "ALTER SYSTEM RESET archive_command")
        query(admin, "SELECT pg_reload_conf()")
    # The archiver catches up once archive_command works again.
    _wait_archived(admin, timeout=90)
    row = pitr.read_archiver(pool.get(SERVER), server)
    assert pitr.archiving_verdict(row, datetime.now(UTC)).verdict == "ok"
