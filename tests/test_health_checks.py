"""Each sandbox fault turns the right check to the right verdict, and heal turns it back to ok.

Run over SSH (the sandbox's own sshd per server) and locally; thresholds small where the fault
needs time to show (an idle transaction is one second old, not ten). The pure parts (threshold
syntax, log scanning, df, backup status) are checked on fixed input at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core import health, sandbox
from core.backups import parse_backup_files
from core.customers import Customer, customer_from_mapping
from core.fleet import Fleet, parse_fleet
from core.health import Check, ServerHealth
from core.remote import CommandResult, RunnerPool

Breaker = Callable[[str, str], dict[str, Any]]

SMALL = {
    "txn_idle": {"warn": "1s", "crit": "1h"},
    "locks": {"warn": "waiting=1", "crit": "waiting=50"},
}


def fleet_for(fleet: Fleet, transport: str, thresholds: dict[str, Any] | None = None) -> Fleet:
    """The sandbox fleet with every server on ``transport`` and thresholds overridden."""
    data = fleet.model_dump(exclude={"base_dir"})
    for server in data["servers"]:
        server["transport"] = transport
    data["thresholds"] = {**data.get("thresholds", {}), **(thresholds or {})}
    return parse_fleet(data, base_dir=fleet.base_dir)


@pytest.fixture(params=["ssh", "local"])
def fleet(request: pytest.FixtureRequest, sandbox_fleet: Fleet) -> Fleet:
    return fleet_for(sandbox_fleet, request.param, SMALL)


@pytest.fixture(scope="module")
def customers(sandbox: dict[str, Any]) -> list[Customer]:
    return [customer_from_mapping(c) for c in sandbox["customers"]]


@pytest.fixture
def sweep(fleet: Fleet, customers: list[Customer]) -> Iterator[Callable[[str], ServerHealth]]:
    """sweep(server) -> that server's health now, through a runner pool kept for the test."""
    pool = RunnerPool(fleet)

    def run(server: str) -> ServerHealth:
        (result,) = health.check_fleet(fleet, customers, pool, deadline_s=8, servers=[server])
        return result

    yield run
    pool.close()


def check(where: ServerHealth, name: str, customer: str | None = None) -> Check:
    checks = where.checks
    if customer is not None:
        checks = next(d for d in where.databases if d.customer == customer).checks
    return next(c for c in checks if c.name == name)


