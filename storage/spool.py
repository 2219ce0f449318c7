"""The spool: events the event log could not take, kept on local disk until it can.

An operation that has changed a server (a restore swapped in, a role created, a cluster
restarted) must finish or roll back whatever the event log does, and its record must not be
lost either. ``record`` appends an event as ``EventLog.append`` does; when the log's database is
down or does not answer in time, it keeps the event in the spool instead and returns False, and
the operation goes on. What the spool holds goes into the log, oldest first:

- before the next ``record`` on that engine appends anything (so the log keeps their order);
- when the engine's breaker sees the database answer again (``Breaker.on_recovery``);
- at process start (bot.runtime) and once a minute from the scheduler's health sweep, through
  ``flush_spool``, which also picks up what another process, or one that died, left behind.

The spool is a small SQLite file written with ``synchronous=FULL`` (an event kept survives a
crash of the process or the machine); several processes may share one. Every event ``record``
writes carries a (source, source_id) assigned before its first attempt, so an append that
committed although its caller gave up, or a flush that died between storing a batch and
removing it here, never stores an event twice: the log answers a known (source, source_id) with
the event stored first. Payloads are redacted (``storage.events.sanitise``) before they reach
the disk. An event the log refuses for its own sake (not an outage) is set aside in the file's
``refused`` table with the reason, so it never holds up the ones behind it.

Which file: ``use_spool(engine, Spool(path))`` (bot.runtime does it with ``DBOPS_SPOOL``,
core.settings); an engine without one gets a spool in memory (tests, library use), which keeps
events for the life of the process only.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from storage.events import (
    EventLog,
    EventLogUnavailable,
    NewEvent,
    breaker_for,
    is_outage,
    iso,
    sanitise,
)

log = logging.getLogger("dbops.spool")

# What to tell people when an operation's events are in the spool: said, never hidden.
RECORD_LATER = "the record will be written when the event log is back"
FLUSH_BATCH = 200  # events per transaction when the spool is emptied into the log
BUSY_TIMEOUT_S = 5.0  # another process writing the same file

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spool ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL, kept_at TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS refused ("
    " seq INTEGER PRIMARY KEY, event TEXT NOT NULL, error TEXT NOT NULL, at TEXT NOT NULL)",
)


def _outage(exc: BaseException) -> bool:
    return isinstance(exc, EventLogUnavailable) or is_outage(exc)


def _dump(event: NewEvent) -> str:
    ts = event.ts or datetime.now(UTC)
    return json.dumps(
        {
            "kind": event.kind,
            "subject": event.subject,
            "payload": sanitise(dict(event.payload)),
            "actor": event.actor,
            "source": event.source,
            "source_id": event.source_id,
            "ts": iso(ts),
        },
        sort_keys=True,
        ensure_ascii=False,
    )


def _load(text: str) -> NewEvent:
    data = json.loads(text)
    ts = datetime.strptime(data["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return NewEvent(
        data["kind"],
        data["subject"],
        data["payload"],
        data["actor"],
        data["source"],
        data["source_id"],
        ts,
    )


class Spool:
    """A durable, ordered queue of events for one event log; ``path`` None: in memory.

    The file (and its directory) is made on the first event kept, mode 0600 (0700): a healthy
    log never creates it. Safe to use from several threads and processes at once.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()  # the connection
        self._flushing = threading.Lock()  # one flush at a time in this process
        self._conn: sqlite3.Connection | None = None
        self._log: weakref.ref[EventLog] | None = None
        self._flusher: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Spool({str(self.path) if self.path else 'memory'})"

    # -- the file ------------------------------------------------------------------------------

    def _open(self, create: bool) -> sqlite3.Connection | None:
        """The connection (under self._lock); None when there is no file and ``create`` is
        False (nothing was ever kept)."""
        if self._conn is not None:
            return self._conn
        if self.path is None:
            target = ":memory:"
        else:
            if not self.path.exists():
                if not create:
                    return None
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            target = str(self.path)
        conn = sqlite3.connect(
            target, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        if self.path is not None:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # each event kept is on disk when put returns
        for statement in _SCHEMA:
            conn.execute(statement)
        self._conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- keeping and reading -------------------------------------------------------------------

    def put(self, event: NewEvent) -> None:
        """Keep ``event`` (it must carry a source_id, or a flush could store it twice)."""
        if event.source_id is None:
            raise ValueError("a spooled event needs a source_id")
        text = _dump(event)
        with self._lock:
            conn = self._open(create=True)
            assert conn is not None
            conn.execute(
                "INSERT INTO spool (event, kept_at) VALUES (?, ?)",
                (text, iso(datetime.now(UTC))),
            )

    def has_pending(self) -> bool:
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return False
            return conn.execute("SELECT 1 FROM spool LIMIT 1").fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return 0
            return int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])

    def pending(self, limit: int = 1000) -> list[NewEvent]:
        """The events kept, oldest first."""
        return [e for _, e in self._peek(limit)]

    def refused(self) -> list[tuple[NewEvent, str]]:
        """Events the log refused for their own sake, with why: kept here, never retried."""
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return []
            rows = conn.execute("SELECT event, error FROM refused ORDER BY seq").fetchall()
        return [(_load(text), error) for text, error in rows]

    def _peek(self, limit: int) -> list[tuple[int, NewEvent]]:
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return []
            rows = conn.execute(
                "SELECT seq, event FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(seq, _load(text)) for seq, text in rows]

    def _remove(self, seqs: list[int]) -> None:
        with self._lock:
            conn = self._open(create=False)
            assert conn is not None
            conn.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])

    def _set_aside(self, seq: int, event: NewEvent, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
        log.error(
            "spooled event %s about %s refused by the event log (%s); set aside in %r",
            event.kind,
            event.subject,
            type(exc).__name__,
            self,
        )
        with self._lock:
            conn = self._open(create=False)
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR REPLACE INTO refused (seq, event, error, at) VALUES (?, ?, ?, ?)",
                (seq, _dump(event), error, iso(datetime.now(UTC))),
            )
            conn.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            conn.execute("COMMIT")

    # -- flushing ------------------------------------------------------------------------------

    def remember(self, events: EventLog) -> None:
        """The log to flush into when its database answers again (the last one recorded to)."""
        if self._log is None or self._log() is not events:
            self._log = weakref.ref(events)

    def flush(
        self, events: EventLog | None = None, *, wait: bool = True, batch: int = FLUSH_BATCH
    ) -> int:
        """Store what the spool holds into ``events`` (default: the log last recorded to),
        oldest first, ``batch`` events per transaction; the number stored now.

        Stops at an outage, leaving the rest; never raises for one. ``wait`` False: when
        another thread is flushing, return 0 at once rather than wait for it."""
        if events is None and self._log is not None:
            events = self._log()
        if events is None or not self._flushing.acquire(blocking=wait):
            return 0
        stored = 0
        try:
            while True:
                rows = self._peek(batch)
                if not rows:
                    break
                try:
                    events.append_many([e for _, e in rows])
                except Exception as exc:
                    if _outage(exc):
                        log.info(
                            "%d spooled events still not stored: the event log is down (%s)",
                            len(self),
                            type(exc).__name__,
                        )
                        break
                    done, down = self._one_by_one(events, rows)
                    stored += done
                    if down:
                        break
                    continue
                self._remove([seq for seq, _ in rows])
                stored += len(rows)
        finally:
            self._flushing.release()
        if stored:
            log.info("stored %d spooled events in the event log", stored)
        return stored

    def _one_by_one(self, events: EventLog, rows: list[tuple[int, NewEvent]]) -> tuple[int, bool]:
        """A batch one of whose events the log refused: each alone, the refused set aside.
        (stored, whether an outage stopped it)."""
        stored = 0
        for seq, event in rows:
            try:
                events.append_many([event])
            except Exception as exc:
                if _outage(exc):
                    return stored, True
                self._set_aside(seq, event, exc)
                continue
            self._remove([seq])
            stored += 1
        return stored, False

    def flush_soon(self) -> None:
        """Flush on a thread of its own (the breaker's recovery calls this: never block it)."""
        if self._log is None:
            return
        with self._lock:
            if self._flusher is not None and self._flusher.is_alive():
                return
            self._flusher = threading.Thread(
                target=self._flush_quietly, name="dbops-spool-flush", daemon=True
            )
            self._flusher.start()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception:
            log.exception("flushing %r failed", self)


