"""The append-only, hash-chained event log.

Every command, button press, job run, alert, escalation step, message and remote command is an
event. Each row's ``hash`` covers the previous row's hash and a canonical JSON of the row (sorted
keys, UTC ISO-8601 timestamps, no floats), computed here in Python and never from the database's
own rendering of JSON, so SQLite and PostgreSQL chains verify the same way. With a key
(``DBOPS_EVENTS_KEY``, storage/eventkeys.py) each row is also sealed with an HMAC that nobody
without the key can make; storage/chain.py says exactly what is hashed and sealed, and checks it.
The database refuses UPDATE and DELETE on the table (migration 0007).

Writers are serialised so the chain never forks: ``BEGIN IMMEDIATE`` on SQLite, a
transaction-level advisory lock on PostgreSQL. Inside the lock the head is read, ids are assigned
head + 1, ... (no gaps), and a (source, source_id) that is already stored returns the stored event
and writes nothing.

Every append has a deadline (``APPEND_DEADLINE_S``): its caller waits no longer, whatever the
database does, and gets ``EventLogUnavailable``; the transaction is abandoned, never committed
later behind the caller's back (storage.db.run_with_deadline). After a connection failure the
engine's ``Breaker`` opens: appends fail at once for a short back-off instead of each waiting for
a connect timeout, then the next append probes and, if the database answers, all is back.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from pathlib import PurePath
from typing import Any, NamedTuple

from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage.chain import (
    GENESIS,
    SEGMENT_KIND,
    ChainCheck,
    Checkpoint,
    Verdict,
    body_digest,
    canonical,
    iso,
    row_hash,
    sha_keyed,
    sha_unkeyed,
)
from storage.chain import body as _body
from storage.db import (
    Aborted,
    Attempt,
    DeadlineExceeded,
    is_sqlite,
    run_inline,
    run_with_deadline,
    runs_inline,
    watch_pings,
)
from storage.eventkeys import EventKey, Keyring
from storage.models import Event

__all__ = [
    "GENESIS",
    "REDACTED",
    "EventLog",
    "EventLogKeyError",
    "EventLogUnavailable",
    "NewEvent",
    "StoredEvent",
    "Verdict",
    "canonical",
    "iso",
    "row_hash",
]

log = logging.getLogger("dbops.events")

# pg_advisory_xact_lock key: the bytes "dbopsevt" read as a signed 64-bit integer.
PG_LOCK_KEY = int.from_bytes(b"dbopsevt", "big", signed=True)
REDACTED = "[redacted]"

# How long a caller of append waits at most. A healthy append takes a millisecond or two; five
# seconds is long enough for a busy database and short enough for a Slack worker (3 s to ack
# is Bolt's, and the ack never waits for the log).
APPEND_DEADLINE_S = 5.0
# After a connection failure appends fail at once for BREAKER_FIRST_S; each failed probe doubles
# that, up to BREAKER_LONGEST_S, so the log is back at most that long after the database is.
BREAKER_FIRST_S = 1.0
BREAKER_LONGEST_S = 5.0
# A PostgreSQL backend left idle inside an append's transaction (its client vanished without a
# reset) gives up the writers' lock after this, instead of holding it until TCP notices.
PG_IDLE_IN_APPEND_MS = 10_000

_SECRET_KEY = re.compile(
    r"pass(word|wd)?|token|secret|dsn|api[_-]?key|authori[sz]ation|private[_-]?key|credential|cookie",
    re.IGNORECASE,
)
# user:password@ in URLs, and password=... in libpq connection strings.
_URL_PASSWORD = re.compile(r"(?P<pre>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?=@)", re.I)
_KV_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", re.I)
_BEARER = re.compile(
    r"(?P<pre>\b(?:bearer\s+|xox[abpr]-|sk_(?:live|test)_|whsec_|evk_))(?P<pw>[\w.-]+)", re.I
)


class EventLogKeyError(RuntimeError):
    """This process cannot write the log as it stands: the log is sealed with a key that
    DBOPS_EVENTS_KEY does not hold (or there is none), so a row it wrote would not verify."""


class EventLogUnavailable(RuntimeError):
    """An event could not be stored: the database is down, unreachable or did not answer in time.

    ``retry_after`` is set when the append was refused at once because the database is known to
    be down: seconds until the next append will try it again.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def is_outage(exc: BaseException) -> bool:
    """A failure of the database or of the way to it, as opposed to one of the events."""
    if isinstance(exc, DeadlineExceeded | Aborted | OSError):
        return True
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True  # no pooled connection in time; a connection lost on checkout
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return False


