"""Escalation: timers that page the people on call until someone acknowledges.

When a P0 or P1 incident opens, its whole escalation plan is written as rows of
``escalation_timers`` in the same transaction as the incident (fleet.toml ``[escalation]``):

    round r starts at  opened + r * (max(ack_timeout, channel_after) + ack_timeout)
    step 0  +0                a DM to the primary on call
    step 1  +ack_timeout      a DM to the secondary
    step 2  +channel_after    a post in the escalation channel
    rounds  1 + repeat        (repeat = 0 pages each once)

P2 and P3 are low urgency: a DM to the primary at open, no escalation (as PagerDuty's
low-urgency rules do; nobody is woken for a P3). A P0 also gets a reminder every 15 minutes,
to its owner (else the primary), to send the customers an update (SOP-201).

Each row carries the incident's ``token`` at the time it was planned. Ack, mitigate, resolve and
merge give the incident a new token (and mark its pending pages cancelled), so a timer that
still fires with an old token, or for an incident no longer open, is a no-op ("stale").

``Escalator.tick(now)`` claims the due rows atomically (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) for a lease, sends them, records one event per step
(source ``escalation``, source_id ``timer-<id>``) and marks them done. A worker killed mid-step
leaves its claim to lapse; the next tick after the lease retries the step, and skips the send
when the step's event shows it already went out. So a restart neither drops nor doubles a step;
the one window left is between a message leaving and its event being written (a crash there
resends it after the lease: better twice than never).

Holds (core.windows, core.flapping): a page or reminder due while its incident's subject is
in a maintenance window is not sent but *held*: the incident's pending pages move later
together (the plan keeps its spacing) so the first comes due when the cover ends, event
``escalation.held``. Steps planned before the window started obey this too. Ending a window
early brings its held steps back to now (``release_held``). A page due after a window, for an
incident that recovered inside a window covering it, is dropped: a failure that recovered
inside a window pages no one. A page of an incident whose key is flapping is held the same way
until the flapping stops (or for ``FLAP_WINDOW``). Incidents opened by hand are never held:
someone chose to open them. One more kind of step, ``flap``, is the one message saying a key
is flapping.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from core.flapping import FLAP_CHANGES as FLAP_CHANGES_SAID
from core.flapping import FLAP_WINDOW, FlapTracker
from core.fleet import Escalation, Fleet
from core.notify import Message, MessageRef, Notifier, NotifyError, inert
from core.oncall import OnCallNow, current
from core.windows import Cover, Window, cover_of_incident, load_windows
from storage.db import is_sqlite
from storage.events import EventLog, NewEvent
from storage.models import Event
from storage.models_incidents import EscalationTimer, IncidentRow, aware, utc, write_session

log = logging.getLogger("dbops.escalation")

PAGE = "page"
REMINDER = "reminder"
FLAP = "flap"  # the one message saying an incident's check is flapping
HELD = "held:"  # a pending step's outcome while it is held: held:mw-<id> or held:flap
# How far back a window can explain a recovery (a window is at most a week long).
RECENT_WINDOWS = timedelta(days=8)
ESCALATING = frozenset({"P0", "P1"})
REMINDER_EVERY = timedelta(minutes=15)
# How long a claimed step is a worker's own; after that another worker may retry it. Far
# longer than one send (a Slack call), far shorter than any ack timeout worth configuring.
LEASE = timedelta(seconds=60)
RETRY_AFTER = timedelta(seconds=20)
MAX_ATTEMPTS = 5
BATCH = 500
_REMINDER_TOKEN = "reminder"  # noqa: S105  (a timer token, not a secret)
_STEPS = ((0, "primary"), (1, "secondary"), (2, "channel"))

TIMERS = EscalationTimer.__table__  # type: ignore[attr-defined]
INCIDENTS = IncidentRow.__table__  # type: ignore[attr-defined]
EVENTS = Event.__table__  # type: ignore[attr-defined]


def new_token() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PlannedStep:
    round: int
    step: int
    target: str
    offset: timedelta


def plan(policy: Escalation, severity: str) -> list[PlannedStep]:
    """The page steps of an incident of ``severity``, as offsets from when it opened."""
    if severity not in ESCALATING:
        return [PlannedStep(0, 0, "primary", timedelta(0))]
    offsets = {0: timedelta(0), 1: policy.ack_timeout, 2: policy.channel_after}
    cycle = max(policy.ack_timeout, policy.channel_after) + policy.ack_timeout
    steps = [
        PlannedStep(r, step, target, r * cycle + offsets[step])
        for r in range(1 + policy.repeat)
        for step, target in _STEPS
    ]
    return sorted(steps, key=lambda s: (s.offset, s.round, s.step))


def schedule_pages(
    session: Session,
    incident_id: int,
    token: str,
    start: datetime,
    policy: Escalation,
    severity: str,
) -> int:
    """Write the incident's page steps (inside the caller's transaction)."""
    steps = plan(policy, severity)
    for s in steps:
        session.add(
            EscalationTimer(
                incident_id=incident_id,
                kind=PAGE,
                round=s.round,
                step=s.step,
                target=s.target,
                due_at=utc(start + s.offset),
                token=token,
            )
        )
    session.flush()
    return len(steps)


def schedule_reminder(session: Session, incident_id: int, due: datetime) -> None:
    """The next "send the customers an update" reminder (inside the caller's transaction)."""
    conn = session.connection()
    last = conn.execute(
        select(func.max(TIMERS.c.round)).where(
            TIMERS.c.incident_id == incident_id, TIMERS.c.kind == REMINDER
        )
    ).scalar()
    _insert_ignore(
        conn,
        {
            "incident_id": incident_id,
            "kind": REMINDER,
            "round": 0 if last is None else int(last) + 1,
            "step": 0,
            "target": "owner",
            "due_at": utc(due),
            "token": _REMINDER_TOKEN,
            "state": "pending",
            "attempts": 0,
        },
    )


def _insert_ignore(conn: Any, values: dict[str, Any]) -> None:
    """Insert a timer unless the same step exists (two workers chaining the same reminder)."""
    maker = sqlite_insert if is_sqlite(conn) else pg_insert
    conn.execute(maker(TIMERS).values(**values).on_conflict_do_nothing())


def cancel_pending(
    session: Session, incident_id: int, now: datetime, kinds: Sequence[str] = (PAGE,)
) -> int:
    """Mark an incident's pending timers of ``kinds`` cancelled; returns how many."""
    result = session.connection().execute(
        update(TIMERS)
        .where(
            TIMERS.c.incident_id == incident_id,
            TIMERS.c.state == "pending",
            TIMERS.c.kind.in_(kinds),
        )
        .values(state="cancelled", done_at=utc(now), outcome="cancelled")
    )
    return int(result.rowcount or 0)


def schedule_flap_notice(session: Session, incident_id: int, episode: int, due: datetime) -> None:
    """The one "this check is flapping" message of a flapping episode (inside the caller's
    transaction); the same episode twice is one message."""
    _insert_ignore(
        session.connection(),
        {
            "incident_id": incident_id,
            "kind": FLAP,
            "round": episode,
            "step": 0,
            "target": "primary",
            "due_at": utc(due),
            "token": FLAP,
            "state": "pending",
            "attempts": 0,
        },
    )


def hold_steps(
    conn: Any, incident_id: int, until: datetime, marker: str, worker_id: str | None = None
) -> int:
    """Move the incident's pending pages later, together, so the first is due at ``until``;
    its pending reminders to ``until`` at the earliest. Each is marked ``held:<marker>``, and a
    claim ``worker_id`` holds on one is given up. Idempotent: once the first page is at or
    after ``until`` nothing moves. Returns how many steps moved."""
    rows = conn.execute(
        select(TIMERS)
        .where(
            TIMERS.c.incident_id == incident_id,
            TIMERS.c.state == "pending",
            TIMERS.c.kind.in_((PAGE, REMINDER)),
        )
        .with_for_update()
    ).all()
    until = utc(until)
    pages = [r._mapping for r in rows if r._mapping["kind"] == PAGE]
    dues = [aware(m["due_at"]) for m in pages]
    earliest = min((d for d in dues if d is not None), default=None)
    shift = until - earliest if earliest is not None and earliest < until else timedelta(0)
    moved = 0
    for r in rows:
        m = r._mapping
        due = aware(m["due_at"])
        assert due is not None
        new_due = due + shift if m["kind"] == PAGE else max(due, until)
        mine = worker_id is not None and m["claimed_by"] == worker_id
        if new_due == due and not mine:
            continue
        values: dict[str, Any] = {"due_at": new_due, "outcome": f"{HELD}{marker}"[:200]}
        if mine:
            values.update(claimed_by=None, lease_until=None, attempts=max(0, m["attempts"] - 1))
        conn.execute(update(TIMERS).where(TIMERS.c.id == m["id"]).values(**values))
        moved += new_due != due
    return moved


def release_held(
    engine: Engine,
    marker: str,
    now: datetime,
    incident_ids: Sequence[int] | None = None,
    *,
    prefix: bool = False,
) -> list[int]:
    """Bring the steps held under ``marker`` (``mw-<id>``, ``flap``; with ``prefix``, every
    marker starting so: ``mw-`` is every window's) back: each incident's held pages move
    earlier together so the first is due ``now``; held reminders are due now. The pager then
    looks again (another window may still cover them). Returns the incidents."""
    now = utc(now)
    held = f"{HELD}{marker}"[:200]
    match = (
        TIMERS.c.outcome.startswith(held, autoescape=True) if prefix else TIMERS.c.outcome == held
    )
    cond = and_(TIMERS.c.state == "pending", match)
    if incident_ids is not None:
        if not incident_ids:
            return []
        cond = and_(cond, TIMERS.c.incident_id.in_(list(incident_ids)))
    with engine.connect() as conn:  # most releases find nothing: no write lock for those
        if conn.execute(select(TIMERS.c.id).where(cond).limit(1)).first() is None:
            return []
    touched: set[int] = set()
    with write_session(engine) as session:
        conn = session.connection()
        rows = [r._mapping for r in conn.execute(select(TIMERS).where(cond).with_for_update())]
        by_incident: dict[int, list[Any]] = {}
        for m in rows:
            by_incident.setdefault(m["incident_id"], []).append(m)
        for incident_id, steps in by_incident.items():
            pages = [m for m in steps if m["kind"] == PAGE]
            earliest = min((aware(m["due_at"]) or now for m in pages), default=now)
            shift = now - earliest if earliest > now else timedelta(0)
            for m in steps:
                due = aware(m["due_at"]) or now
                new_due = due + shift if m["kind"] == PAGE else min(due, now)
                conn.execute(
                    update(TIMERS)
                    .where(TIMERS.c.id == m["id"])
                    .values(due_at=new_due, outcome=None)
                )
            touched.add(incident_id)
    return sorted(touched)


def _next_reminder(due: datetime, now: datetime) -> datetime:
    """The next slot of the 15-minute cadence after ``now``: a worker that was down for an
    hour sends one late reminder, not four at once."""
    nxt = due + REMINDER_EVERY
    if nxt <= now:
        nxt += REMINDER_EVERY * ((now - nxt) // REMINDER_EVERY + 1)
    return nxt


# --- the ticker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timer:
    id: int
    incident_id: int
    kind: str
    round: int
    step: int
    target: str
    due_at: datetime
    token: str
    attempts: int
    outcome: str | None = None  # while pending: held:<marker> when a hold moved it

    @classmethod
    def from_row(cls, row: Any) -> Timer:
        m = row._mapping
        due = aware(m["due_at"])
        assert due is not None
        return cls(
            m["id"],
            m["incident_id"],
            m["kind"],
            m["round"],
            m["step"],
            m["target"],
            due,
            m["token"],
            m["attempts"],
            m["outcome"],
        )

    @property
    def source_id(self) -> str:
        return f"timer-{self.id}"


@dataclass(frozen=True)
class StepResult:
    """What a tick did with one due step.

    ``action``: dm, post (sent), nobody (no one to page: reported to the channel instead),
    stale (incident acked or resolved, or the token moved on), resent-skipped (sent before a
    restart), retry (transport failed, tried again later), failed (gave up).
    """

    timer_id: int
    incident_id: int
    kind: str
    round: int
    step: int
    target: str
    action: str
    to: str | None
    due_at: datetime
    at: datetime
    detail: str = ""

    @property
    def lag_s(self) -> float:
        return (self.at - self.due_at).total_seconds()

    def as_json(self) -> dict[str, Any]:
        return {
            "timer": self.timer_id,
            "incident": self.incident_id,
            "kind": self.kind,
            "round": self.round,
            "step": self.step,
            "target": self.target,
            "action": self.action,
            "to": self.to,
            "due_at": self.due_at.isoformat(),
            "at": self.at.isoformat(),
            "detail": self.detail,
        }


@dataclass
class _Decision:
    timer: Timer
    state: str  # done, stale, failed, retry
    result: StepResult
    event: NewEvent | None = None


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 90:
        return f"{s}s"
    if s < 90 * 60:
        return f"{round(s / 60)}m"
    if s < 36 * 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def _who(user: str | None) -> str:
    return f"<@{user}>" if user else "nobody"


def _where(ref: MessageRef | None) -> dict[str, Any]:
    """Where a page landed, for the event: settle_pages rewrites it once someone has it."""
    if ref is None or not ref.ts:
        return {}
    return {"message": {"channel": ref.channel, "ts": ref.ts}}


def page_text(inc: Any, timer: Timer, now: datetime, oncall: OnCallNow | None = None) -> str:
    """The words of a page. ``inc`` is an IncidentRow-like object."""
    opened = aware(inc.opened_at) or now
    age = _ago((now - opened).total_seconds())
    where = ", ".join(inc.customers) if inc.customers else (inc.server or "")
    # The title comes from whoever opened the incident (an alert's summary): its angle brackets
    # become look-alikes so `<!channel>` or a link in it is shown as text, never acted on.
    title = inert(inc.title)
    head = f"{inc.severity} inc-{inc.id}: {title}" + (f" ({inert(where)})" if where else "")
    ack = f"Ack with `/db incident ack {inc.id}`."
    again = f" Page {timer.round + 1}." if timer.round else ""
    if timer.kind == FLAP:
        return (
            f":warning: {head} is flapping: its check changed state "
            f"{FLAP_CHANGES_SAID} or more times within {int(FLAP_WINDOW.total_seconds() // 60)} "
            "min. No more pages for it until it holds steady for two sweeps; every change "
            f"stays on the incident's timeline (`/db log inc-{inc.id}`)."
        )
    if timer.kind == REMINDER:
        return (
            f"inc-{inc.id} ({inc.severity}) is still open after {age}: send the customers an "
            f"update (`/db incident email {inc.id} update`). SOP-201 promises one every 15 min."
        )
    if timer.target == "primary":
        return f":rotating_light: {head}, open {age}.{again} {ack}"
    if timer.target == "secondary":
        primary = _who(oncall.primary if oncall else None)
        return f":rotating_light: {head}, open {age} and not acknowledged by {primary}. {ack}"
    pair = f"{_who(oncall.primary)} / {_who(oncall.secondary)}" if oncall else "on call"
    return f":rotating_light: {head} has not been acknowledged in {age} (paged {pair}). {ack}"


class Escalator:
    """Sends due escalation steps. One per process; any number of processes may tick at once."""

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        notifier: Notifier,
        *,
        ops_channel: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        worker_id: str | None = None,
        lease: timedelta = LEASE,
        tz: tzinfo = UTC,
        batch: int = BATCH,
        send_workers: int = 1,
    ) -> None:
        self.engine = engine
        self.events = events
        self._fleet = fleet
        self.notifier = notifier
        self.ops_channel = ops_channel
        self.clock = clock
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:12]}"
        self.lease = lease
        self.tz = tz
        self.batch = batch
        self.send_workers = send_workers
        self._sqlite = is_sqlite(engine)

    @property
    def fleet(self) -> Fleet:
        return self._fleet() if callable(self._fleet) else self._fleet

    # -- claiming ----------------------------------------------------------------------------

    def _due(self, now: datetime, incident_id: int | None) -> Any:
        cond = and_(
            TIMERS.c.state == "pending",
            TIMERS.c.due_at <= now,
            or_(TIMERS.c.lease_until.is_(None), TIMERS.c.lease_until <= now),
        )
        return cond if incident_id is None else and_(cond, TIMERS.c.incident_id == incident_id)

    def claim(
        self, now: datetime, *, incident_id: int | None = None, limit: int = BATCH
    ) -> list[Timer]:
        """Take up to ``limit`` due steps for this worker until ``now + lease``. Atomic: a step
        is claimed by one worker at a time, whatever else is ticking."""
        now = utc(now)
        values = {
            "claimed_by": self.worker_id,
            "lease_until": now + self.lease,
            "attempts": TIMERS.c.attempts + 1,
        }
        due = self._due(now, incident_id)
        order = (TIMERS.c.due_at, TIMERS.c.id)
        # Most ticks find nothing due: look without a lock first, so an idle pager never takes
        # SQLite's write lock (or a PostgreSQL row lock) from the event log's writers.
        with self.engine.connect() as conn:
            if conn.execute(select(TIMERS.c.id).where(due).limit(1)).first() is None:
                return []
        if self._sqlite:
            opts = {"sqlite_begin": "IMMEDIATE"}
            with self.engine.connect().execution_options(**opts) as conn, conn.begin():
                ids = list(
                    conn.execute(
                        select(TIMERS.c.id).where(due).order_by(*order).limit(limit)
                    ).scalars()
                )
                if not ids:
                    return []
                conn.execute(update(TIMERS).where(TIMERS.c.id.in_(ids)).values(**values))
                rows = conn.execute(
                    select(TIMERS).where(TIMERS.c.id.in_(ids)).order_by(*order)
                ).all()
        else:
            with self.engine.begin() as conn:
                pick = (
                    select(TIMERS.c.id)
                    .where(due)
                    .order_by(*order)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
                rows = conn.execute(
                    update(TIMERS)
                    .where(TIMERS.c.id.in_(pick.scalar_subquery()))
                    .values(**values)
                    .returning(TIMERS)
                ).all()
        return sorted((Timer.from_row(r) for r in rows), key=lambda t: (t.due_at, t.id))

    # -- ticking -----------------------------------------------------------------------------

    def tick(
        self, now: datetime | None = None, *, incident_id: int | None = None
    ) -> list[StepResult]:
        """Send every step due at ``now`` (default: the clock); returns what was done."""
        now = utc(now or self.clock())
        results: list[StepResult] = []
        while True:
            claimed = self.claim(now, incident_id=incident_id, limit=self.batch)
            if not claimed:
                return results
            results += self._run(claimed, now)
            if len(claimed) < self.batch:
                return results

    def _incidents(self, ids: Iterable[int]) -> dict[int, Any]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(INCIDENTS).where(INCIDENTS.c.id.in_(sorted(set(ids))))).all()
        return {r._mapping["id"]: _IncidentView(r._mapping) for r in rows}

    def _already_sent(self, timers: Sequence[Timer]) -> set[int]:
        """Steps whose event exists: a worker sent them and died before marking them done."""
        if not timers:
            return set()
        by_source = {t.source_id: t.id for t in timers}
        with self.engine.connect() as conn:
            found = conn.execute(
                select(EVENTS.c.source_id).where(
                    EVENTS.c.source == "escalation", EVENTS.c.source_id.in_(list(by_source))
                )
            ).scalars()
            return {by_source[s] for s in found}

    def _run(self, claimed: list[Timer], now: datetime) -> list[StepResult]:
        incidents = self._incidents(t.incident_id for t in claimed)
        already = self._already_sent([t for t in claimed if t.attempts > 1])
        oncall: OnCallNow | None = None
        if any(t.kind in (PAGE, REMINDER, FLAP) for t in claimed):
            oncall = current(self.engine, self.fleet, now=now, tz=self.tz)
        holds = self._holds(claimed, incidents, now)
        work: list[tuple[Timer, Any]] = []
        decisions: list[_Decision] = []
        held: dict[int, _Hold] = {}
        for t in claimed:
            inc = incidents.get(t.incident_id)
            if inc is None or self._stale(t, inc):
                decisions.append(self._decide(t, "stale", "stale", None, now))
            elif t.id in already:
                decisions.append(self._decide(t, "done", "resent-skipped", None, now))
            elif (hold := holds.hold(t, inc, now)) is not None:
                held[t.incident_id] = hold
                decisions.append(self._decide(t, "held", "held", None, now, hold.why))
            elif (window := holds.recovered_in_window(t, inc)) is not None:
                why = f"recovered in maintenance {window}"
                decisions.append(self._decide(t, "cancelled", "dropped", None, now, why))
            else:
                work.append((t, inc))
        if held:
            self._hold(held, now)
        if self.send_workers > 1 and len(work) > 1:
            with ThreadPoolExecutor(self.send_workers, thread_name_prefix="escalate") as pool:
                decisions += list(pool.map(lambda w: self._send(w[0], w[1], oncall, now), work))
        else:
            decisions += [self._send(t, inc, oncall, now) for t, inc in work]
        self.events.append_many([d.event for d in decisions if d.event is not None])
        self._finish(decisions, now, incidents)
        return [d.result for d in sorted(decisions, key=lambda d: (d.timer.due_at, d.timer.id))]

    @staticmethod
    def _stale(t: Timer, inc: Any) -> bool:
        if t.kind == REMINDER:
            return bool(inc.status == "resolved" or inc.severity != "P0")
        if t.kind == FLAP:
            return bool(inc.status == "resolved")
        return bool(t.token != inc.token or inc.status != "open")

    def _holds(self, claimed: Sequence[Timer], incidents: dict[int, Any], now: datetime) -> _Holds:
        """What may hold the claimed steps: the windows of the last week and ahead, and which
        incidents' keys are flapping (read once per batch, only when a step may be held)."""
        watched = [
            incidents[t.incident_id]
            for t in claimed
            if t.kind in (PAGE, REMINDER) and t.incident_id in incidents
        ]
        watched = [inc for inc in watched if inc.kind != "manual"]
        if not watched:
            return _Holds([], set())
        windows = load_windows(self.engine, now, since=now - RECENT_WINDOWS)
        keys = {inc.dedupe_key for inc in watched if inc.dedupe_key}
        flapping = FlapTracker(self.engine).flapping(keys, now) if keys else set()
        return _Holds(windows, flapping)

    def _hold(self, held: dict[int, _Hold], now: datetime) -> None:
        """Move the held incidents' steps (``hold_steps``) and say so once per hold."""
        events = []
        with write_session(self.engine) as session:
            conn = session.connection()
            for incident_id, hold in sorted(held.items()):
                moved = hold_steps(conn, incident_id, hold.until, hold.marker, self.worker_id)
                events.append(
                    NewEvent(
                        "escalation.held",
                        f"inc-{incident_id}",
                        {
                            "until": hold.until,
                            "reason": hold.why,
                            "window": hold.window,
                            "moved": moved,
                            "worker": self.worker_id,
                        },
                        actor="dbops",
                        source="escalation",
                        source_id=f"held-{incident_id}-{hold.marker}-{iso_z(hold.until)}",
                        ts=now,
                    )
                )
        self.events.append_many(events)

    def _decide(
        self,
        t: Timer,
        state: str,
        action: str,
        to: str | None,
        now: datetime,
        detail: str = "",
        event: NewEvent | None = None,
    ) -> _Decision:
        at = utc(self.clock()) if state == "done" and action in ("dm", "post") else now
        at = max(at, now)
        result = StepResult(
            t.id, t.incident_id, t.kind, t.round, t.step, t.target, action, to, t.due_at, at, detail
        )
        return _Decision(t, state, result, event)

    def _event(
        self, t: Timer, kind: str, to: str | None, extra: dict[str, Any] | None = None
    ) -> NewEvent:
        payload = {
            "timer": t.id,
            "kind": t.kind,
            "round": t.round,
            "step": t.step,
            "target": t.target,
            "to": to,
            "due_at": t.due_at,
            "worker": self.worker_id,
            **(extra or {}),
        }
        return NewEvent(
            kind,
            f"inc-{t.incident_id}",
            payload,
            actor="dbops",
            source="escalation",
            source_id=t.source_id,
            ts=utc(self.clock()),
        )

    def _send(self, t: Timer, inc: Any, oncall: OnCallNow | None, now: datetime) -> _Decision:
        text = page_text(inc, t, now, oncall)
        meta = {
            "incident": t.incident_id,
            "actions": ["ack"] if t.kind == PAGE else [],
            # One message per step, however often the step is tried: a retry after a crash
            # between the send and the step's event finds the outbox row it made.
            "outbox_key": f"escalation-{t.source_id}",
        }
        message = Message(text, meta=meta)
        channel = (oncall.escalation_channel if oncall else None) or self.ops_channel
        user: str | None
        if t.kind == REMINDER:
            user = inc.owner or (oncall.primary if oncall else None)
        elif t.target in ("primary", "secondary"):
            user = oncall.user(t.target) if oncall else None
        else:
            user = None
        try:
            if t.target == "channel" and t.kind == PAGE:
                if channel is None:
                    return self._nobody(t, inc, None, now, "no escalation channel is configured")
                ref = self.notifier.post(channel, message)
                event = self._event(t, "escalation.post", channel, _where(ref))
                return self._decide(t, "done", "post", channel, now, event=event)
            if user is None:
                return self._nobody(t, inc, channel, now, f"nobody is on call as {t.target}")
            ref = self.notifier.dm(user, message)
            kind = "escalation.reminder" if t.kind == REMINDER else "escalation.dm"
            event = self._event(t, kind, user, _where(ref) if t.kind == PAGE else None)
            return self._decide(t, "done", "dm", user, now, event=event)
        except NotifyError as exc:
            return self._failed(t, exc, now)
        except Exception as exc:
            # A transport bug must not lose the batch: the steps already sent here still get
            # their events and are marked done; this one is retried like a transient failure.
            log.exception("escalation step %s: the notifier raised", t.id)
            return self._failed(t, NotifyError(f"{type(exc).__name__}: {exc}"[:300]), now)

    def _nobody(
        self, t: Timer, inc: Any, channel: str | None, now: datetime, why: str
    ) -> _Decision:
        """Nobody to page is itself an alert: said in the channel (when there is one), logged."""
        if channel is not None:
            role = t.target if t.target in ("primary", "secondary") else "primary"
            text = (
                f":warning: {why}: {inc.severity} inc-{inc.id} ({inc.title}) is paging no one. "
                f"Ack with `/db incident ack {inc.id}`; set someone with "
                f"`/db oncall set {role} @user`."
            )
            ref = self.notifier.post(
                channel, Message(text, meta={"incident": inc.id, "actions": ["ack"]})
            )
            where = _where(ref)
        else:
            where = {}
        event = self._event(t, "escalation.nobody_oncall", channel, {"reason": why, **where})
        return self._decide(t, "done", "nobody", channel, now, why, event)

    def _failed(self, t: Timer, exc: NotifyError, now: datetime) -> _Decision:
        if exc.permanent or t.attempts >= MAX_ATTEMPTS:
            log.warning("escalation step %s failed for good: %s", t.id, exc.message)
            event = self._event(
                t, "escalation.failed", None, {"error": exc.message[:300], "attempts": t.attempts}
            )
            return self._decide(t, "failed", "failed", None, now, exc.message[:200], event)
        log.info("escalation step %s failed (attempt %s), retrying: %s", t.id, t.attempts, exc)
        return self._decide(t, "retry", "retry", None, now, exc.message[:200])

    def _finish(self, decisions: list[_Decision], now: datetime, incidents: dict[int, Any]) -> None:
        if not decisions:
            return
        with write_session(self.engine) as session:
            conn = session.connection()
            for d in decisions:
                mine = and_(
                    TIMERS.c.id == d.timer.id,
                    TIMERS.c.claimed_by == self.worker_id,
                    TIMERS.c.state == "pending",
                )
                if d.state == "retry":
                    conn.execute(update(TIMERS).where(mine).values(lease_until=now + RETRY_AFTER))
                    continue
                if d.state == "held":
                    continue  # hold_steps moved it and gave up the claim
                done = conn.execute(
                    update(TIMERS)
                    .where(mine)
                    .values(state=d.state, done_at=d.result.at, outcome=d.result.action[:200])
                )
                inc = incidents.get(d.timer.incident_id)
                if (
                    done.rowcount
                    and d.timer.kind == REMINDER
                    and d.state == "done"
                    and inc is not None
                    and inc.status != "resolved"
                ):
                    _insert_ignore(
                        conn,
                        {
                            "incident_id": d.timer.incident_id,
                            "kind": REMINDER,
                            "round": d.timer.round + 1,
                            "step": 0,
                            "target": "owner",
                            "due_at": _next_reminder(d.timer.due_at, now),
                            "token": _REMINDER_TOKEN,
                            "state": "pending",
                            "attempts": 0,
                        },
                    )

    # -- once someone has it ------------------------------------------------------------------

    def settle_pages(self, inc: Any, done: str, actor: str, now: datetime) -> int:
        """Rewrite the pages already sent for ``inc`` (DMs, the escalation channel): who took
        it, and no Ack button any more, so nobody woken later acts on a page that is over.
        Best effort: a page that cannot be updated is logged. Returns how many were updated."""
        refs = []
        for e in self.events.query(subject=f"inc-{inc.id}", kind_prefix="escalation.", limit=500):
            where = e.payload.get("message")
            if isinstance(where, dict) and where.get("channel") and where.get("ts"):
                refs.append(MessageRef(str(where["channel"]), str(where["ts"])))
        if not refs:
            return 0
        title = inert(inc.title)
        opened = aware(inc.opened_at) or now
        text = (
            f":white_check_mark: {inc.severity} inc-{inc.id}: {title} was {done} by "
            f"{_who(actor)}, {_ago((now - opened).total_seconds())} after it opened. "
            "Nothing more to do here."
        )
        updated = 0
        for ref in dict.fromkeys(refs):
            try:
                self.notifier.update(ref, Message(text, meta={"incident": inc.id, "actions": []}))
                updated += 1
            except Exception as exc:
                log.warning("could not settle a page of inc-%s: %s", inc.id, exc)
        return updated

    # -- reading -----------------------------------------------------------------------------

    def next_due(self) -> datetime | None:
        """When the next pending step can be claimed (its due time, or its lease's end)."""
        when = func.min(func.coalesce(TIMERS.c.lease_until, TIMERS.c.due_at))
        with self.engine.connect() as conn:
            value = conn.execute(select(when).where(TIMERS.c.state == "pending")).scalar()
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return aware(value)

    def pending(self, incident_id: int | None = None) -> list[Timer]:
        stmt = (
            select(TIMERS).where(TIMERS.c.state == "pending").order_by(TIMERS.c.due_at, TIMERS.c.id)
        )
        if incident_id is not None:
            stmt = stmt.where(TIMERS.c.incident_id == incident_id)
        with self.engine.connect() as conn:
            return [Timer.from_row(r) for r in conn.execute(stmt)]

    # -- running -----------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Tick until ``stop`` is set, waking at the next due step or every ``interval``."""
        while not stop.is_set():
            try:
                self.tick()
                nxt = self.next_due()
            except Exception:  # a database blip must not end the pager
                log.exception("escalation tick failed; retrying in %ss", interval)
                nxt = None
            wait = interval
            if nxt is not None:
                wait = min(interval, max(0.0, (nxt - utc(self.clock())).total_seconds()))
            stop.wait(wait)