_spools: weakref.WeakKeyDictionary[Engine, Spool] = weakref.WeakKeyDictionary()
_spools_lock = threading.Lock()


def use_spool(engine: Engine, spool: Spool) -> Spool:
    """Keep what the event log on ``engine`` cannot take in ``spool`` (replacing any other)."""
    with _spools_lock:
        old = _spools.get(engine)
        _spools[engine] = spool
    hooks = breaker_for(engine).on_recovery
    if old is not None and old.flush_soon in hooks:
        hooks.remove(old.flush_soon)
    hooks.append(spool.flush_soon)
    return spool


def spool_for(engine: Engine) -> Spool:
    """The spool of the event log on ``engine``: the one given to ``use_spool``, else one in
    memory, made on first use."""
    with _spools_lock:
        spool = _spools.get(engine)
        if spool is not None:
            return spool
        spool = _spools[engine] = Spool(None)
    breaker_for(engine).on_recovery.append(spool.flush_soon)
    return spool


def record(
    events: EventLog,
    kind: str,
    subject: str | None = None,
    payload: Mapping[str, Any] | None = None,
    *,
    actor: str | None = None,
    source: str = "dbops",
    source_id: str | None = None,
    ts: datetime | None = None,
) -> bool:
    """Append an event, or keep it in the spool when the log is down: True when it is stored
    now, False when it is kept to be stored later (or, refused by the log for its own sake,
    logged as an error). Never raises for the log: what called it has already happened.

    The event's time is ``ts``, else now: a kept event is stored later with the time it
    happened."""
    event = NewEvent(
        kind,
        subject,
        dict(payload or {}),
        actor,
        source,
        source_id or f"{kind}:{uuid.uuid4().hex}",
        ts or datetime.now(UTC),
    )
    spool = spool_for(events.engine)
    spool.remember(events)
    if spool.has_pending():
        spool.flush(events, wait=False)
        if spool.has_pending():  # the log is still down, or another thread is emptying it
            return _keep(spool, event, "earlier events are still waiting")
    try:
        events.append(
            event.kind,
            event.subject,
            event.payload,
            actor=event.actor,
            source=event.source,
            source_id=event.source_id,
            ts=event.ts,
        )
        return True
    except Exception as exc:
        if not _outage(exc):
            log.error(
                "event %s about %s refused by the event log (%s); not kept",
                kind,
                subject,
                type(exc).__name__,
            )
            return False
        return _keep(spool, event, type(exc).__name__)


def _keep(spool: Spool, event: NewEvent, why: str) -> bool:
    try:
        spool.put(event)
    except Exception as exc:
        log.error(
            "event %s about %s LOST: the event log could not take it (%s) and neither could "
            "the spool %r (%s)",
            event.kind,
            event.subject,
            why,
            spool,
            type(exc).__name__,
        )
        return False
    log.warning(
        "event %s about %s kept in %r until the event log is back (%s)",
        event.kind,
        event.subject,
        spool,
        why,
    )
    return False


def caught_up(events: EventLog) -> bool:
    """Whether every event kept for the log on ``events``' engine is stored by now (a flush is
    tried first): what an operation whose events were kept tells its user."""
    flush_spool(events)
    return not spool_for(events.engine).has_pending()


def flush_spool(events: EventLog) -> int:
    """Store what the spool of ``events``' engine holds; the number stored (0 while down)."""
    spool = spool_for(events.engine)
    spool.remember(events)
    try:
        return spool.flush(events)
    except Exception:
        log.exception("flushing %r failed", spool)
        return 0


__all__ = ["RECORD_LATER", "Spool", "caught_up", "flush_spool", "record", "spool_for", "use_spool"]