def until(probe: Callable[[], Check], verdicts: set[str], timeout: float = 6.0) -> Check:
    """Poll until the check reaches one of ``verdicts``; the last answer either way."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got.verdict in verdicts or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def calendar_bound(c: Check) -> bool:
    """``version`` turns warn in a major's last half year of support whatever the sandbox does
    (this machine's 15 from May 2027): within 183 days of the end it is not held to ok here,
    before that it must be ok like the rest. tests/test_health_majors.py pins the dates."""
    return c.name == "version" and isinstance(c.value, int) and c.value <= 183


def all_ok(where: ServerHealth) -> None:
    bad = [
        (c.name, c.verdict, c.detail)
        for c in [*where.checks, *(c for d in where.databases for c in d.checks)]
        if not calendar_bound(c)
        and (
            c.verdict not in ("ok", "unknown")
            or (c.verdict == "unknown" and c.name not in ("backup_verified",))
        )
    ]
    assert not bad, bad
    assert where.reachable and where.postgres == "up"
    assert all(d.online for d in where.databases)


@pytest.fixture
def acme_server(sandbox: dict[str, Any]) -> str:
    return str(next(c["server"] for c in sandbox["customers"] if c["name"] == "acme"))


def test_healthy_sandbox_is_all_ok(sweep: Callable[[str], ServerHealth], acme_server: str) -> None:
    where = sweep(acme_server)
    all_ok(where)
    acme = next(d for d in where.databases if d.customer == "acme")
    assert acme.size_bytes and acme.size_bytes > 1_000_000
    assert acme.last_backup_at is not None
    # disk_runway reads the measurement history, which this sweep is not given.
    assert [c.name for c in where.checks] == [n for n in health.SERVER_CHECKS if n != "disk_runway"]
    assert [c.name for c in acme.checks] == list(health.DATABASE_CHECKS)


def test_db_down_is_crit_then_ok(
    sweep: Callable[[str], ServerHealth],
    sandbox_break: Breaker,
    sandbox_dir: Path,
    acme_server: str,
) -> None:
    sandbox_break("db-down", "acme")
    where = sweep(acme_server)
    conn = check(where, "connection", "acme")
    assert conn.verdict == "crit"
    assert "not currently accepting connections" in conn.detail
    assert "127.0.0.1" not in conn.detail  # no host or port in what users see
    assert not next(d for d in where.databases if d.customer == "acme").online
    assert check(where, "connection").verdict == "ok"  # the cluster itself is fine
    vacuum = check(where, "last_vacuum", "acme")
    assert vacuum.verdict == "unknown" and "database not answering" in vacuum.detail
    sandbox.heal(sandbox_dir)
    all_ok(sweep(acme_server))


def test_server_down_is_crit_then_ok(
    sweep: Callable[[str], ServerHealth],
    sandbox_break: Breaker,
    sandbox_dir: Path,
    acme_server: str,
) -> None:
    sandbox_break("server-down", acme_server)
    where = sweep(acme_server)
    assert where.postgres == "down" and where.reachable
    assert check(where, "connection").verdict == "crit"
    assert check(where, "backends").verdict == "unknown"  # as check_postgres: cannot tell
    assert check(where, "connection", "acme").verdict == "crit"
    assert check(where, "disk_space").verdict == "ok"  # the machine still answers
    sandbox.heal(sandbox_dir)
    all_ok(sweep(acme_server))


def test_connections_fill_backends_then_ok(
    sweep: Callable[[str], ServerHealth],
    sandbox_break: Breaker,
    sandbox_dir: Path,
    acme_server: str,
) -> None:
    sandbox_break("connections", acme_server)
    got = check(sweep(acme_server), "backends")
    assert got.verdict == "crit", got
    # Our probes and our cluster connection race for the one slot left; either way it is crit.
    assert got.value is None or (isinstance(got.value, int) and got.value >= 28)
    sandbox.heal(sandbox_dir)
    all_ok(sweep(acme_server))


def test_idle_transaction_warns_then_ok(
    sweep: Callable[[str], ServerHealth],
    sandbox_break: Breaker,
    sandbox_dir: Path,
    acme_server: str,
) -> None:
    sandbox_break("idle-txn", "acme")
    got = until(lambda: check(sweep(acme_server), "txn_idle"), {"warn", "crit"})
    assert got.verdict == "warn", got
    assert "in acme" in got.detail
    sandbox.heal(sandbox_dir)
    all_ok(sweep(acme_server))


def test_lock_wait_warns_then_ok(
    sweep: Callable[[str], ServerHealth],
    sandbox_break: Breaker,
    sandbox_dir: Path,
    acme_server: str,
) -> None:
    sandbox_break("lock", "acme")
    got = check(sweep(acme_server), "locks")
    assert got.verdict == "warn", got
    assert "waiting: 1" in got.detail
    sandbox.heal(sandbox_dir)
    all_ok(sweep(acme_server))


def test_log_errors_warn_then_ok(
    sweep: Callable[[str], ServerHealth],
    sandbox_break: Breaker,
    sandbox_dir: Path,
    acme_server: str,
) -> None:
    sandbox_break("log-errors", acme_server)
    got = check(sweep(acme_server), "logfile")
    assert got.verdict == "warn", got
    assert got.value >= 4  # two ERRORs, two FATALs; never our own probes' lines
    assert "division by zero" in got.detail
    sandbox.heal(sandbox_dir)
    all_ok(sweep(acme_server))


def test_log_and_warning_lines_are_not_errors(
    sweep: Callable[[str], ServerHealth],
    fleet: Fleet,
    acme_server: str,
) -> None:
    """A healthy server's log: LOG lines (even the ones worth reading) and WARNINGs, no error."""
    server = fleet.server(acme_server)
    marker = f"dbops_warn_{time.monotonic_ns()}"
    try:
        # As a customer's application (dbops's own sessions' lines are not the server's).
        with psycopg.connect(server.dsn, autocommit=True, application_name="shop") as conn:
            conn.execute(
                f"DO $$ BEGIN RAISE LOG 'checkpoints are occurring too frequently ({marker})';"
                f" RAISE WARNING '{marker} one'; RAISE WARNING '{marker} two'; END $$"
            )
        log = Path(server.log_path)
        deadline = time.monotonic() + 5
        while log.read_text(errors="replace").count(marker) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        got = check(sweep(acme_server), "logfile")
        assert (got.verdict, got.value) == ("ok", 0), got
        assert got.detail.startswith("0 errors ("), got
        assert health.log_warnings(got.detail) >= 2  # ours, and any the cluster logged itself
        assert f"LOG: checkpoints are occurring too frequently ({marker})" in got.detail
    finally:
        os.truncate(server.log_path, 0)  # as heal rotates it: the next test reads a clean log


def test_missing_backup_is_crit_then_ok(
    sweep: Callable[[str], ServerHealth],
    sandbox_break: Breaker,
    sandbox_dir: Path,
    acme_server: str,
) -> None:
    sandbox_break("backup-missing", "acme")
    where = sweep(acme_server)
    got = check(where, "backup_age", "acme")
    assert got.verdict == "crit" and "no complete backup" in got.detail
    assert next(d for d in where.databases if d.customer == "acme").last_backup_at is None
    sandbox.heal(sandbox_dir)
    all_ok(sweep(acme_server))


# --- fixed input -----------------------------------------------------------------------------


def stats(**kw: Any) -> health.ClusterStats:
    out = health.ClusterStats(connect_ms=1, max_connections=100)
    for key, value in kw.items():
        setattr(out, key, value)
    return out


@pytest.mark.parametrize(
    ("total", "warn", "crit", "verdict"),
    [
        (89, "90%", "95%", "ok"),
        (90, "90%", "95%", "warn"),
        (95, "90%", "95%", "crit"),
        (11, 12, 20, "ok"),
        (12, 12, 20, "warn"),
        (94, "-10", "-5", "warn"),
        (95, "-10", "-5", "crit"),
    ],
)
def test_backends_thresholds_as_check_postgres(
    total: int, warn: Any, crit: Any, verdict: str
) -> None:
    got = health.check_backends(stats(backends={"a": total}), warn, crit)
    assert got.verdict == verdict
    assert got.value == total


def test_bad_threshold_is_unknown_not_an_exception() -> None:
    got = health.check_backends(stats(backends={"a": 1}), "lots", "95%")
    assert got.verdict == "unknown" and "lots" in got.detail


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s", (None, 10.0)),
        ("5 minutes", (None, 300.0)),
        (30, (None, 30.0)),
        ("+3", (3, None)),
        ("3 for 10s", (3, 10.0)),
        ("10s for 3", (3, 10.0)),
    ],
)
def test_txn_idle_threshold_forms(text: Any, expected: tuple[Any, Any]) -> None:
    assert health.parse_count_for_time(text, "txn_idle") == expected


