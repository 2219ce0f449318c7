"""Scheduled jobs: their triggers, and the claim that makes each run happen exactly once.

APScheduler (3.x) decides *when*; this module decides *whether this process runs it*. Every run
first claims its (job, scheduled time) slot with an INSERT into ``job_runs`` under a unique
constraint: across any number of ``dbops scheduler`` processes on one database, exactly one
INSERT succeeds. A claimant that dies mid-run leaves a ``running`` row whose lease expires; the
next process to look (a restarted worker's catch-up, or a standby) takes it over, so a run is
never skipped either.

The scheduled time is worked out from the trigger, not from the clock at which the job happened
to start: two processes started at different moments compute the same slot. Interval triggers
are anchored to a fixed epoch for the same reason.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.checklists import Checklist
from core.errors import DbopsError
from storage.models_jobs import JobRun

# Interval triggers count from here, so every process agrees on the slots.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class JobSpec:
    id: str
    description: str
    trigger: BaseTrigger
    # How late a run may start and still run (None: always run, however late).
    misfire_grace_s: int | None
    coalesce: bool = True
    # Claim each slot in job_runs (run once across replicas). Jobs that are safe to run
    # concurrently by construction (the escalation tick claims its own timers) skip the claim.
    exclusive: bool = True
    # On start, run a slot that was missed while no scheduler was up (within the grace).
    catch_up: bool = False
    lease_s: int = 600
    # Record start/end events even when the run did nothing (ticks record only what they do).
    quiet: bool = False
    args: dict[str, Any] = field(default_factory=dict)


def cron(tz: tzinfo, **fields: Any) -> CronTrigger:
    return CronTrigger(timezone=tz, **fields)


def every(seconds: int, tz: tzinfo) -> IntervalTrigger:
    return IntervalTrigger(seconds=seconds, start_date=EPOCH, timezone=tz)


def job_specs(tz: tzinfo, checklists: dict[str, Checklist]) -> list[JobSpec]:
    """Every scheduled job of dbops, with its timing policy."""
    specs = [
        JobSpec(
            "morning_report",
            "SOP-101 morning health check, posted to the ops channel",
            cron(tz, day_of_week="mon-fri", hour=8, minute=0),
            misfire_grace_s=4 * 3600,  # an hour late is still worth posting, marked late
            catch_up=True,
            lease_s=300,
        ),
        JobSpec(
            "health_sweep",
            "every check on every server; a check going crit raises an alert",
            every(60, tz),
            misfire_grace_s=20,  # a late sweep is skipped: the next one is due soon
            lease_s=120,
        ),
        JobSpec(
            "escalation_tick",
            "send the escalation steps and reminders that are due",
            # Every second: a due page waits at most that long (one indexed query when idle).
            every(1, tz),
            misfire_grace_s=2,
            exclusive=False,
            quiet=True,
        ),
        JobSpec(
            "nightly_backups",
            "pg_dump of every customer database and each server's globals, then retention",
            cron(tz, hour=2, minute=0),
            misfire_grace_s=4 * 3600,
            catch_up=True,
            lease_s=3 * 3600,
        ),
        JobSpec(
            "restore_tests",
            "restore each newest backup into a scratch database and compare row counts",
            cron(tz, hour=4, minute=30),
            misfire_grace_s=4 * 3600,
            catch_up=True,
            lease_s=3 * 3600,
        ),
        JobSpec(
            "checklist_nudge",
            "remind the channel of checklists left unfinished at the end of the day",
            cron(tz, day_of_week="mon-fri", hour=17, minute=0),
            misfire_grace_s=3 * 3600,
            catch_up=True,
        ),
        JobSpec(
            "oncall_handoff",
            "announce a change of on-call (weekly rotation or an override)",
            cron(tz, minute=0),
            misfire_grace_s=1800,
        ),
        JobSpec(
            "events_checkpoint",
            "sign the event log's head; append it to DBOPS_CHECKPOINTS and post it",
            # Hourly, off the top of the hour the other jobs share (and after every
            # destructive action, by core.checkpoints.Checkpointer).
            cron(tz, minute=30),
            misfire_grace_s=1800,
            lease_s=300,
        ),
    ]
    for name, checklist in sorted(checklists.items()):
        if checklist.schedule:
            specs.append(
                JobSpec(
                    f"checklist:{name}",
                    checklist.title,
                    cron(tz, **checklist.schedule),
                    misfire_grace_s=6 * 3600,
                    catch_up=True,
                    args={"checklist": name},
                )
            )
    return specs


def last_slot(trigger: BaseTrigger, now: datetime, grace_s: int | None) -> datetime | None:
    """The newest fire time of ``trigger`` at or before ``now`` (and within the grace), in UTC."""
    horizon = now - timedelta(seconds=grace_s if grace_s is not None else 7 * 86400)
    # Step from the horizon to now; a trigger's fire times are ordered.
    slot: datetime | None = None
    probe = trigger.get_next_fire_time(None, horizon)
    steps = 0
    while probe is not None and probe <= now and steps < 100_000:
        slot = probe
        probe = trigger.get_next_fire_time(probe, probe + timedelta(microseconds=1))
        steps += 1
    return slot.astimezone(UTC) if slot is not None else None


def next_runs(trigger: BaseTrigger, now: datetime, count: int = 1) -> list[datetime]:
    out: list[datetime] = []
    prev: datetime | None = None
    at = now
    while len(out) < count:
        nxt = trigger.get_next_fire_time(prev, at)
        if nxt is None:
            break
        out.append(nxt)
        prev, at = nxt, nxt + timedelta(microseconds=1)
    return out


def _slot_key(slot: datetime) -> datetime:
    return slot.astimezone(UTC).replace(microsecond=0)


def claim(
    engine: Engine, job_id: str, slot: datetime, *, owner: str, lease_s: int, now: datetime
) -> int | None:
    """Claim (job_id, slot) for ``owner``; the attempt number, or None if another process has it.

    A first claim is an INSERT (the unique constraint picks one winner). A slot whose claimant
    is gone (status still running, lease passed) is taken over with a conditional UPDATE.
    """
    key = _slot_key(slot)
    lease = now + timedelta(seconds=lease_s)
    try:
        with Session(engine) as session:
            session.add(
                JobRun(
                    job_id=job_id, scheduled_for=key, owner=owner, claimed_at=now, lease_until=lease
                )
            )
            session.commit()
            return 1
    except IntegrityError:
        pass
    with engine.begin() as conn:
        taken = conn.execute(
            update(JobRun)
            .where(
                col(JobRun.job_id) == job_id,
                col(JobRun.scheduled_for) == key,
                col(JobRun.status) == "running",
                col(JobRun.lease_until) < now,
            )
            .values(
                owner=owner, claimed_at=now, lease_until=lease, attempts=col(JobRun.attempts) + 1
            )
        )
        if taken.rowcount != 1:
            return None
    with Session(engine) as session:
        row = session.exec(
            select(JobRun).where(JobRun.job_id == job_id, JobRun.scheduled_for == key)
        ).one()
        return row.attempts


def finish(
    engine: Engine,
    job_id: str,
    slot: datetime,
    *,
    owner: str,
    ok: bool,
    now: datetime,
    error_id: str | None = None,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(JobRun)
            .where(
                col(JobRun.job_id) == job_id,
                col(JobRun.scheduled_for) == _slot_key(slot),
                col(JobRun.owner) == owner,
            )
            .values(status="ok" if ok else "failed", finished_at=now, error_id=error_id)
        )


def slot_state(engine: Engine, job_id: str, slot: datetime) -> JobRun | None:
    with Session(engine) as session:
        return session.exec(
            select(JobRun).where(JobRun.job_id == job_id, JobRun.scheduled_for == _slot_key(slot))
        ).first()


def runs(engine: Engine, job_id: str | None = None, limit: int = 50) -> list[JobRun]:
    with Session(engine) as session:
        stmt = select(JobRun).order_by(col(JobRun.id).desc()).limit(limit)
        if job_id is not None:
            stmt = stmt.where(JobRun.job_id == job_id)
        return list(session.exec(stmt))


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunResult:
    job_id: str
    slot: datetime | None
    ran: bool
    ok: bool = True
    late_s: int = 0
    attempt: int = 0
    error_id: str | None = None
    outcome: Any = None
    why_not: str | None = None
    manual: bool = False
    # What went wrong, fit to show: a DbopsError's own message, else only the exception's type.
    error: str | None = None
    duration_ms: int = 0


JobFn = Callable[[datetime, int], Any]  # (slot, late_s) -> outcome worth recording


def execute(
    spec: JobSpec,
    fn: JobFn,
    *,
    engine: Engine,
    events: Any,
    clock: Clock = utc_now,
    owner: str | None = None,
    on_error: Callable[[str, str, BaseException], None] | None = None,
) -> RunResult:
    """Run one firing of ``spec``: find its slot, claim it, run ``fn``, record start and end.

    ``on_error(job_id, error_id, exc)`` is told about a failure (the scheduler posts the
    correlation id to the ops channel); the exception itself never escapes.
    """
    owner = owner or owner_id()
    now = clock()
    slot = last_slot(spec.trigger, now, spec.misfire_grace_s)
    if slot is None:
        if not spec.quiet:
            events.append(
                "job.skipped",
                spec.id,
                {"reason": "missed its grace period"},
                actor="scheduler",
                ts=now,
            )
        return RunResult(spec.id, None, ran=False, why_not="missed")
    attempt = 1
    if spec.exclusive:
        got = claim(engine, spec.id, slot, owner=owner, lease_s=spec.lease_s, now=now)
        if got is None:
            return RunResult(spec.id, slot, ran=False, why_not="claimed elsewhere")
        attempt = got
    late_s = int((now - slot).total_seconds())
    base = {"slot": slot, "late_s": late_s, "owner": owner, "attempt": attempt}
    if not spec.quiet:
        events.append(
            "job.start",
            spec.id,
            base,
            actor="scheduler",
            source="scheduler",
            source_id=f"{spec.id}@{slot.isoformat()}#{attempt}:start",
        )
    started = time.monotonic()
    try:
        outcome = fn(slot, late_s)
    except Exception as exc:
        error_id, failed = _failure(spec, base, exc, started, "job")
        if spec.exclusive:
            finish(engine, spec.id, slot, owner=owner, ok=False, now=clock(), error_id=error_id)
        events.append(
            "job.end",
            spec.id,
            failed,
            actor="scheduler",
            source="scheduler",
            source_id=f"{spec.id}@{slot.isoformat()}#{attempt}:end",
        )
        if on_error is not None:
            on_error(spec.id, error_id, exc)
        return RunResult(
            spec.id, slot, ran=True, ok=False, late_s=late_s, attempt=attempt, error_id=error_id
        )
    duration_ms = int((time.monotonic() - started) * 1000)
    if spec.exclusive:
        finish(engine, spec.id, slot, owner=owner, ok=True, now=clock())
    if not spec.quiet or outcome:
        events.append(
            "job.end",
            spec.id,
            {**base, "outcome": "ok", "result": outcome, "duration_ms": duration_ms},
            actor="scheduler",
            source="scheduler",
            source_id=f"{spec.id}@{slot.isoformat()}#{attempt}:end",
        )
    return RunResult(spec.id, slot, ran=True, late_s=late_s, attempt=attempt, outcome=outcome)


def _failure(
    spec: JobSpec, base: dict[str, Any], exc: BaseException, started: float, what: str
) -> tuple[str, dict[str, Any]]:
    """A failed run's error id (logged with the traceback) and its ``job.end`` payload, which
    names only the exception's type: its message may hold what an event must not."""
    error_id = uuid.uuid4().hex[:10]
    logging.getLogger("dbops.scheduler").exception("%s %s failed [%s]", what, spec.id, error_id)
    return error_id, {
        **base,
        "outcome": "failed",
        "error_id": error_id,
        "error": type(exc).__name__,
        "duration_ms": int((time.monotonic() - started) * 1000),
    }