class _IncidentView:
    """The incident columns a page needs, from a Core row."""

    def __init__(self, m: Any) -> None:
        self.id: int = m["id"]
        self.title: str = m["title"]
        self.severity: str = m["severity"]
        self.status: str = m["status"]
        self.token: str = m["token"]
        self.owner: str | None = m["owner"]
        self.server: str | None = m["server"]
        customers = m["customers"]
        self.customers: list[str] = list(customers or [])
        self.opened_at: datetime | None = aware(m["opened_at"])
        self.kind: str = m["kind"]
        self.dedupe_key: str | None = m["dedupe_key"]
        self.recovered_at: datetime | None = aware(m["recovered_at"])


def iso_z(ts: datetime) -> str:
    return utc(ts).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class _Hold:
    until: datetime
    marker: str  # mw-<id>, flap
    why: str
    window: str | None


class _Holds:
    """What holds a step back: a window covering its incident now, or its key flapping; and
    which pages to drop (their incident recovered inside a window that covered it)."""

    def __init__(self, windows: Sequence[Window], flapping: set[str]) -> None:
        self.windows = list(windows)
        self.flapping = flapping

    def _cover(self, inc: _IncidentView, now: datetime) -> Cover | None:
        return cover_of_incident(self.windows, now, inc.server, inc.customers)

    def hold(self, t: Timer, inc: _IncidentView, now: datetime) -> _Hold | None:
        if t.kind not in (PAGE, REMINDER) or inc.kind == "manual":
            return None
        cover = self._cover(inc, now) if self.windows else None
        if cover is not None:
            lead = cover.window
            why = f"maintenance {lead.ref} until {iso_z(cover.until)}: {lead.reason}"[:200]
            return _Hold(cover.until, lead.ref, why, lead.ref)
        if t.kind == PAGE and inc.dedupe_key in self.flapping:
            return _Hold(now + FLAP_WINDOW, "flap", "flapping", None)
        return None

    def recovered_in_window(self, t: Timer, inc: _IncidentView) -> str | None:
        """The window the incident recovered in, when that window covered it (a page due
        after it is dropped); None otherwise."""
        if t.kind != PAGE or inc.kind == "manual" or inc.recovered_at is None:
            return None
        cover = self._cover(inc, inc.recovered_at) if self.windows else None
        return cover.window.ref if cover is not None else None


# --- the worker process ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.escalation --db URL --fleet FILE --jsonl OUT``: a ticker whose messages
    go to a JSON-lines file (the bot's scheduler runs the same loop with the Slack notifier)."""
    from core.fleet import load_fleet
    from core.notify import JsonlNotifier
    from storage.db import make_engine

    parser = argparse.ArgumentParser(prog="python -m core.escalation")
    parser.add_argument("--db", required=True, help="DATABASE_URL")
    parser.add_argument("--fleet", required=True, help="fleet.toml")
    parser.add_argument("--jsonl", required=True, help="append sent messages to this file")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--ops-channel", default=None)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--lease", type=float, default=LEASE.total_seconds())
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = make_engine(args.db)
    escalator = Escalator(
        engine,
        EventLog(engine),
        load_fleet(args.fleet),
        JsonlNotifier(args.jsonl),
        ops_channel=args.ops_channel,
        worker_id=args.worker_id,
        lease=timedelta(seconds=args.lease),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"escalation worker {escalator.worker_id} ticking", flush=True)
    escalator.run(stop, interval=args.interval)
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