def test_locks_multival_thresholds() -> None:
    locks = [(True, "AccessShareLock", "a"), (True, "AccessExclusiveLock", "a"),
             (False, "AccessShareLock", "a")]  # fmt: skip
    got = health.check_locks(stats(locks=locks), "total=2", "accessexclusive=1")
    assert got.verdict == "crit" and got.value == 3
    assert health.check_locks(stats(locks=locks), 10, 20).verdict == "ok"


LOG = """\
2026-11-22 06:00:00.000 UTC [1] postgres@postgres psql ERROR:  old news
2026-11-22 07:59:00.001 UTC [2] postgres@acme psql ERROR:  division by zero
2026-11-22 07:59:00.002 UTC [2] postgres@acme psql STATEMENT:  SELECT 'ERROR:  not me'
2026-11-22 07:59:01.000 UTC [3] m@gone dbops FATAL:  database "gone" does not exist
2026-11-22 07:59:02.000 UTC [4] @ LOG:  checkpoints are occurring too frequently (9 seconds apart)
2026-11-22 07:59:03.000 UTC [5] @ LOG:  checkpoint complete: wrote 3 buffers
2026-11-22 07:59:04.000 UTC [6] x@y app FATAL:  password authentication failed for user "x"
"""


def test_log_scan_counts_what_matters_in_the_window() -> None:
    found = health.scan_log(LOG, since=datetime(2026, 11, 22, 7, 0, tzinfo=UTC))
    assert found.counts == {"ERROR": 1, "FATAL": 1}, "a LOG line is never an error"
    assert found.notes == ["LOG: checkpoints are occurring too frequently (9 seconds apart)"]
    got = health.check_logfile(found, 1, 3)
    assert got.verdict == "warn" and got.value == 2
    assert got.detail == (
        "2 errors: ERROR 1, FATAL 1; ERROR: division by zero | FATAL: password authentication"
        ' failed for user "x" | LOG: checkpoints are occurring too frequently (9 seconds apart)'
    )
    assert health.check_logfile(found, 1, 2).verdict == "crit"