def is_data_error(exc: BaseException) -> bool:
    """An error that one of the events caused: the others of its batch may still be stored."""
    return isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError | ValueError | TypeError)


class Breaker:
    """Fail fast while the event database is known to be down; probe it now and then.

    Closed, every append goes through. A connection failure or a missed deadline opens it: for
    the back-off, appends fail at once. The first append after that is the probe (the others
    still fail at once until it reports, or ``hold`` seconds pass); if it succeeds the breaker
    closes, if it fails the back-off doubles, up to ``longest``. Tickets keep one outage from
    being counted once per append that was in flight when it began.
    """

    def __init__(self, first: float = BREAKER_FIRST_S, longest: float = BREAKER_LONGEST_S) -> None:
        self.first, self.longest = first, longest
        self._lock = threading.Lock()
        self._generation = 0
        self._open_until: float | None = None
        self._probe_until = 0.0
        self._backoff = first
        self._down_since = 0.0
        self._cause = ""
        # Called (on the appending thread, so quick) when the database answers again after an
        # outage: storage.spool flushes the events it kept meanwhile.
        self.on_recovery: list[Callable[[], object]] = []

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def refusing(self) -> EventLogUnavailable | None:
        """The error to fail an append with at once, or None if it may try (changes nothing)."""
        if self._open_until is None:
            return None
        now = time.monotonic()
        with self._lock:
            if self._open_until is None:
                return None
            if now < self._open_until or now < self._probe_until:
                return self._refusal(now)
            return None

    def admit(self, hold: float) -> int:
        """Let an append through, returning its ticket; or raise EventLogUnavailable at once."""
        if self._open_until is None:
            return self._generation
        now = time.monotonic()
        with self._lock:
            if self._open_until is None:
                return self._generation
            if now < self._open_until or now < self._probe_until:
                raise self._refusal(now)
            self._probe_until = now + hold
            return self._generation

    def succeeded(self) -> None:
        if self._open_until is None:
            return
        with self._lock:
            if self._open_until is None:
                return
            down = time.monotonic() - self._down_since
            log.warning("the event log database answers again (unreachable for %.1f s)", down)
            self._open_until, self._probe_until = None, 0.0
            self._backoff = self.first
            self._generation += 1
        for hook in list(self.on_recovery):
            hook()

    def failed(self, ticket: int, exc: BaseException) -> None:
        with self._lock:
            if ticket != self._generation:
                return  # this outage is already counted
            now = time.monotonic()
            if self._open_until is None:
                self._down_since, self._backoff = now, self.first
                log.warning(
                    "the event log database is unreachable (%s): appends fail at once, "
                    "and one tries again after %g s (then up to every %g s)",
                    _cause(exc),
                    self._backoff,
                    self.longest,
                )
            else:
                self._backoff = min(self._backoff * 2, self.longest)
            self._open_until, self._probe_until = now + self._backoff, 0.0
            self._cause = _cause(exc)
            self._generation += 1

    def _refusal(self, now: float) -> EventLogUnavailable:
        wait = max(self._open_until or now, self._probe_until) - now
        return EventLogUnavailable(
            f"the event log database is unreachable ({self._cause}); "
            f"the next append tries it again in {wait:.1f} s",
            retry_after=wait,
        )


def _cause(exc: BaseException) -> str:
    # The class name only: a driver's message can carry a host name or a DSN.
    if isinstance(exc, DeadlineExceeded | Aborted):
        return "no answer in time"
    return type(getattr(exc, "orig", None) or exc).__name__


