"""Point-in-time recovery wired into dbops (issue 17), on the session sandbox: the archiving
check in the sweep, ``recovery`` and ``worst_rpo`` in status and the report, the nightly
pgBackRest backup, the backups' dead-man's switch, the weekly physical restore test, and
``Backups.restore_to_time`` end to end. Time is moved, never slept through."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from core import health, pitr
from core.alerts import alerts_from_report
from core.backups import Backups
from core.customers import Customer, customer_from_mapping, upsert_customers
from core.errors import DbopsError
from core.escalation import Escalator
from core.fleet import Fleet, OnCall
from core.health.backup_run import backup_run_check, last_deadline
from core.incidents import Incidents
from core.notify import RecordingNotifier
from core.ops import Ops
from core.remote import RunnerPool
from core.report import render_status_text, render_text
from storage.events import EventLog
from storage.models_incidents import IncidentRow
from tests.test_backups import Seeded, query, seeded_customer
from tests.test_pitr import _admin, _scratch_dirs, _scratch_processes, _server, _wait_archived

SERVER = "vps1"
CAROL, ALICE = "U0CAROL", "U0ALICE"
NY = ZoneInfo("America/New_York")


def one_server(fleet: Fleet, **changes: Any) -> Fleet:
    server = _server(fleet).model_copy(update=changes)
    return fleet.model_copy(update={"servers": [server]})


@pytest.fixture
def events(sqlite_engine: Engine) -> EventLog:
    return EventLog(sqlite_engine)


@pytest.fixture
def pool(sandbox_fleet: Fleet, events: EventLog) -> Iterator[RunnerPool]:
    def record(kind: str, subject: str, payload: dict[str, Any]) -> None:
        events.append(kind, subject, payload, actor="dbops")

    with RunnerPool(sandbox_fleet, record=record) as runners:
        yield runners


# --- the archiving check and recovery, in the sweep ---------------------------------------------


def test_archiving_warns_in_one_sweep_and_is_crit_fifteen_minutes_later(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, pool: RunnerPool
) -> None:
    admin = _admin(sandbox)
    customers = [customer_from_mapping(c) for c in sandbox["customers"]]

    def sweep(now: datetime) -> health.ServerHealth:
        (got,) = health.check_fleet(
            sandbox_fleet, customers, pool, deadline_s=8, servers=[SERVER], now=now
        )
        return got

    healthy = sweep(datetime.now(UTC))
    archiving = healthy.check("archiving")
    assert archiving is not None and archiving.verdict == "ok", archiving
    # In report order: a server's own checks, archiving after pgbouncer.
    names = [c.name for c in healthy.checks]
    assert names.index("archiving") == names.index("pgbouncer") + 1
    query(admin, "ALTER SYSTEM SET archive_command = '/bin/false'")
    query(admin, "SELECT pg_reload_conf()")
    try:
        time.sleep(0.2)  # the archiver reads the reloaded setting (not time moved: a real wait)
        failed = query(admin, "SELECT failed_count FROM pg_stat_archiver")[0][0]
        query(admin, "SELECT txid_current()")
        query(admin, "SELECT pg_switch_wal()")
        deadline = time.monotonic() + 20
        while query(admin, "SELECT failed_count FROM pg_stat_archiver")[0][0] <= failed:
            assert time.monotonic() < deadline, "archive_command '/bin/false' never failed"
            time.sleep(0.1)
        now = datetime.now(UTC)
        first = sweep(now).check("archiving")
        assert first is not None and first.verdict == "warn", first
        later = sweep(now + timedelta(minutes=15, seconds=1)).check("archiving")
        assert later is not None and later.verdict == "crit", later
        report = {"servers": [{"name": SERVER, "postgres": "up", "checks": [later.as_json()]}]}
        (alert,) = [a for a in alerts_from_report(report) if a.alertname == "archiving"]
        assert (alert.status, alert.severity) == ("firing", "P1")
    finally:
        query(admin, "ALTER SYSTEM RESET archive_command")
        query(admin, "SELECT pg_reload_conf()")
    _wait_archived(admin, timeout=90)
    # A server without archiving configured: no archiving row, no recovery.
    plain = one_server(sandbox_fleet, pgbackrest_config=None)
    (got,) = health.check_fleet(plain, customers, pool, deadline_s=8, now=datetime.now(UTC))
    assert got.check("archiving") is None and got.recovery is None
    assert got.databases and all(d.recovery is None for d in got.databases)


# The RPO is read at the sweep's own time: on a machine whose other worker is busy the sweep's
# SSH calls (pgbackrest info, repo-ls) stretch it; run alone after the parallel run (make test).
@pytest.mark.solo
def test_recovery_in_status_and_report_json_and_text(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, sqlite_engine: Engine, events: EventLog
) -> None:
    upsert_customers(sqlite_engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    query(_admin(sandbox), "SELECT txid_current()")
    _wait_archived(_admin(sandbox))
    ops = Ops(sandbox_fleet, sqlite_engine, events, tz=UTC)
    try:
        # A deadline that a loaded CI machine meets (pgbackrest info and repo-ls over SSH).
        status = ops.status("acme", deadline_s=20)
        report = ops.report(deadline_s=20)
    finally:
        ops.close()
    recovery = status["database"]["recovery"]
    assert set(recovery) == {"earliest", "latest", "rpo_seconds"}
    first = datetime.fromisoformat(_spec_of(sandbox, status["server"]["name"]))
    assert datetime.fromisoformat(recovery["earliest"].replace("Z", "+00:00")) <= first
    assert recovery["rpo_seconds"] < 120
    assert "Recoverable to any moment:" in render_status_text(status)
    # Every database of a server shares its window; the worst RPO is the fleet's.
    by_server: dict[str, set[str]] = {}
    for d in report["databases"]:
        assert d["recovery"] is not None, d
        by_server.setdefault(d["server"], set()).add(json.dumps(d["recovery"], sort_keys=True))
    assert all(len(windows) == 1 for windows in by_server.values())
    worst = report["worst_rpo"]
    assert worst["rpo_seconds"] == max(d["recovery"]["rpo_seconds"] for d in report["databases"])
    assert worst["rpo_seconds"] < 120 and worst["without_recovery"] == 0
    assert "Worst RPO: " in render_text(report)


def _spec_of(sandbox: dict[str, Any], server: str) -> str:
    return str(next(s for s in sandbox["servers"] if s["name"] == server)["first_base_backup_at"])


# --- the dead-man's switch ----------------------------------------------------------------------


def test_backup_run_check_reads_the_nights_runs(events: EventLog) -> None:
    deadline = datetime(2026, 11, 24, 6, 0, tzinfo=NY)
    assert last_deadline(deadline - timedelta(seconds=1), NY, dt_time(6)) == deadline - timedelta(
        days=1
    )
    # A fresh log: not armed, no check (no page at a new install's first 06:00).
    events.append("job.start", "x", {}, actor="t", ts=deadline - timedelta(hours=3))
    assert backup_run_check(events, deadline, NY) is None
    # A log older than a day before the deadline, no run: crit.
    events.append("job.start", "x", {}, actor="t", ts=deadline - timedelta(days=3))
    got = backup_run_check(events, deadline, NY)
    assert got is not None and got.verdict == "crit" and "is the scheduler running" in got.detail
    # A run that failed for a server's pgBackRest backup is no success either.
    events.append(
        "backup.run",
        "backups",
        {"failed": [], "globals_failed": [], "pgbackrest_failed": ["vps2"]},
        actor="scheduler",
        ts=deadline - timedelta(hours=4),
    )
    got = backup_run_check(events, deadline, NY)
    assert got is not None and got.verdict == "crit" and "vps2 pgBackRest" in got.detail
    events.append(
        "backup.run",
        "backups",
        {"failed": [], "globals_failed": [], "pgbackrest_failed": []},
        actor="scheduler",
        ts=deadline - timedelta(hours=3),
    )
    got = backup_run_check(events, deadline, NY)
    assert got is not None and got.verdict == "ok"
    # The next night without a run: crit again at its deadline, not before.
    assert backup_run_check(events, deadline + timedelta(hours=23), NY).verdict == "ok"  # type: ignore[union-attr]
    assert backup_run_check(events, deadline + timedelta(days=1), NY).verdict == "crit"  # type: ignore[union-attr]


def test_nightly_disabled_pages_one_p1_at_the_deadline(
    sandbox_fleet: Fleet, sqlite_engine: Engine, events: EventLog
) -> None:
    """No nightly run at all (the job disabled), time moved to the deadline: the health sweep's
    report has backup_run crit, the incident desk opens one P1 and pages the primary; the next
    sweep a minute later adds no second incident."""
    fleet = sandbox_fleet.model_copy(update={"oncall": OnCall(primary=ALICE)})
    deadline = last_deadline(datetime.now(UTC), NY, fleet.backups.deadline) + timedelta(days=2)
    events.append(
        "job.start", "nightly_backups", {}, actor="scheduler", ts=deadline - timedelta(days=3)
    )
    notifier = RecordingNotifier()
    pager = Escalator(sqlite_engine, events, fleet, notifier, tz=NY)
    desk = Incidents(sqlite_engine, events, fleet, escalator=pager, tz=NY)
    ops = Ops(fleet, sqlite_engine, events, tz=NY)
    try:
        for now in (deadline, deadline + timedelta(seconds=60)):
            report = ops.report(deadline_s=8, now=now)
            (check,) = report["checks"]
            assert (check["name"], check["verdict"]) == ("backup_run", "crit"), check
            assert report["summary"]["verdict"] == "crit"
            desk.ingest(alerts_from_report(report), now=now)
    finally:
        ops.close()
    with Session(sqlite_engine) as session:
        rows = session.exec(
            select(IncidentRow).where(IncidentRow.dedupe_key == "check:backup_run:fleet")
        ).all()
    assert [(r.severity, r.status) for r in rows] == [("P1", "open")]
    assert [s for s in notifier.sent if s.how == "dm" and s.to == ALICE], notifier.sent
    assert "backup_run crit" in render_text(report)


# --- the nightly pgBackRest backup and the weekly physical restore test ---------------------------


def test_nightly_run_takes_a_pgbackrest_backup_with_the_fleets_retention(
    sandbox_fleet: Fleet, sqlite_engine: Engine, events: EventLog, sandbox_backups_kept: None
) -> None:
    # A day on: the newest set is older than the nightly gap, so a new one is taken; the
    # full backup day is not that day's, so it is a differential.
    later = datetime.now(UTC) + timedelta(days=1)
    day = pitr.WEEKDAYS[(later.weekday() + 1) % 7]
    fleet = one_server(sandbox_fleet)
    policy = fleet.backups.model_copy(update={"retention_full": 3, "full_backup_day": day})
    fleet = fleet.model_copy(update={"backups": policy})
    commands: list[dict[str, Any]] = []
    with RunnerPool(fleet, record=lambda k, s, p: commands.append(p)) as runners:
        server = fleet.servers[0]
        before = pitr.read_info(runners.get(SERVER), server).backups
        backups = Backups(sqlite_engine, events, fleet, runners, clock=lambda: later)
        run = backups.backup_all(actor="scheduler")
        (physical,) = run.physical
        assert physical.ok and physical.backup, physical
        after = pitr.read_info(runners.get(SERVER), server).backups
        assert after[-1].label == physical.backup and after[-1].type == "diff"
        assert after[-1].label not in {b.label for b in before}
        (sent,) = [p["command"] for p in commands if p["command"].endswith(" backup")]
        assert "--repo1-retention-full=3" in sent and "--repo1-retention-diff=7" in sent
        (run_event,) = events.query(kind="backup.run")
        assert run_event.payload["pgbackrest"] == [SERVER]
        assert run_event.payload["pgbackrest_failed"] == []
        (taken,) = events.query(kind="backup.pgbackrest")
        assert taken.subject == SERVER and taken.payload["type"] == "diff"
        # Run again the same night: no second set.
        again = Backups(sqlite_engine, events, fleet, runners).backup_physical_all()
        assert again[0].ok and again[0].backup is None
        assert len(pitr.read_info(runners.get(SERVER), server).backups) == len(after)
    # A stanza that cannot be reached: a failure in the run's outcome and its event.
    broken = one_server(sandbox_fleet, pgbackrest_config="/nonexistent/pgbackrest.conf")
    with RunnerPool(broken) as runners:
        failed = Backups(sqlite_engine, events, broken, runners).backup_physical_all()
    assert [(o.server, o.ok) for o in failed] == [(SERVER, False)]
    assert events.query(kind="backup.pgbackrest_failed")[-1].subject == SERVER


@pytest.mark.heavy
def test_weekly_physical_restore_test_is_recorded_like_the_dump_tests(
    sandbox_fleet: Fleet, sqlite_engine: Engine, events: EventLog
) -> None:
    today = pitr.WEEKDAYS[datetime.now(UTC).weekday()]
    fleet = one_server(sandbox_fleet)
    policy = fleet.backups.model_copy(
        update={"full_backup_day": "tue" if today == "mon" else "mon"}
    )
    with RunnerPool(fleet) as runners:
        # Not the full backup's day: no physical test.
        elsewhere = fleet.model_copy(update={"backups": policy})
        assert Backups(sqlite_engine, events, elsewhere, runners).verify_physical_all() == []
        policy = policy.model_copy(update={"full_backup_day": today})
        fleet = fleet.model_copy(update={"backups": policy})
        backups = Backups(sqlite_engine, events, fleet, runners)
        (outcome,) = backups.verify_physical_all()
        assert outcome.verification.ok, outcome.verification.detail
        assert backups.verify_physical_all() == []  # done this week
        assert backups._last_physical_test(SERVER) is not None
    (event,) = events.query(kind="backup.verified")
    assert event.subject == SERVER and event.payload["kind"] == "physical"
    assert event.payload["ok"] is True and event.payload["databases"] >= 3
    assert _scratch_dirs(fleet.servers[0]) == [] and _scratch_processes(fleet.servers[0]) == []


# --- Backups.restore_to_time, end to end ------------------------------------------------------


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


@pytest.mark.heavy
def test_restore_to_time_through_backups(
    sandbox_fleet: Fleet,
    sqlite_engine: Engine,
    events: EventLog,
    pool: RunnerPool,
    two_customers: tuple[Seeded, Seeded],
) -> None:
    one, other = two_customers
    backups = Backups(sqlite_engine, events, sandbox_fleet, pool)
    server = _server(sandbox_fleet)
    # Refusals: each says why, nothing is made, nothing changes.
    window = pitr.recovery_window(pool.get(SERVER), server)
    assert window is not None
    for target, said in (
        (window.earliest - timedelta(hours=1), "before the recovery window"),
        ((datetime.now(UTC) + timedelta(hours=1)).isoformat(), "in the future"),
    ):
        with pytest.raises(DbopsError, match=said):
            backups.restore_to_time(one.name, target, one.name, CAROL)
    with pytest.raises(DbopsError, match="does not match"):
        backups.restore_to_time(one.name, datetime.now(UTC), "someone-else", CAROL)
    assert len(events.query(kind="restore.refused", subject=one.name)) == 3
    assert _scratch_dirs(server) == []
    # The plan (the modal's and the shell's), in TIMEZONE when the time names no zone.
    local = datetime.now(NY).replace(tzinfo=None, microsecond=0).isoformat()
    plan = backups.restore_to_time_plan(one.name, local, timezone="America/New_York")
    assert plan.database == one.name and plan.free_bytes > plan.need_bytes
    assert [line.split(":")[0] for line in plan.lines()] == [
        "Target", "Recoverable", "Base backup", "WAL to replay", "Disk"
    ]  # fmt: skip

    query(one.conninfo, "CREATE TABLE ledger (id int PRIMARY KEY)")
    query(one.conninfo, "INSERT INTO ledger SELECT generate_series(1, 40)")
    target = datetime.now(UTC)
    time.sleep(0.01)  # the work below commits strictly after T
    query(one.conninfo, "DROP TABLE ledger")
    query(other.conninfo, "INSERT INTO accounts (email) VALUES ('other-after-t@example.com')")
    other_after = query(other.conninfo, "SELECT count(*) FROM accounts")[0][0]

    result = backups.restore_to_time(one.name, target.isoformat(), one.name, CAROL)

    assert "swapped" in result.steps and result.target == target
    assert result.pitr is not None and result.pitr["steps"][-1] == "cleaned"
    assert query(one.conninfo, "SELECT count(*), sum(id) FROM ledger")[0] == (40, 820)
    assert query(other.conninfo, "SELECT count(*) FROM accounts")[0][0] == other_after
    status = json.loads((Path(result.pitr["path"]) / "status").read_text())
    assert status["source"] == "pitr" and status["ok"] is True
    assert _scratch_dirs(server) == [] and _scratch_processes(server) == []
    kinds = [e.kind for e in events.query(subject=one.name) if e.kind.startswith("restore.")]
    assert "restore.pitr_dumped" in kinds and kinds[-1] == "restore.done"