def test_log_scan_leaves_out_dbops_by_its_application_name_only() -> None:
    lines = [
        "2026-11-22 07:59:01.000 UTC [3] m@acme dbops ERROR:  OWN",
        "2026-11-22 07:59:01.000 UTC [3] user=m,db=acme,app=dbops ERROR:  OWN, other prefix",
        "2026-11-22 07:59:02.000 UTC [4] dbops@acme psql ERROR:  a role named dbops",
        "2026-11-22 07:59:03.000 UTC [5] m@dbops psql ERROR:  a database named dbops",
        "2026-11-22 07:59:04.000 UTC [6] m@acme dbops-sandbox-fault ERROR:  not ours",
        "2026-11-22 07:59:05.000 UTC [7] m@acme dbops2 ERROR:  nor this",
    ]
    found = health.scan_log("\n".join(lines), since=None)
    assert found.counts == {"ERROR": 4}
    assert not any("OWN" in sample for sample in found.samples)


QUIET_LOG = """\
2026-11-22 07:59:02.000 UTC [4] @ LOG:  checkpoints are occurring too frequently (9 seconds apart)
2026-11-22 07:59:02.001 UTC [4] @ HINT:  Consider increasing "max_wal_size".
2026-11-22 07:59:03.000 UTC [5] @ LOG:  checkpoint complete: wrote 3 buffers
2026-11-22 07:59:04.000 UTC [6] a@acme app WARNING:  there is no transaction in progress
2026-11-22 07:59:05.000 UTC [6] a@acme app WARNING:  nonstandard use of \\' in a string literal
2026-11-22 07:59:06.000 UTC [7] a@acme app NOTICE:  relation "t" already exists, skipping
2026-11-22 07:59:07.000 UTC [8] @ LOG:  database system is ready to accept connections
"""