_breakers: weakref.WeakKeyDictionary[Engine, Breaker] = weakref.WeakKeyDictionary()
_breakers_lock = threading.Lock()


def breaker_for(engine: Engine) -> Breaker:
    """The one breaker of an engine: every EventLog on it knows the database is down."""
    with _breakers_lock:
        breaker = _breakers.get(engine)
        if breaker is None:
            breaker = _breakers[engine] = Breaker()
        return breaker


def scrub_text(text: str) -> str:
    """Mask passwords inside URLs and connection strings, and bearer/Slack/Stripe tokens."""
    text = _URL_PASSWORD.sub(lambda m: m["pre"] + "***", text)
    text = _KV_PASSWORD.sub(lambda m: m["pre"] + "***", text)
    return _BEARER.sub(lambda m: m["pre"] + "***", text)


_MAYBE_SECRET = re.compile(r"://|password|bearer|xox|sk_|whsec_|evk_", re.IGNORECASE)


@lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    return _SECRET_KEY.search(key) is not None


def sanitise(value: Any, key: str | None = None) -> Any:
    """The payload as it is stored and hashed: secrets redacted, only JSON types, no floats.

    Floats become strings (their repr) because their JSON rendering is not canonical across
    databases and drivers; datetimes become UTC ISO-8601 strings.
    """
    if key is not None and _secret_key(key):
        return REDACTED if value not in (None, "") else value
    kind = type(value)
    if kind is dict:
        return _sanitise_dict(value)
    if kind is str:
        return scrub_text(value) if _MAYBE_SECRET.search(value) else value
    if value is None or kind is bool or kind is int:
        return value
    return _sanitise_other(value)


def _sanitise_dict(value: Mapping[Any, Any]) -> dict[str, Any]:
    # The hot path of every append: plain dicts of strings and ints, inlined.
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = k if type(k) is str else str(k)
        kind = type(v)
        if _secret_key(key):
            out[key] = REDACTED if v not in (None, "") else v
        elif kind is str:
            out[key] = scrub_text(v) if _MAYBE_SECRET.search(v) else v
        elif v is None or kind is int or kind is bool:
            out[key] = v
        elif kind is dict:
            out[key] = _sanitise_dict(v)
        else:
            out[key] = _sanitise_other(v)
    return out


