"""The outbox: every message dbops sends to people, kept in the database until it has gone.

A message is first a row of ``outbox`` (storage/models_outbox.py), written in the same
transaction as its ``message.queued`` event; then a courier sends it, either at once (the
caller's own attempt: the common path costs one more transaction than a plain send) or later,
from the worker that runs in ``dbops serve`` and ``dbops scheduler``. The transport (Slack's Web
API, bot/outbox.py) is behind the small ``Transport`` protocol; nothing here knows Slack.

How a row moves:

- It is claimed with a lease (``status = sending``, ``lease_owner``, ``lease_until``) by a
  conditional UPDATE, so of any number of workers on one database exactly one holds it; a row
  born from the caller's own attempt is claimed when it is inserted. Every later change is
  conditional on still holding the lease.
- Sent: its channel and ts are recorded with a ``message.sent`` event, in one transaction.
- Rate limited: back to ``pending`` with ``next_at = now + Retry-After``, and this process
  sends nothing more with that method until then. Transient errors back off (1 s doubling to
  5 min) and give up after ``MAX_ATTEMPTS``.
- Refused for good (an unknown channel, a revoked token, a message Slack will never take):
  ``failed`` with a ``message.failed`` event and, in the same transaction, the notices that
  tell a person (see ``Courier._notices``); it shows in /healthz until a later send to the same
  place works.
- Never twice: a post carries its key in the message itself (the transport's job: Slack message
  metadata). A row whose earlier attempt may have reached Slack (no answer came, or its worker
  died with the lease) is ``in_doubt``: before sending it again the courier asks the transport
  to find it, and adopts the message found.

A reference to a message not sent yet is ``MessageRef(target, "outbox:<id>")``: a thread reply
to it, or an update of it, waits for its ts (``parent_id``). Updates of one message go in
order, and a newer one makes the older ones still pending pointless (``superseded``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, and_, exists, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from storage.db import is_sqlite
from storage.events import EventLog, NewEvent, StoredEvent
from storage.models_outbox import OutboxRow

log = logging.getLogger("dbops.outbox")

T = OutboxRow.__table__  # type: ignore[attr-defined]
PLACEHOLDER = "outbox:"
# A claim lasts this long. A send is cut off by the transport's own timeout (10 s) well within
# it, so a worker that still holds a lease is never racing a takeover of the same row.
LEASE_S = 60.0
POLL_S = 1.0  # how often an idle worker looks for due rows
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 300.0
MAX_ATTEMPTS = 30  # transient failures before a row is given up (about two hours)
LOOK_BACK_S = 120.0  # how far before a row's first attempt its message is looked for (skew)
# Rows done with are kept this long (a caller's "outbox:<id>" reference resolves through its
# row: an incident card's update weeks later), then pruned by the worker once an hour.
KEEP = timedelta(days=30)
PRUNE_EVERY_S = 3600.0
PARENT_FAILED = "parent_failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _aware(ts: datetime | None) -> datetime | None:
    return None if ts is None else _utc(ts)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def placeholder(row_id: int) -> str:
    """The ts a caller holds for a message that has not gone out yet."""
    return f"{PLACEHOLDER}{row_id}"


def placeholder_id(ts: str | None) -> int | None:
    if ts and ts.startswith(PLACEHOLDER) and ts[len(PLACEHOLDER) :].isdigit():
        return int(ts[len(PLACEHOLDER) :])
    return None


@dataclass(frozen=True)
class Row:
    id: int
    key: str
    kind: str
    target: str
    thread: str | None
    parent_id: int | None
    about: str | None
    payload: dict[str, Any]
    status: str
    attempts: int
    next_at: datetime
    lease_owner: str | None
    lease_until: datetime | None
    first_attempt_at: datetime | None
    in_doubt: bool
    channel: str | None
    ts: str | None
    error: str | None
    depth: int
    notice_of: int | None
    created_at: datetime

    @classmethod
    def of(cls, row: Any) -> Row:
        m = row._mapping
        payload = m["payload"]
        return cls(
            id=m["id"],
            key=m["key"],
            kind=m["kind"],
            target=m["target"],
            thread=m["thread"],
            parent_id=m["parent_id"],
            about=m["about"],
            payload=dict(payload) if isinstance(payload, Mapping) else {},
            status=m["status"],
            attempts=m["attempts"],
            next_at=_utc(m["next_at"]),
            lease_owner=m["lease_owner"],
            lease_until=_aware(m["lease_until"]),
            first_attempt_at=_aware(m["first_attempt_at"]),
            in_doubt=bool(m["in_doubt"]),
            channel=m["channel"],
            ts=m["ts"],
            error=m["error"],
            depth=m["depth"],
            notice_of=m["notice_of"],
            created_at=_utc(m["created_at"]),
        )

    @property
    def text(self) -> str:
        return str(self.payload.get("text") or "")

    @classmethod
    def unsaved(
        cls, kind: str, target: str, payload: Mapping[str, Any], key: str, thread: str | None
    ) -> Row:
        """A row that could not be stored (the database is down), for a send without one."""
        now = utcnow()
        return cls(
            0, key, kind, target, thread, None, None, dict(payload), "sending", 1, now,
            None, None, now, False, None, None, None, 0, None, now,
        )  # fmt: skip


@dataclass(frozen=True)
class Landed:
    """Where a message is: the transport's channel id and ts."""

    channel: str
    ts: str