def test_log_and_warning_lines_alone_are_ok_with_zero_errors() -> None:
    found = health.scan_log(QUIET_LOG * 10, None)
    assert found.counts == {} and found.total == 0 and found.warnings == 20
    got = health.check_logfile(found, 1, 10)
    assert (got.verdict, got.value) == ("ok", 0)
    assert got.detail.startswith("0 errors (20 warnings); LOG: checkpoints are occurring")
    assert health.log_warnings(got.detail) == 20
    notices = QUIET_LOG.replace("WARNING", "NOTICE")
    quiet = health.check_logfile(health.scan_log(notices, None), 1, 10)
    assert (quiet.verdict, quiet.value, health.log_warnings(quiet.detail)) == ("ok", 0, 0)
    assert quiet.detail.startswith("0 errors; LOG: checkpoints")


@pytest.mark.parametrize("level", ["ERROR", "FATAL", "PANIC"])
def test_each_error_level_counts(level: str) -> None:
    line = f"2026-11-22 07:00:00 UTC [1] a@acme app {level}:  it broke\n"
    found = health.scan_log(QUIET_LOG + line * 2, None)
    assert found.counts == {level: 2} and found.warnings == 2
    got = health.check_logfile(found, 1, 10)
    assert got.value == 2 and got.verdict == ("crit" if level == "PANIC" else "warn")
    assert got.detail.startswith(f"2 errors: {level} 2 (2 warnings); {level}: it broke")
    assert health.log_warnings(got.detail) == 2


def test_log_panic_is_crit_even_once() -> None:
    found = health.scan_log("2026-11-22 07:00:00 UTC [1] @ PANIC:  could not write\n", None)
    assert health.check_logfile(found, 1, 10).verdict == "crit"


def test_df_parsing_groups_paths_by_filesystem() -> None:
    out = CommandResult(
        "vps1", [], 1,
        "Filesystem 1-blocks Used Available Capacity Mounted on\n"
        "/dev/sda1 1000 410 590 41% /\n/dev/sda1 1000 410 590 41% /\n"
        "/dev/sdb1 2000 1900 100 95% /backups\n",
        "df: /missing: No such file or directory\n", 0.0,
    )  # fmt: skip
    systems = health.parse_df(out, ["/data", "/missing", "/data/pg_wal", "/backups"])
    assert [(f.mount, f.paths) for f in systems] == [
        ("/", ("/data", "/data/pg_wal")),
        ("/backups", ("/backups",)),
    ]
    got = health.check_disk_space(systems, "90%", "95%")
    assert got.verdict == "crit" and got.value == 95
    assert health.check_disk_space(systems, "90%", "2000 or 99%").verdict == "warn"


def test_backup_age_uses_newest_complete_good_backup() -> None:
    now = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    seen = [
        health.BackupSeen("20261122T070000Z", now - timedelta(hours=1), ok=False),
        health.BackupSeen("20261121T070000Z", now - timedelta(hours=25), ok=True),
    ]
    got, last = health.check_backup_age(seen, "26h", "50h", now)
    assert got.verdict == "warn" and "FAILED" in got.detail  # a newer failure is not ok
    assert got.value == 25 * 3600 and last == now - timedelta(hours=25)
    assert health.check_backup_age([], "26h", "50h", now)[0].verdict == "crit"


def test_status_lines_keep_only_complete_backups() -> None:
    text = (
        '/b/acme/20261122T080000Z/status:{"ok": true,\n'
        '/b/acme/20261122T080000Z/status: "finished_at": "2026-11-22T08:01:00+00:00"}\n'
        "/b/acme/20261123T080000Z/status:{half written\n"
    )
    statuses = parse_backup_files(text, "/b")
    assert list(statuses) == ["/b/acme/20261122T080000Z/status"]
    seen = health.backups_by_customer(statuses, "/b")
    assert seen["acme"][0].ok and seen["acme"][0].finished_at is not None


def test_conninfo_sets_timeouts_and_name_without_losing_options() -> None:
    dsn = "host=h port=5 user=m dbname=postgres options='-c search_path=x'"
    info = health.health_conninfo(dsn, health.Limits(), dbname="acme")
    assert "dbname=acme" in info
    assert psycopg.conninfo.conninfo_to_dict(info)["application_name"] == "dbops"
    assert "search_path=x" in info and "statement_timeout=5000" in info
    assert "lock_timeout=1000" in info


