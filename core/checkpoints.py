"""Checkpoints of the event log, published where the database's owner cannot rewrite them.

A checkpoint (storage/chain.py) is the head of the log, signed with the current key. Each one is
appended to ``DBOPS_CHECKPOINTS`` (one JSON line, one O_APPEND write, fsynced; keep the file on
append-only or write-once storage) and posted to the ops channel, so Slack's history is a second
witness. ``dbops events verify`` then catches a log cut back past any of them.

The scheduler publishes one hourly (``events_checkpoint``), and one soon after every destructive
action: ``Checkpointer`` listens on the event log for the events that end a restore, a
provisioning, a restart or an SLA credit, whichever command, button or job ran it, and publishes
from its own thread (never on the appender's, which may be the batching writer).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from core.notify import Message, Notifier
from storage.chain import Checkpoint, parse_checkpoints
from storage.events import EventLog, StoredEvent

log = logging.getLogger("dbops.checkpoints")

# The events that end a destructive action: a checkpoint follows each (storage/events.py kinds
# as core/backups/, core/provisioning.py, core/incidents/ and core/billing.py record them).
DESTRUCTIVE_KINDS = frozenset(
    {
        "restore.done",
        "restore.failed",
        "restore.rollback_failed",
        "provision.done",
        "provision.failed",
        "server.restart",
        "billing.credit_applied",
    }
)


IDLE_S = 60.0  # the publishing thread leaves after this long with nothing to do


def append_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """One line, written with one O_APPEND write and fsynced: concurrent writers (the web app
    and the scheduler) never interleave, and a crash never leaves half a line behind."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (checkpoint.line() + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoints(path: Path) -> list[Checkpoint]:
    """Every checkpoint in ``path`` (a DBOPS_CHECKPOINTS file, or text copied from the ops
    channel); ValueError naming the line when one is damaged."""
    return parse_checkpoints(path.read_text(encoding="utf-8"), name=path.name)


def checkpoint_message(checkpoint: Checkpoint) -> Message:
    signed = (
        f"signed by key `{checkpoint.key_id}`" if checkpoint.key_id else "unsigned (unkeyed log)"
    )
    return Message(
        text=(
            f":lock: Event log checkpoint: event {checkpoint.id} of {checkpoint.count}, "
            f"hash `{checkpoint.hash[:16]}…`, {signed}. Keep this message: "
            f"`dbops events verify --checkpoints FILE` checks the log against it.\n"
            f"```{checkpoint.line()}```"
        )
    )


def publish(
    events: EventLog,
    notifier: Notifier | None,
    channel: str,
    path: Path | None,
    *,
    now: datetime | None = None,
) -> Checkpoint:
    """Checkpoint the head now: append it to ``path`` and post it to ``channel``. The file
    comes first; a failure of either raises (the caller, a job, reports it)."""
    checkpoint = events.checkpoint(now)
    if path is not None:
        append_checkpoint(path, checkpoint)
    if notifier is not None:
        notifier.post(channel, checkpoint_message(checkpoint))
    return checkpoint


class Checkpointer:
    """Publishes a checkpoint soon after any destructive event is stored.

    ``saw`` is an event-log listener: it only notes that one is due. A thread of its own
    publishes, once for however many destructive events arrived meanwhile; the checkpoint is of
    the head when it runs, so it covers them all.
    """

    def __init__(
        self,
        publish_now: Callable[[], Checkpoint],
        kinds: frozenset[str] = DESTRUCTIVE_KINDS,
    ) -> None:
        self._publish = publish_now
        self.kinds = kinds
        self._cond = threading.Condition()
        self._due = 0  # destructive events seen
        self._done = 0  # of those, covered by a checkpoint published (or attempted)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.published: list[Checkpoint] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def watch(self, events: EventLog) -> Checkpointer:
        events.listen(self.saw)
        return self

    def saw(self, stored: Sequence[StoredEvent]) -> None:
        hits = sum(1 for e in stored if e.kind in self.kinds)
        if not hits:
            return
        with self._cond:
            if self._closed:
                return
            self._due += hits
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dbops-checkpoints", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._done >= self._due and not self._closed:
                    if not self._cond.wait(IDLE_S) and self._done >= self._due:
                        self._thread = None  # idle: the next destructive event starts another
                        return
                if self._done >= self._due:
                    return
                target = self._due
            try:
                self.published.append(self._publish())
            except Exception:
                log.exception("could not publish the checkpoint after a destructive action")
            with self._cond:
                self._done = target
                self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every destructive event seen so far is covered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._due, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Publish what is due, then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