def _sanitise_other(value: Any) -> Any:
    if isinstance(value, str):
        return sanitise(str(value))
    if isinstance(value, bool | int):
        return int(value) if not isinstance(value, bool) else value
    if isinstance(value, float | Decimal):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return int(value.total_seconds()) if not value.microseconds else str(value.total_seconds())
    if isinstance(value, Enum):
        return sanitise(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return _sanitise_dict(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [sanitise(v) for v in items]
    return sanitise(str(value))


@dataclass(frozen=True)
class NewEvent:
    kind: str
    subject: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    actor: str | None = None
    source: str = "dbops"
    source_id: str | None = None
    ts: datetime | None = None


class _Prepared(NamedTuple):
    """Events checked, redacted and rendered to JSON: ready for the lock."""

    events: Sequence[NewEvent]
    payloads: list[dict[str, Any]]
    payload_json: list[str]


@dataclass(frozen=True)
class StoredEvent:
    id: int
    ts: datetime
    kind: str
    actor: str | None
    subject: str | None
    payload: dict[str, Any]
    source: str
    source_id: str | None
    prev_hash: str
    hash: str
    key_id: str | None = None  # the key that sealed it; None: unkeyed
    mac: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": iso(self.ts),
            "kind": self.kind,
            "actor": self.actor,
            "subject": self.subject,
            "payload": self.payload,
            "source": self.source,
            "source_id": self.source_id,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "key_id": self.key_id,
            "mac": self.mac,
        }


_T = Event.__table__  # type: ignore[attr-defined]
_COLUMNS = (
    "id",
    "ts",
    "kind",
    "actor",
    "subject",
    "payload",
    "source",
    "source_id",
    "prev_hash",
    "hash",
    "key_id",
    "mac",
)


def _payload(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        loaded: dict[str, Any] = json.loads(value)
        return loaded
    return dict(value or {})


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _stored(row: Any) -> StoredEvent:
    m = row._mapping
    return StoredEvent(
        id=m["id"],
        ts=_aware(m["ts"]),
        kind=m["kind"],
        actor=m["actor"],
        subject=m["subject"],
        payload=_payload(m["payload"]),
        source=m["source"],
        source_id=m["source_id"],
        prev_hash=m["prev_hash"],
        hash=m["hash"],
        key_id=m["key_id"],
        mac=m["mac"],
    )


# Work done inside an append's transaction, before it commits: (connection, the stored events).
Within = Callable[[Connection, list[StoredEvent]], None]


class EventLog:
    """Append to, query and verify the event log on one engine.

    ``deadline``: seconds an append may take before its caller gets EventLogUnavailable.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        deadline: float = APPEND_DEADLINE_S,
        keys: Keyring | None = None,
    ) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        self.deadline = deadline
        self.keys = keys
        self.breaker = breaker_for(engine)
        self._run = run_inline if runs_inline(engine) else run_with_deadline
        self._listeners: list[Callable[[list[StoredEvent]], None]] = []
        if not self._sqlite:
            watch_pings(engine)  # an engine not made by make_engine

    def listen(self, listener: Callable[[list[StoredEvent]], None]) -> None:
        """Call ``listener(stored)`` after each append commits, on the appending thread (the
        writer's, for GroupCommitLog): it must be quick and hand slow work to a thread."""
        self._listeners.append(listener)

    def _committed(self, stored: list[StoredEvent]) -> None:
        for listener in self._listeners:
            try:
                listener(stored)
            except Exception:  # a listener's bug must not fail an append that is stored
                log.exception("an event log listener failed")

    # -- writing ---------------------------------------------------------------------------

    def append(
        self,
        kind: str,
        subject: str | None = None,
        payload: Mapping[str, Any] | None = None,
        *,
        actor: str | None = None,
        source: str = "dbops",
        source_id: str | None = None,
        ts: datetime | None = None,
    ) -> StoredEvent:
        new = NewEvent(kind, subject, payload or {}, actor, source, source_id, ts)
        return self.append_many([new])[0]

    def append_many(
        self,
        events: Sequence[NewEvent],
        *,
        deadline: float | None = None,
        within: Within | None = None,
    ) -> list[StoredEvent]:
        """Append a batch in one transaction; returns one stored event per input, in order.

        An input whose (source, source_id) is already stored, or repeats an earlier input of the
        same batch, comes back as the event stored first. Raises EventLogUnavailable when the
        database is down or does not answer within ``deadline`` seconds (default: the log's),
        and the error itself (ValueError, IntegrityError, ...) when an event is at fault.
        ``within(conn, stored)`` runs in the same transaction, before COMMIT (the outbox writes
        its row there, so the row and its event are stored together or not at all).
        """
        if not events:
            return []
        prepared = self._prepare(events)
        seconds = self.deadline if deadline is None else deadline
        ticket = self.breaker.admit(hold=seconds + 1)
        try:
            out = self._run(lambda attempt: self._store(prepared, attempt, within), seconds)
        except Exception as exc:
            raise self._failure(ticket, exc, seconds) from exc
        self.breaker.succeeded()
        if self._listeners:
            self._committed(out)
        return out

    def _failure(self, ticket: int, exc: Exception, seconds: float) -> Exception:
        """What to raise for a failed append, with the breaker told what happened."""
        if not is_outage(exc):
            self.breaker.succeeded()  # the database answered; an event was at fault
            return exc
        self.breaker.failed(ticket, exc)
        if isinstance(exc, DeadlineExceeded | Aborted):
            return EventLogUnavailable(f"the event log did not answer within {seconds:g} s")
        return EventLogUnavailable(f"the event log database is unreachable ({_cause(exc)})")

    def _prepare(self, events: Sequence[NewEvent]) -> _Prepared:
        for ev in events:
            if not ev.kind or len(ev.kind) > 64 or not ev.source or len(ev.source) > 64:
                raise ValueError("an event kind and source are 1-64 characters")
            if ev.source_id is not None and len(ev.source_id) > 200:
                raise ValueError("an event source_id is at most 200 characters")
        # Redaction and JSON happen before the lock: they are most of the work.
        payloads = [_sanitise_dict(ev.payload) for ev in events]
        return _Prepared(events, payloads, [canonical(p) for p in payloads])

    def _store(
        self, prepared: _Prepared, attempt: Attempt, within: Within | None = None
    ) -> list[StoredEvent]:
        """One transaction (two on a duplicate), on a worker thread, for ``attempt``."""
        try:
            # Duplicates are rare, so first try without looking for them: the unique constraint
            # catches one, and the retry (still under the writers' lock) returns the stored event.
            return self._append(*prepared, attempt, look_up=False, within=within)
        except IntegrityError:
            return self._append(*prepared, attempt, look_up=True, within=within)

    def _append(
        self,
        events: Sequence[NewEvent],
        payloads: list[dict[str, Any]],
        payload_json: list[str],
        attempt: Attempt,
        *,
        look_up: bool,
        within: Within | None = None,
    ) -> list[StoredEvent]:
        opts = {"sqlite_begin": "IMMEDIATE"} if self._sqlite else {}
        with self.engine.connect().execution_options(**opts) as conn:
            attempt.watch(conn.connection.dbapi_connection)
            with conn.begin():
                self._lock(conn, attempt)
                out = self._insert(conn, events, payloads, payload_json, look_up=look_up)
                if within is not None:
                    within(conn, out)
                attempt.check()  # past the deadline its caller was told it failed: no COMMIT
        return out

    def _insert(
        self,
        conn: Connection,
        events: Sequence[NewEvent],
        payloads: list[dict[str, Any]],
        payload_json: list[str],
        *,
        look_up: bool,
    ) -> list[StoredEvent]:
        existing = self._existing(conn, events) if look_up else {}
        head = conn.execute(self._head_sql).first()
        next_id, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        seal_key = self._sealing_key(head[2] if head else None)
        now = datetime.now(UTC)
        now_iso, now_param = iso(now), self._ts_param(now)
        params: list[tuple[Any, ...]] = []
        out: list[StoredEvent] = []
        kid = seal_key.id if seal_key is not None else None
        extra = 0  # rows this append adds that its caller did not ask for
        if seal_key is not None and (head is None or head[2] != kid):
            # A new key starts a segment: recorded in the chain, sealed by the new key.
            after = head[2] if head is not None else None
            segment = {"key_id": kid, "public_key": seal_key.public_text, "after": after}
            events = [NewEvent(SEGMENT_KIND, "events", segment, "dbops"), *events]
            payloads, payload_json = [segment, *payloads], [canonical(segment), *payload_json]
            extra = 1
        for i, (ev, payload, pjson) in enumerate(zip(events, payloads, payload_json, strict=True)):
            key = (ev.source, ev.source_id)
            if ev.source_id is not None and key in existing:
                out.append(existing[key])
                continue
            ts, ts_iso, ts_param = now, now_iso, now_param
            if ev.ts is not None:
                ts = _aware(ev.ts)
                ts_iso, ts_param = iso(ts), self._ts_param(ts)
            subject = ev.subject[:200] if ev.subject else ev.subject
            actor = ev.actor[:64] if ev.actor else ev.actor
            body = _body(next_id, ts_iso, ev.kind, actor, subject, pjson, ev.source, ev.source_id)
            if seal_key is None:
                digest, mac = sha_unkeyed(prev, body), None
            else:
                digest = sha_keyed(prev, body_digest(body))
                mac = seal_key.seal(digest)
            stored = StoredEvent(
                next_id,
                ts,
                ev.kind,
                actor,
                subject,
                payload,
                ev.source,
                ev.source_id,
                prev,
                digest,
                kid,
                mac,
            )
            if i >= extra:
                out.append(stored)
            params.append(
                (
                    next_id,
                    ts_param,
                    ev.kind,
                    actor,
                    subject,
                    pjson,
                    ev.source,
                    ev.source_id,
                    prev,
                    digest,
                    kid,
                    mac,
                )
            )
            if ev.source_id is not None:
                existing[key] = stored
            prev = digest
            next_id += 1
        if params:
            # Straight to the driver's executemany: the JSON is already rendered, and
            # SQLAlchemy's per-row type processing would triple the cost of a batch.
            conn.exec_driver_sql(self._insert_sql, params)
        return out

    @property
    def _head_sql(self) -> Any:
        return select(_T.c.id, _T.c.hash, _T.c.key_id).order_by(_T.c.id.desc()).limit(1)

    def _sealing_key(self, head_key: str | None) -> EventKey | None:
        """The key new rows are sealed with, or EventLogKeyError when this process cannot
        write rows that verify after ``head_key`` (the newest row's key)."""
        if self.keys is None:
            if head_key is not None:
                raise EventLogKeyError(
                    f"the event log is sealed with key {head_key} and this process has no "
                    "DBOPS_EVENTS_KEY: its events would not verify, so none is written"
                )
            return None
        key = self.keys.current
        if key is None:
            raise EventLogKeyError(
                "DBOPS_EVENTS_KEY holds public keys only: it can verify the log, not write it"
            )
        if head_key is not None and head_key != key.id and self.keys.rank(head_key) < 0:
            raise EventLogKeyError(
                f"the newest event is sealed with key {head_key}, which DBOPS_EVENTS_KEY does "
                "not hold: list it before the new key to rotate, or use the key file the other "
                "dbops processes use"
            )
        return key

    @property
    def _insert_sql(self) -> str:
        marks = ", ".join(["?" if self._sqlite else "%s"] * len(_COLUMNS))
        return f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ({marks})"

    def _ts_param(self, ts: datetime) -> Any:
        # SQLAlchemy stores SQLite datetimes as naive text in this format; keep to it.
        return ts.strftime("%Y-%m-%d %H:%M:%S.%f") if self._sqlite else ts

    def _lock(self, conn: Connection, attempt: Attempt) -> None:
        if self._sqlite:
            return  # BEGIN IMMEDIATE took it, waiting no longer than the attempt has left
        # One round trip: the lock wait ends with the deadline, and a backend whose client
        # vanished mid-append (a black hole, not a reset) lets go of the lock after a while.
        conn.exec_driver_sql(
            "SELECT set_config('lock_timeout', %s, true),"
            " set_config('idle_in_transaction_session_timeout', %s, true),"
            f" pg_advisory_xact_lock({PG_LOCK_KEY})",
            (str(max(1, int(attempt.left() * 1000))), str(PG_IDLE_IN_APPEND_MS)),
        )

    def _existing(
        self, conn: Connection, events: Sequence[NewEvent]
    ) -> dict[tuple[str, str | None], StoredEvent]:
        by_source: dict[str, set[str]] = {}
        for e in events:
            if e.source_id is not None:
                by_source.setdefault(e.source, set()).add(e.source_id)
        found: dict[tuple[str, str | None], StoredEvent] = {}
        for source, ids in by_source.items():
            wanted = sorted(ids)
            for start in range(0, len(wanted), 500):
                hits = self._hits(conn, source, wanted[start : start + 500])
                if hits:
                    for row in conn.execute(select(_T).where(_T.c.id.in_(hits))):
                        ev = _stored(row)
                        found[(ev.source, ev.source_id)] = ev
        return found

    def _hits(self, conn: Connection, source: str, source_ids: list[str]) -> list[int]:
        """Ids of stored events with these source ids: index probes of uq_events_source."""
        if self._sqlite:
            stmt = select(_T.c.id).where(_T.c.source == source, _T.c.source_id.in_(source_ids))
            return list(conn.execute(stmt).scalars())
        # On PostgreSQL an IN list makes the planner scan every row of the source and filter
        # (seconds per batch once the log has some thousands of rows); a join with unnest probes
        # the unique index once per key.
        rows = conn.exec_driver_sql(
            "SELECT e.id FROM unnest(%s::text[]) AS k(sid) "
            "JOIN events e ON e.source = %s AND e.source_id = k.sid",
            (source_ids, source),
        )
        return [r[0] for r in rows]

    # -- reading ---------------------------------------------------------------------------

    def query(
        self,
        *,
        subject: str | None = None,
        kind: str | None = None,
        kind_prefix: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[StoredEvent]:
        """Events matching every given filter, oldest first (or newest first), at most ``limit``.

        Page forwards with ``after_id`` = the last id of the previous page.
        """
        stmt = select(_T)
        conds = []
        if subject is not None:
            conds.append(_T.c.subject == subject)
        if kind is not None:
            conds.append(_T.c.kind == kind)
        if kind_prefix is not None:
            conds.append(_T.c.kind.startswith(kind_prefix, autoescape=True))
        if since is not None:
            conds.append(_T.c.ts >= _aware(since))
        if until is not None:
            conds.append(_T.c.ts < _aware(until))
        if after_id is not None:
            conds.append(_T.c.id > after_id)
        if conds:
            stmt = stmt.where(and_(*conds))
        order = _T.c.id.desc() if newest_first else _T.c.id.asc()
        stmt = stmt.order_by(order).limit(max(1, min(limit, 10_000)))
        with self.engine.connect() as conn:
            return [_stored(r) for r in conn.execute(stmt)]

    def tail(self, n: int = 20) -> list[StoredEvent]:
        return list(reversed(self.query(limit=n, newest_first=True)))

    def about(self, subjects: Iterable[str], limit: int = 20) -> list[StoredEvent]:
        """The newest events about any of ``subjects``, oldest first."""
        subjects = list(subjects)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_T)
                .where(or_(*[_T.c.subject == s for s in subjects]))
                .order_by(_T.c.id.desc())
                .limit(limit)
            ).all()
        return list(reversed([_stored(r) for r in rows]))

    def get(self, source: str, source_id: str) -> StoredEvent | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_T).where(_T.c.source == source, _T.c.source_id == source_id)
            ).first()
        return _stored(row) if row else None

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_T)).scalar_one())

    def iter_all(self, batch: int = 2000) -> Iterator[StoredEvent]:
        after = 0
        while True:
            page = self.query(after_id=after, limit=batch)
            if not page:
                return
            yield from page
            after = page[-1].id

    # -- verifying -------------------------------------------------------------------------

    def verify(self, checkpoints: Sequence[Checkpoint] = ()) -> Verdict:
        """Walk the chain from the first event; name the first event that does not fit.

        Catches an edited row (its hash, or its seal, no longer matches), an inserted or deleted
        row (a gap in the ids, a broken link, a row without a valid seal), rows swapped or
        re-ordered (the links do not follow), a log written under another key, and, given the
        published ``checkpoints``, a log cut back past one of them. With no keyring it checks
        order only, and says so (storage/chain.py).
        """
        return ChainCheck(self.keys, checkpoints).feed_all(self.iter_all())

    # -- checkpoints -----------------------------------------------------------------------

    def start_segment(self) -> None:
        """Append the ``events.key`` event that starts the current key's segment, unless the
        newest event is already sealed with it (nothing to do without a keyring)."""
        if self.keys is None:
            return
        prepared = self._prepare([])
        self._run(lambda attempt: self._store(prepared, attempt), self.deadline)

    def checkpoint(self, now: datetime | None = None) -> Checkpoint:
        """The head now (id, hash, count), signed with the current key; unsigned when the log
        is unkeyed. A keyed log is first brought into the current key's segment."""
        self.start_segment()
        with self.engine.connect() as conn:
            head = conn.execute(self._head_sql).first()
            count = int(conn.execute(select(func.count()).select_from(_T)).scalar_one())
        at = now or datetime.now(UTC)
        if head is None:
            return Checkpoint.make(0, GENESIS, count, at, None)
        key = self.keys.get(head[2]) if self.keys is not None else None
        return Checkpoint.make(head[0], head[1], count, at, key)