def test_hitratio_needs_activity_before_judging() -> None:
    quiet = health.DatabaseStats("acme", True, 10, 1000, blks_hit=50, blks_read=50)
    assert health.check_hitratio(quiet, "90%", "80%").verdict == "ok"
    busy = health.DatabaseStats("acme", True, 10, 1000, blks_hit=85_000, blks_read=15_000)
    got = health.check_hitratio(busy, "90%", "80%")
    assert got.verdict == "warn" and got.value == 85


def test_database_size_in_bytes() -> None:
    db = health.DatabaseStats("acme", True, 10, 11 * 1024**3, 0, 0)
    got = health.check_database_size(db, "10G", "20G")
    assert got.verdict == "warn" and got.warn == 10 * 1024**3 and got.value == 11 * 1024**3


def test_txn_idle_without_pg_monitor_is_unknown() -> None:
    hidden = health.Activity(7, None, None, None, "<insufficient privilege>", 0, 0, False, False)
    got = health.check_txn_idle(stats(activity=[hidden]), "1s", "1h")
    assert got.verdict == "unknown" and "pg_monitor" in got.detail


def vacuumed(age_s: int | None, tables: int = 2, never: int = 0, **kw: Any) -> health.VacuumStats:
    oldest = "public.orders" if age_s is not None else None
    return health.VacuumStats("acme", tables, never, oldest, age_s, kw.get("stats_reset"))


@pytest.mark.parametrize(
    ("age", "verdict"),
    [(0, "ok"), (86_399, "ok"), (86_400, "warn"), (172_799, "warn"), (172_800, "crit")],
)
def test_last_vacuum_boundaries_at_check_postgres_defaults(age: int, verdict: str) -> None:
    got = health.check_last_vacuum(vacuumed(age), "1d", "2d")
    assert (got.verdict, got.value, got.warn, got.crit) == (verdict, age, 86_400, 172_800)
    assert got.detail.startswith("public.orders last vacuumed ")


def test_last_vacuum_passes_over_tables_never_vacuumed() -> None:
    got = health.check_last_vacuum(vacuumed(10_800, tables=5, never=3), "1d", "2d")
    assert got.verdict == "ok" and got.value == 10_800
    assert got.detail == "public.orders last vacuumed 3h00m ago; 3 of 5 tables never vacuumed"


def test_last_vacuum_unknown_where_nothing_can_be_measured() -> None:
    never = health.check_last_vacuum(vacuumed(None, tables=2, never=2), "1d", "2d")
    assert never.verdict == "unknown" and never.value is None
    assert "no vacuum on record of its 2 tables" in never.detail
    reset = datetime(2026, 11, 22, 7, 30, tzinfo=UTC)
    after_reset = health.check_last_vacuum(vacuumed(None, never=2, stats_reset=reset), "1d", "2d")
    assert "statistics were reset 2026-11-22 07:30 UTC" in after_reset.detail
    empty = health.check_last_vacuum(vacuumed(None, tables=0), "1d", "2d")
    assert empty.verdict == "unknown" and empty.detail == "acme has no user tables"
    silent = health.check_last_vacuum(None, "1d", "2d", error="database not answering: x")
    assert silent.verdict == "unknown" and silent.detail == "database not answering: x"


def test_last_vacuum_thresholds_read_as_check_postgres() -> None:
    assert health.check_last_vacuum(vacuumed(90), "1 minute", 120).verdict == "warn"
    assert health.check_last_vacuum(vacuumed(90), "soon", "2d").verdict == "unknown"
    upside_down = health.check_last_vacuum(vacuumed(90), "2d", "1d")
    assert upside_down.verdict == "unknown" and "above critical" in upside_down.detail