def missed_slots(
    engine: Engine, specs: list[JobSpec], now: datetime
) -> list[tuple[JobSpec, datetime]]:
    """Slots of catch-up jobs, within their grace, that no process has finished: what a
    scheduler starting now should run (a worker that was down at 08:00, or died mid-run)."""
    out = []
    for spec in specs:
        if not (spec.catch_up and spec.exclusive):
            continue
        slot = last_slot(spec.trigger, now, spec.misfire_grace_s)
        if slot is None:
            continue
        row = slot_state(engine, spec.id, slot)
        lease = row.lease_until if row is not None else None
        if lease is not None and lease.tzinfo is None:
            lease = lease.replace(tzinfo=UTC)
        if row is None or (row.status == "running" and lease is not None and lease < now):
            out.append((spec, slot))
    return out


def reports_failure(outcome: Any) -> bool:
    """Whether a job that ran to its end says in its result that part of it failed: ``failed``
    as a nonzero count or a non-empty list (nightly_backups, restore_tests)."""
    return isinstance(outcome, dict) and bool(outcome.get("failed"))


def execute_manual(
    spec: JobSpec,
    fn: JobFn,
    *,
    events: Any,
    actor: str,
    clock: Clock = utc_now,
    owner: str | None = None,
    user: str | None = None,
    on_error: Callable[[str, str, BaseException], None] | None = None,
) -> RunResult:
    """Run ``spec`` now because someone asked (``dbops jobs run``), outside its schedule.

    A manual run is not a slot of the schedule, so it claims nothing in ``job_runs``: an
    operator re-running the backups at 02:00:30 neither takes nor blocks the 02:00 slot, which
    the scheduler still runs once, as it would have. Work that must not overlap guards itself
    (a backup holds its customer's lock). The body runs as if on time (``late_s`` 0, the slot
    being now), so what it posts is what the scheduled run would post. Its start and end are
    events marked ``manual``, with the actor (and ``user``, who asked).

    Unlike a scheduled run, ``ok`` is also False when the body ran to its end but reports
    failures in its result (``reports_failure``): the operator asked for the job to be done.
    """
    owner = owner or owner_id()
    now = clock()
    run_id = uuid.uuid4().hex[:12]
    base: dict[str, Any] = {"manual": True, "run": run_id, "owner": owner}
    if user:
        base["user"] = user
    events.append("job.start", spec.id, base, actor=actor)
    started = time.monotonic()
    try:
        outcome = fn(now, 0)
    except Exception as exc:
        error_id, failed = _failure(spec, base, exc, started, "manual run of")
        duration_ms = failed["duration_ms"]
        error = exc.message if isinstance(exc, DbopsError) else type(exc).__name__
        events.append("job.end", spec.id, failed, actor=actor)
        if on_error is not None:
            on_error(spec.id, error_id, exc)
        return RunResult(
            spec.id,
            now,
            ran=True,
            ok=False,
            error_id=error_id,
            manual=True,
            error=error,
            duration_ms=duration_ms,
        )
    duration_ms = int((time.monotonic() - started) * 1000)
    ok = not reports_failure(outcome)
    events.append(
        "job.end",
        spec.id,
        {
            **base,
            "outcome": "ok" if ok else "failed",
            "result": outcome,
            "duration_ms": duration_ms,
        },
        actor=actor,
    )
    return RunResult(
        spec.id, now, ran=True, ok=ok, outcome=outcome, manual=True, duration_ms=duration_ms
    )


def jobs_table(specs: list[JobSpec], now: datetime, tz: tzinfo) -> list[dict[str, Any]]:
    """Each job, its trigger and its next run (UTC and ``tz``): `dbops jobs`, `/db jobs`."""
    rows = []
    for spec in specs:
        nxt = next_runs(spec.trigger, now, 1)
        rows.append(
            {
                "id": spec.id,
                "description": spec.description,
                "trigger": str(spec.trigger),
                "next_run_utc": nxt[0].astimezone(UTC).isoformat() if nxt else None,
                "next_run_local": nxt[0].astimezone(tz).isoformat() if nxt else None,
                "misfire_grace_s": spec.misfire_grace_s,
                "exactly_once": spec.exclusive,
            }
        )
    return rows
