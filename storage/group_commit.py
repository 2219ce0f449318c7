"""The event log with appends from many threads committed together by one writer thread.

The Slack app appends from many threads at once (every command and every reply sent is an
event); one transaction per append would cost more than Bolt itself. ``GroupCommitLog`` is an
``EventLog`` whose ``append`` queues the event for one writer that commits whatever has queued
meanwhile with one transaction, and blocks until its event is stored.

Failures are the batch's, not each event's. An append waits at most the log's deadline from the
moment it is queued; the writer commits a batch under the earliest deadline of its events, and
when that passes or the connection fails, every event of the batch fails at once: a connection
error says nothing about any one event, and retrying them one by one against a dead database
only multiplies the wait (four queued events once took 50 s). Only an error an event caused (a
bad kind, an integrity or data error) splits the batch, in halves, so the good events land and
the bad one fails alone. While the engine's breaker is open, appends fail as they are queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from storage.db import Attempt
from storage.eventkeys import Keyring
from storage.events import (
    APPEND_DEADLINE_S,
    EventLog,
    EventLogUnavailable,
    NewEvent,
    StoredEvent,
    is_data_error,
)

__all__ = ["EventLogUnavailable", "GroupCommitLog"]

log = logging.getLogger("dbops.events")


@dataclass(eq=False)
class _Pending:
    """A queued event, its caller's future and deadline (monotonic), and the attempt storing it."""

    event: NewEvent
    future: Future[StoredEvent]
    deadline: float
    attempt: Attempt | None = None
    abandoned: bool = False  # its caller stopped waiting: never store it after that


class GroupCommitLog(EventLog):
    """The event log with appends from many threads committed together by one writer.

    Each Slack delivery appends twice (the command, with its idempotency key, and the reply
    sent); one transaction per append would cost the server more than Bolt itself. Callers
    still block until their event is stored and get it back, so the retry check is unchanged;
    a repeated (source, source_id) inside one batch comes back as the first, as append_many
    promises. A caller waits at most ``deadline`` seconds, then gets EventLogUnavailable.
    """

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 500,
        *,
        deadline: float = APPEND_DEADLINE_S,
        keys: Keyring | None = None,
    ) -> None:
        super().__init__(engine, deadline=deadline, keys=keys)
        self.max_batch = max_batch
        self._guard = threading.Lock()
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="dbops-events", daemon=True)
        self._writer.start()

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
        pending = self._enqueue(
            NewEvent(kind, subject, payload or {}, actor, source, source_id, ts)
        )
        try:
            return pending.future.result(timeout=max(0.0, pending.deadline - time.monotonic()))
        except FutureTimeout:
            # The writer fails the batch at this same deadline; this is the backstop.
            self._abandon(pending)
            if pending.future.done():
                return pending.future.result()
            raise EventLogUnavailable(
                f"the event log did not answer within {self.deadline:g} s"
            ) from None

    def submit(
        self,
        kind: str,
        subject: str | None = None,
        payload: Mapping[str, Any] | None = None,
        *,
        actor: str | None = None,
        source: str = "dbops",
        source_id: str | None = None,
        ts: datetime | None = None,
    ) -> Future[StoredEvent]:
        """Queue an event; the future is done once it is stored, or has failed (by the deadline)."""
        event = NewEvent(kind, subject, payload or {}, actor, source, source_id, ts)
        return self._enqueue(event).future

    def _enqueue(self, event: NewEvent) -> _Pending:
        future: Future[StoredEvent] = Future()
        refusal = self.breaker.refusing()
        if refusal is not None:  # the database is known to be down: say so now
            future.set_exception(refusal)
            return _Pending(event, future, 0.0)
        pending = _Pending(event, future, time.monotonic() + self.deadline)
        self._queue.put(pending)
        return pending

    def _abandon(self, pending: _Pending) -> None:
        with self._guard:
            pending.abandoned = True
            attempt = pending.attempt
        if attempt is not None:
            attempt.abort()

    # -- the writer thread -----------------------------------------------------------------

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            try:
                self._commit(batch)
            except Exception:  # a bug here must not stop the writer for good
                log.exception("the event writer failed a batch")
                self._fail(batch, "the event log could not be written")

    def _commit(self, batch: list[_Pending]) -> None:
        live, attempt = self._take(batch)
        if not live:
            return
        try:
            prepared = self._prepare([p.event for p in live])
        except (ValueError, TypeError) as exc:
            self._split(live, exc)
            return
        try:
            ticket = self.breaker.admit(hold=self.deadline + 1)
        except EventLogUnavailable as refusal:
            self._fail(live, str(refusal), retry_after=refusal.retry_after)
            return
        try:
            stored = self._run(lambda a: self._store(prepared, a), self.deadline, attempt=attempt)
        except Exception as exc:
            error = self._failure(ticket, exc, self.deadline)  # tells the breaker
            if is_data_error(exc):
                self._split(live, exc)
            else:  # the whole batch: nothing here is about one event
                self._fail(live, str(error), cause=exc)
            return
        self.breaker.succeeded()
        for pending, event in zip(live, stored, strict=True):
            pending.future.set_result(event)
        if self._listeners:
            self._committed(stored)

    def _take(self, batch: list[_Pending]) -> tuple[list[_Pending], Attempt]:
        """The events still waited for, and the attempt that stores them (under the earliest
        deadline among them), attached while no caller can abandon one unnoticed."""
        now = time.monotonic()
        live: list[_Pending] = []
        late: list[_Pending] = []
        with self._guard:
            for p in batch:
                if p.future.done():
                    continue
                (late if p.abandoned or p.deadline <= now else live).append(p)
            attempt = Attempt(min((p.deadline for p in live), default=now) - now)
            for p in live:
                p.attempt = attempt
        self._fail(late, f"the event log did not answer within {self.deadline:g} s")
        return live, attempt

    def _split(self, live: list[_Pending], exc: Exception) -> None:
        """An event was at fault: halve the batch until it stands alone, so the others land."""
        if len(live) > 1:
            mid = len(live) // 2
            self._commit(live[:mid])
            self._commit(live[mid:])
            return
        log.warning("the event log refused a %r event (%s)", live[0].event.kind, type(exc).__name__)
        self._fail(live, f"the event log refused this event ({type(exc).__name__})", cause=exc)

    @staticmethod
    def _fail(
        batch: list[_Pending],
        message: str,
        *,
        retry_after: float | None = None,
        cause: BaseException | None = None,
    ) -> None:
        for p in batch:
            if not p.future.done():
                error = EventLogUnavailable(message, retry_after=retry_after)
                error.__cause__ = cause
                p.future.set_exception(error)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
