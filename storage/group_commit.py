"""The event log with appends from many threads committed together by one writer thread.

The Slack app appends from many threads at once (every command and every reply sent is an
event); one transaction per append would cost more than Bolt itself. ``GroupCommitLog`` is an
``EventLog`` whose ``append`` queues the event for one writer that commits whatever has queued
meanwhile with ``append_many``, and blocks until its event is stored.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from storage.events import EventLog, NewEvent, StoredEvent

log = logging.getLogger("dbops.events")


class EventLogUnavailable(RuntimeError):
    """An event could not be stored (the database refused the batch and the event alone)."""


class GroupCommitLog(EventLog):
    """The event log with appends from many threads committed together by one writer.

    Each Slack delivery appends twice (the command, with its idempotency key, and the reply
    sent); one transaction per append would cost the server more than Bolt itself. Callers
    still block until their event is stored and get it back, so the retry check is unchanged;
    a repeated (source, source_id) inside one batch comes back as the first, as append_many
    promises.
    """

    def __init__(self, engine: Engine, max_batch: int = 500) -> None:
        super().__init__(engine)
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[NewEvent, Future[StoredEvent]] | None] = (
            queue.SimpleQueue()
        )
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
        return self.submit(
            kind, subject, payload, actor=actor, source=source, source_id=source_id, ts=ts
        ).result()

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
        """Queue an event; the future is done once it is stored."""
        future: Future[StoredEvent] = Future()
        event = NewEvent(kind, subject, payload or {}, actor, source, source_id, ts)
        self._queue.put((event, future))
        return future

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
            self._commit(batch)

    def _commit(self, batch: list[tuple[NewEvent, Future[StoredEvent]]]) -> None:
        try:
            stored = self.append_many([event for event, _ in batch])
        except Exception:
            if len(batch) > 1:  # one bad event must not fail its neighbours
                for one in batch:
                    self._commit([one])
                return
            log.exception("could not store an event")
            batch[0][1].set_exception(EventLogUnavailable("the event log could not be written"))
            return
        for (_, future), event in zip(batch, stored, strict=True):
            future.set_result(event)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
