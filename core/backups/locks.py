"""The lock a restore holds: op_lock, with LockBusy said in words people can read."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import Engine

from core.backups.common import LOCK_LEASE
from core.errors import DbopsError
from storage.models_billing import LockBusy, op_lock

log = logging.getLogger("core.backups")


class _Held:
    """A context manager around op_lock that turns LockBusy into a DbopsError people can read."""

    def __init__(self, engine: Engine, name: str, actor: str, what: str) -> None:
        self._cm = op_lock(
            engine, name, f"{name}:{uuid.uuid4().hex}", lease=LOCK_LEASE, holder=actor
        )
        self._what = what

    def __enter__(self) -> None:
        try:
            self._cm.__enter__()
        except LockBusy as exc:
            since = f" since {exc.since:%H:%M} UTC" if exc.since else ""
            raise DbopsError(
                f"{self._what} is already running (by {exc.holder or 'another process'}{since}).",
                hint="Wait for it to finish; `/db log` shows its progress.",
            ) from None

    def __exit__(self, *exc: object) -> None:
        # Best effort: what ran under the lock has happened, and dbops' database being down
        # now must not turn it into a failure; an unreleased lock ends with its lease.
        try:
            self._cm.__exit__(None, None, None)
        except Exception as error:
            log.warning(
                "%s: its lock was not released (%s); it ends with its lease (%s)",
                self._what,
                type(error).__name__,
                LOCK_LEASE,
            )