class SendError(Exception):
    """A send (or a look) that did not work. ``retry_after``: the transport was told to wait
    that many seconds (a 429). ``transient``: worth trying again. ``in_doubt``: the message may
    have been taken even so (no answer came). Otherwise the refusal is for good."""

    def __init__(
        self,
        error: str,
        *,
        retry_after: float | None = None,
        transient: bool = False,
        in_doubt: bool = False,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.retry_after = retry_after
        self.transient = transient or retry_after is not None or in_doubt
        self.in_doubt = in_doubt


class Transport(Protocol):
    def send(self, row: Row, channel: str, thread: str | None) -> Landed:
        """Send ``row`` to ``channel`` (a post's channel, a DM's user, an update's channel) in
        ``thread`` (a post's thread ts; the ts an update rewrites). Raises SendError."""
        ...

    def find(self, row: Row, channel: str, thread: str | None, oldest: datetime) -> Landed | None:
        """The message ``row`` posted at or after ``oldest``, if it is there. Raises SendError
        when it cannot look."""
        ...

    def method(self, row: Row) -> str:
        """The rate-limited method ``row`` is sent with (a 429 pauses that method)."""
        ...


@dataclass(frozen=True)
class Failure:
    """Failed rows not yet cleared, grouped by where they went and why (for /healthz)."""

    kind: str
    target: str
    error: str
    count: int


@dataclass(frozen=True)
class _New:
    kind: str
    target: str
    payload: dict[str, Any]
    thread: str | None = None
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    depth: int = 0
    notice_of: int | None = None


def failures(engine: Engine) -> list[Failure]:
    """Failed rows nobody has cleared, by (kind, target, error); a reply that failed only
    because its parent did is counted with the parent."""
    stmt = (
        select(T.c.kind, T.c.target, T.c.error, func.count())
        .where(T.c.status == "failed", T.c.cleared_at.is_(None), T.c.error != PARENT_FAILED)
        .group_by(T.c.kind, T.c.target, T.c.error)
        .order_by(func.min(T.c.id))
    )
    with engine.connect() as conn:
        return [Failure(k, t, e or "unknown_error", int(n)) for k, t, e, n in conn.execute(stmt)]


class LeaseLost(Exception):
    """The row was taken over by another worker: this one changes nothing more."""


class Outbox:
    """The outbox table on one engine: enqueue, claim, settle; no transport."""

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        *,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
        lease_s: float = LEASE_S,
    ) -> None:
        self.engine = engine
        self.events = events
        self.clock = clock
        self.owner = owner or owner_id()
        self.lease = timedelta(seconds=lease_s)
        self._sqlite = is_sqlite(engine)

    def now(self) -> datetime:
        return _utc(self.clock())

    # -- enqueueing ----------------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        target: str,
        payload: Mapping[str, Any],
        *,
        thread: str | None = None,
        key: str | None = None,
        claim: bool = True,
    ) -> Row:
        """Write the row and its ``message.queued`` event in one transaction; returns the row.

        With ``claim`` the row is born claimed by this outbox (``sending``, under its lease) when
        it can go now, for the caller to send at once. The same ``key`` twice is one row: the
        second call returns the first row, whatever its state.
        """
        if kind not in ("post", "dm", "update"):
            raise ValueError(f"unknown outbox kind {kind!r}")
        new = _New(kind, target, dict(payload), thread, key or uuid.uuid4().hex)
        now = self.now()
        made: list[Row] = []

        def insert(conn: Connection, _stored: list[StoredEvent]) -> None:
            made[:] = [self._insert(conn, new, now, claim=claim)]

        self.events.append_many([self._queued(new)], within=insert)
        return made[0]

    def _queued(self, new: _New) -> NewEvent:
        text = str(new.payload.get("text") or "")
        return NewEvent(
            "message.queued",
            new.target[:200],
            {"how": new.kind, "key": new.key, "thread": new.thread, "text": text[:500]},
            actor="dbops",
            source="outbox",
            source_id=new.key,
        )

    def _insert(self, conn: Connection, new: _New, now: datetime, *, claim: bool) -> Row:
        known = conn.execute(select(T).where(T.c.key == new.key)).first()
        if known is not None:  # the same message again: it is the row already stored
            return Row.of(known)
        parent_id = placeholder_id(new.thread)
        parent = self._row(conn, parent_id) if parent_id is not None else None
        thread, about = new.thread, None
        if parent_id is not None and parent is None:
            # A placeholder from another database (or a row pruned since): no ts to wait for.
            parent_id, thread = None, None
        if new.kind == "update":
            if parent is None and new.thread:
                parent = self._sent_as(conn, new.target, new.thread)
                parent_id = parent.id if parent is not None else None
            about = f"{PLACEHOLDER}{parent_id}" if parent_id else f"{new.target}/{new.thread}"
            # Only the newest update of a message needs sending.
            conn.execute(
                update(T)
                .where(T.c.about == about, T.c.kind == "update", T.c.status == "pending")
                .values(status="superseded", updated_at=now)
            )
        ready = claim and (parent is None or parent.status == "sent")
        if ready and about is not None:
            ready = not self._update_in_flight(conn, about, now)
        values = {
            "key": new.key,
            "kind": new.kind,
            "target": new.target[:200],
            "thread": thread,
            "parent_id": parent_id,
            "about": about,
            "payload": new.payload,
            "status": "sending" if ready else "pending",
            "attempts": 1 if ready else 0,
            "next_at": now,
            "lease_owner": self.owner if ready else None,
            "lease_until": now + self.lease if ready else None,
            "first_attempt_at": now if ready else None,
            "in_doubt": False,
            "depth": new.depth,
            "notice_of": new.notice_of,
            "created_at": now,
            "updated_at": now,
        }
        maker = sqlite_insert if self._sqlite else pg_insert
        conn.execute(maker(T).values(**values).on_conflict_do_nothing(index_elements=["key"]))
        return Row.of(conn.execute(select(T).where(T.c.key == new.key)).one())

    @staticmethod
    def _row(conn: Connection, row_id: int) -> Row | None:
        found = conn.execute(select(T).where(T.c.id == row_id)).first()
        return Row.of(found) if found is not None else None

    @staticmethod
    def _sent_as(conn: Connection, channel: str, ts: str) -> Row | None:
        found = conn.execute(
            select(T)
            .where(
                T.c.ts == ts,
                T.c.kind != "update",
                or_(T.c.channel == channel, T.c.target == channel),
            )
            .limit(1)
        ).first()
        return Row.of(found) if found is not None else None

    @staticmethod
    def _update_in_flight(
        conn: Connection, about: str, now: datetime, below: int | None = None
    ) -> bool:
        cond = [
            T.c.about == about,
            T.c.kind == "update",
            T.c.status == "sending",
            T.c.lease_until >= now,
        ]
        if below is not None:
            cond.append(T.c.id < below)
        return conn.execute(select(T.c.id).where(*cond).limit(1)).first() is not None

    # -- reading -------------------------------------------------------------------------------

    def get(self, row_id: int) -> Row | None:
        with self.engine.connect() as conn:
            return self._row(conn, row_id)

    def by_key(self, key: str) -> Row | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(T).where(T.c.key == key)).first()
        return Row.of(found) if found is not None else None

    def rows(self, *, status: str | None = None) -> list[Row]:
        stmt = select(T).order_by(T.c.id)
        if status is not None:
            stmt = stmt.where(T.c.status == status)
        with self.engine.connect() as conn:
            return [Row.of(r) for r in conn.execute(stmt)]

    def due(self, limit: int = 20) -> list[int]:
        """Rows that can be claimed now, oldest first: pending and due, or claimed by a worker
        whose lease has passed; a row waiting for its parent's ts only once the parent is done."""
        now = self.now()
        parent = T.alias("parent")
        parent_done = exists(
            select(parent.c.id).where(
                parent.c.id == T.c.parent_id, parent.c.status.in_(("sent", "failed"))
            )
        )
        stmt = (
            select(T.c.id)
            .where(
                or_(
                    and_(T.c.status == "pending", T.c.next_at <= now),
                    and_(T.c.status == "sending", T.c.lease_until < now),
                ),
                or_(T.c.parent_id.is_(None), parent_done),
            )
            .order_by(T.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def next_due(self) -> datetime | None:
        """When the earliest pending row is due or claimed row's lease ends (a hint for sleep)."""
        when = func.min(func.coalesce(T.c.lease_until, T.c.next_at))
        with self.engine.connect() as conn:
            value = conn.execute(
                select(when).where(T.c.status.in_(("pending", "sending")))
            ).scalar()
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return _utc(value)

    def failures(self) -> list[Failure]:
        return failures(self.engine)

    # -- claiming and settling -----------------------------------------------------------------

    def claim(self, row_id: int) -> Row | None:
        """Take ``row_id`` for this outbox under a lease, if it is still due; None otherwise.
        A row taken over from a worker whose lease passed is in doubt from then on."""
        now = self.now()
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(T)
                .where(
                    T.c.id == row_id,
                    or_(
                        and_(T.c.status == "pending", T.c.next_at <= now),
                        and_(T.c.status == "sending", T.c.lease_until < now),
                    ),
                )
                .values(
                    in_doubt=or_(T.c.in_doubt, T.c.status == "sending"),
                    status="sending",
                    lease_owner=self.owner,
                    lease_until=now + self.lease,
                    attempts=T.c.attempts + 1,
                    first_attempt_at=func.coalesce(
                        T.c.first_attempt_at, literal(now, T.c.first_attempt_at.type)
                    ),
                    updated_at=now,
                )
            )
            if taken.rowcount != 1:
                return None
            return self._row(conn, row_id)

    def _mine(self, row: Row) -> Any:
        return and_(T.c.id == row.id, T.c.status == "sending", T.c.lease_owner == self.owner)

    def _change(self, row: Row, **values: Any) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(
                update(T).where(self._mine(row)).values(updated_at=self.now(), **values)
            )
            return done.rowcount == 1

    def release(
        self, row: Row, *, at: datetime, in_doubt: bool, error: str | None, count: bool
    ) -> bool:
        """Back to pending until ``at`` (a 429's Retry-After, a back-off, a parent not sent yet).
        ``count=False`` gives the attempt back: nothing was tried."""
        values: dict[str, Any] = {
            "status": "pending",
            "next_at": _utc(at),
            "lease_owner": None,
            "lease_until": None,
            "in_doubt": in_doubt,
        }
        if error is not None:
            values["error"] = error[:300]
        if not count:
            values["attempts"] = T.c.attempts - 1
        return self._change(row, **values)

    def renew(self, row: Row) -> bool:
        """Extend this outbox's lease on ``row`` (before a send that follows a long look)."""
        return self._change(row, lease_until=self.now() + self.lease)

    def prune(self, keep: timedelta = KEEP) -> int:
        """Delete rows done with (sent, superseded, failed and cleared) older than ``keep``."""
        done = or_(
            T.c.status.in_(("sent", "superseded")),
            and_(T.c.status == "failed", T.c.cleared_at.is_not(None)),
        )
        with self.engine.begin() as conn:
            gone = conn.execute(T.delete().where(done, T.c.updated_at < self.now() - keep))
            return int(gone.rowcount)

    def supersede(self, row: Row) -> bool:
        return self._change(row, status="superseded", lease_owner=None, lease_until=None)

    def sent(
        self, row: Row, landed: Landed, *, adopted: bool = False, clears: Iterable[str] = ()
    ) -> Row:
        """Record that ``row`` is in Slack at ``landed``, with its ``message.sent`` event, and
        clear the failures it proves fixed: earlier failed rows to the same place, and those
        with an error in ``clears`` (a token error: any send that works proves the token)."""
        now = self.now()
        text = row.text
        event = NewEvent(
            "message.sent",
            row.target[:200],
            {
                "how": row.kind,
                "channel": landed.channel,
                "ts": landed.ts,
                "key": row.key,
                "attempts": row.attempts,
                "adopted": adopted,
                "text": text[:500],
            },
            actor="dbops",
            source="outbox",
            source_id=f"{row.key}/sent"[:200],
        )
        places = {row.target, landed.channel}

        def clear_fixed(conn: Connection) -> None:
            fixed = or_(T.c.target.in_(places), T.c.channel.in_(places))
            if clears:
                fixed = or_(fixed, T.c.error.in_(list(clears)))
            conn.execute(
                update(T)
                .where(T.c.status == "failed", T.c.cleared_at.is_(None), fixed)
                .values(cleared_at=now)
            )

        return self._settle(
            row,
            [event],
            now,
            {
                "status": "sent",
                "channel": landed.channel[:64],
                "ts": landed.ts[:64],
                "sent_at": now,
                "in_doubt": False,
                "error": None,
            },
            then=clear_fixed,
        )

    def fail(self, row: Row, error: str, notices: Sequence[_New] = ()) -> Row:
        """Mark ``row`` failed for good, with its ``message.failed`` event and the notices that
        tell a person, all in one transaction. Rows waiting for it (its thread replies and
        updates) fail with it, quietly: the notice about it covers them."""
        now = self.now()
        event = NewEvent(
            "message.failed",
            row.target[:200],
            {"how": row.kind, "key": row.key, "error": error[:300], "attempts": row.attempts},
            actor="dbops",
            source="outbox",
            source_id=f"{row.key}/failed"[:200],
        )

        def fail_waiting(conn: Connection) -> None:
            conn.execute(
                update(T)
                .where(T.c.parent_id == row.id, T.c.status == "pending")
                .values(status="failed", error=PARENT_FAILED, updated_at=now)
            )
            for notice in notices:
                self._insert(conn, notice, now, claim=False)

        return self._settle(
            row,
            [event, *(self._queued(n) for n in notices)],
            now,
            {"status": "failed", "error": error[:300]},
            then=fail_waiting,
        )

    def _settle(
        self,
        row: Row,
        events: list[NewEvent],
        now: datetime,
        values: dict[str, Any],
        *,
        then: Callable[[Connection], None],
    ) -> Row:
        """Give up ``row``'s lease with ``values`` and ``then``'s changes, in the transaction
        that stores ``events``; LeaseLost when another worker has taken the row over."""
        out: list[Row] = []

        def mark(conn: Connection, _stored: list[StoredEvent]) -> None:
            done = conn.execute(
                update(T)
                .where(self._mine(row))
                .values(lease_owner=None, lease_until=None, updated_at=now, **values)
            )
            if done.rowcount != 1:
                raise LeaseLost(f"outbox row {row.id} was taken over")
            then(conn)
            found = self._row(conn, row.id)
            assert found is not None
            out.append(found)

        self.events.append_many(events, within=mark)
        return out[0]

    def open_failure(self, row: Row, error: str) -> bool:
        """Whether an earlier failure to the same place, for the same reason, is still open:
        its notice already told someone, so this one tells nobody again."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(T.c.id)
                    .where(
                        T.c.status == "failed",
                        T.c.cleared_at.is_(None),
                        T.c.target == row.target,
                        T.c.error == error[:300],
                        T.c.depth == row.depth,
                        T.c.id != row.id,
                    )
                    .limit(1)
                ).first()
                is not None
            )

    def clear(self, *, row_ids: Sequence[int] | None = None) -> int:
        """Stop counting failed rows for /healthz (all of them, or ``row_ids``)."""
        cond = [T.c.status == "failed", T.c.cleared_at.is_(None)]
        if row_ids is not None:
            cond.append(T.c.id.in_(list(row_ids)))
        with self.engine.begin() as conn:
            return int(conn.execute(update(T).where(*cond).values(cleared_at=self.now())).rowcount)


class Courier:
    """Sends claimed rows through a transport; one per outbox per process (the caller's own
    attempts and the worker thread share its rate-limit pauses).

    ``admins``: who hears, by DM, about a message that failed for good; ``ops_channel``: where
    a failed DM is reported (the DM itself is what fails). ``quiet_errors``: errors no notice
    can get past (a revoked token), shown in /healthz only.
    """

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        *,
        admins: Sequence[str] = (),
        ops_channel: str | None = None,
        quiet_errors: Iterable[str] = (),
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.admins = list(dict.fromkeys(admins))
        self.ops_channel = ops_channel
        self.quiet_errors = frozenset(quiet_errors)
        self._paused: dict[str, datetime] = {}
        self._lock = threading.Lock()

    # -- rate limits ---------------------------------------------------------------------------

    def paused_until(self, method: str) -> datetime | None:
        with self._lock:
            until = self._paused.get(method)
        if until is not None and until <= self.outbox.now():
            return None
        return until

    def _pause(self, method: str, until: datetime) -> None:
        with self._lock:
            self._paused[method] = max(until, self._paused.get(method, until))

    # -- sending -------------------------------------------------------------------------------

    def deliver(self, row: Row) -> Row:
        """Send ``row``, which this outbox has claimed; returns it as it then is."""
        try:
            return self._deliver(row)
        except LeaseLost as exc:
            log.warning("%s", exc)
        except Exception:
            # A bug or a database failure: the lease runs out and the row is tried again.
            log.exception("outbox row %s: delivery failed", row.id)
        try:
            return self.outbox.get(row.id) or row
        except Exception:  # the database is gone too: the caller gets the row as it was
            return row

    def _deliver(self, row: Row) -> Row:
        now = self.outbox.now()
        channel, thread = row.target, row.thread
        if row.parent_id is not None:
            parent = self.outbox.get(row.parent_id)
            if parent is not None and parent.status == "failed":
                return self.outbox.fail(row, PARENT_FAILED)
            if parent is None or parent.status != "sent" or not parent.ts:
                self.outbox.release(
                    row,
                    at=now + timedelta(seconds=POLL_S),
                    in_doubt=row.in_doubt,
                    error=None,
                    count=False,
                )
                return self._again(row)
            channel, thread = parent.channel or channel, parent.ts
        if row.kind == "update":
            if self._newer_update(row):
                self.outbox.supersede(row)
                return self._again(row)
            if self._older_in_flight(row, now):
                self.outbox.release(
                    row, at=now + timedelta(seconds=POLL_S), in_doubt=False, error=None, count=False
                )
                return self._again(row)
        method = self.transport.method(row)
        until = self.paused_until(method)
        if until is not None:
            self.outbox.release(row, at=until, in_doubt=row.in_doubt, error=None, count=False)
            return self._again(row)
        if row.in_doubt and row.kind != "update":  # an update twice is harmless
            oldest = (row.first_attempt_at or row.created_at) - timedelta(seconds=LOOK_BACK_S)
            try:
                found = self.transport.find(row, channel, thread, oldest)
            except SendError as exc:
                if exc.transient:
                    return self._retry(row, exc, method)
                # It cannot be looked for (no history scope, not a member): a message sent twice
                # is better than a page never sent.
                log.warning(
                    "outbox row %s may have been sent already, and cannot be looked for (%s): "
                    "sending it again",
                    row.id,
                    exc.error,
                )
                found = None
            if found is not None:
                log.info("outbox row %s was sent before its worker stopped: adopted", row.id)
                return self.outbox.sent(row, found, adopted=True, clears=self.quiet_errors)
            if not self.outbox.renew(row):  # the look took long: the send gets a whole lease
                raise LeaseLost(f"outbox row {row.id} was taken over")
        try:
            landed = self.transport.send(row, channel, thread)
        except SendError as exc:
            if exc.transient:
                return self._retry(row, exc, method)
            return self._failed(row, exc.error)
        return self.outbox.sent(row, landed, clears=self.quiet_errors)

    def _again(self, row: Row) -> Row:
        return self.outbox.get(row.id) or row

    def _retry(self, row: Row, exc: SendError, method: str) -> Row:
        now = self.outbox.now()
        in_doubt = row.in_doubt or exc.in_doubt
        if exc.retry_after is not None:
            at = now + timedelta(seconds=max(0.0, exc.retry_after))
            self._pause(method, at)
            log.info("outbox row %s: rate limited, again at %s", row.id, at.isoformat())
            self.outbox.release(row, at=at, in_doubt=in_doubt, error=exc.error, count=True)
            return self._again(row)
        if row.attempts >= MAX_ATTEMPTS:
            return self._failed(row, f"gave up after {row.attempts} attempts: {exc.error}")
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, row.attempts - 1))
        log.info(
            "outbox row %s: %s (attempt %s), again in %.0f s",
            row.id,
            exc.error,
            row.attempts,
            delay,
        )
        self.outbox.release(
            row, at=now + timedelta(seconds=delay), in_doubt=in_doubt, error=exc.error, count=True
        )
        return self._again(row)

    def _failed(self, row: Row, error: str) -> Row:
        notices = self._notices(row, error)
        log.warning(
            "outbox row %s (%s to %s) failed for good: %s; %s",
            row.id,
            row.kind,
            row.target,
            error,
            f"{len(notices)} notice(s) queued" if notices else "nobody more is told",
        )
        failed = self.outbox.fail(row, error, notices)
        for notice in notices:  # now, not at the worker's next pass
            queued = self.outbox.by_key(notice.key)
            claimed = self.outbox.claim(queued.id) if queued is not None else None
            if claimed is not None:
                self.deliver(claimed)
        return failed

    def _newer_update(self, row: Row) -> bool:
        with self.outbox.engine.connect() as conn:
            return (
                conn.execute(
                    select(T.c.id)
                    .where(
                        T.c.about == row.about,
                        T.c.kind == "update",
                        T.c.id > row.id,
                        T.c.status.in_(("pending", "sending", "sent")),
                    )
                    .limit(1)
                ).first()
                is not None
            )

    def _older_in_flight(self, row: Row, now: datetime) -> bool:
        with self.outbox.engine.connect() as conn:
            return Outbox._update_in_flight(conn, row.about or "", now, below=row.id)

    # -- telling a person ----------------------------------------------------------------------

    def _notices(self, row: Row, error: str) -> list[_New]:
        """Who hears that ``row`` failed. A post or an update: each admin by DM (the ops
        channel when there are none). A DM: the ops channel (the DM is what fails). A notice DM
        that fails: the ops channel, once. Nothing is said about anything deeper, about a token
        Slack refuses (nothing would get through), or twice about one place and error."""
        if error in self.quiet_errors or error == PARENT_FAILED or row.depth >= 2:
            return []
        if row.depth == 1:
            if row.kind == "dm" and self.ops_channel and row.target != self.ops_channel:
                return [self._notice(row, error, "post", self.ops_channel, depth=2)]
            return []
        if self.outbox.open_failure(row, error):
            return []
        if row.kind == "dm" or not self.admins:
            if self.ops_channel and not (row.kind != "dm" and row.target == self.ops_channel):
                return [self._notice(row, error, "post", self.ops_channel, depth=1)]
            return []
        return [self._notice(row, error, "dm", admin, depth=1) for admin in self.admins]

    def _notice(self, row: Row, error: str, kind: str, to: str, *, depth: int) -> _New:
        return _New(
            kind,
            to,
            {"text": notice_text(row, error)},
            key=f"{row.key}/notice/{to}"[:200],
            depth=depth,
            notice_of=row.id,
        )

    # -- the worker ----------------------------------------------------------------------------

    def run_once(self, limit: int = 500) -> int:
        """Send every row that is due now (and those that become due as their parents go);
        returns how many were attempted."""
        attempted = 0
        while attempted < limit:
            progressed = False
            for row_id in self.outbox.due():
                row = self.outbox.claim(row_id)
                if row is None:
                    continue  # another worker has it
                self.deliver(row)
                attempted += 1
                progressed = True
            if not progressed:
                break
        return attempted

    def run(self, stop: threading.Event, poll: float = POLL_S) -> None:
        """Send due rows until ``stop`` is set, waking at the next due row or every ``poll``."""
        pruned_at = 0.0
        while not stop.is_set():
            wait = poll
            try:
                if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    self.outbox.prune()
                if self.run_once() == 0:
                    nxt = self.outbox.next_due()
                    if nxt is not None:
                        wait = min(poll, max(0.05, (nxt - self.outbox.now()).total_seconds()))
                else:
                    wait = 0.0
            except Exception:  # a database blip must not end the worker
                log.exception("outbox worker: a pass failed; again in %.0f s", poll)
            stop.wait(wait)

    def start(self, poll: float = POLL_S) -> Callable[[], None]:
        """The worker as a daemon thread; returns the function that stops it."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.run, args=(stop, poll), name="dbops-outbox", daemon=True
        )
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(timeout=15)

        return halt


def notice_text(row: Row, error: str) -> str:
    """What a person is told about a message that failed for good (plain words, one quote)."""
    where = {
        "dm": f"send a DM to <@{row.target}>"
        if row.target[:1] in "UW"
        else f"send a DM to {row.target}",
        "update": f"update a message in {row.target}",
    }.get(row.kind, f"post in {row.target}")
    said = " ".join(row.text.split())
    said = said if len(said) <= 300 else said[:299] + "…"
    lines = [
        f":warning: dbops could not {where}: `{error}`. The message (outbox {row.id}) was not "
        "sent and will not be retried; /healthz reports it until a send there works.",
    ]
    if said:
        lines.append(f"> {said}")
    return "\n".join(lines)
