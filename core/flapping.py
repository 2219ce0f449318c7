"""Flap damping: a check that keeps changing its mind pages once, not every time.

Every alert the desk takes in is an observation of its key (a check on a subject): firing or
ok. A key that changes state ``FLAP_CHANGES`` (4) or more times within ``FLAP_WINDOW`` (30
minutes) is *flapping*: the desk says so once (event ``incident.flapping`` and one message to
the primary on call) and the pager holds that key's incidents' pages until it has held steady
for ``STABLE_SWEEPS`` (2) observations in a row (a health sweep observes every key once a
minute), or has not changed for a whole ``FLAP_WINDOW``. Every change still goes on the
incident's timeline: damping quiets the pager, never the record.

State lives in ``check_states`` (storage/models_maintenance.py), one row per key that has
fired; a key ok and quiet for ``FLAP_WINDOW`` is dropped. Most sweeps change nothing and
write nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Engine, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from storage.models_incidents import aware, utc, write_session
from storage.models_maintenance import CheckStateRow

FLAP_CHANGES = 4
FLAP_WINDOW = timedelta(minutes=30)
STABLE_SWEEPS = 2

State = Literal["firing", "ok"]


@dataclass(frozen=True)
class FlapChange:
    """A key starting or ending a flapping episode (``changes``: its changes in the window)."""

    key: str
    what: Literal["started", "ended"]
    changes: int
    episode: int


@dataclass
class _Row:
    key: str
    state: str
    changed_at: datetime
    changes: list[datetime]
    flapping: bool
    flapping_since: datetime | None
    stable: int
    episodes: int
    new: bool = False
    dirty: bool = False
    gone: bool = False

    @classmethod
    def of(cls, row: CheckStateRow) -> _Row:
        changed = aware(row.changed_at)
        assert changed is not None
        return cls(
            row.key,
            row.state,
            changed,
            [utc(datetime.fromisoformat(c)) for c in row.changes or []],
            bool(row.flapping),
            aware(row.flapping_since),
            row.stable,
            row.episodes,
        )


def _step(rows: dict[str, _Row], key: str, state: State, now: datetime) -> FlapChange | None:
    row = rows.get(key)
    if row is None:
        if state == "ok":
            return None  # healthy and never fired: nothing to keep
        rows[key] = _Row(key, state, now, [now], False, None, 0, 0, new=True, dirty=True)
        return None
    if row.state != state:
        row.changes = [c for c in row.changes if now - c < FLAP_WINDOW] + [now]
        row.state, row.changed_at, row.stable, row.dirty = state, now, 0, True
        if not row.flapping and len(row.changes) >= FLAP_CHANGES:
            row.flapping, row.flapping_since, row.episodes = True, now, row.episodes + 1
            return FlapChange(key, "started", len(row.changes), row.episodes)
        return None
    if row.flapping:
        row.stable, row.dirty = row.stable + 1, True
        if row.stable >= STABLE_SWEEPS or now - row.changed_at >= FLAP_WINDOW:
            row.flapping = False
            return FlapChange(key, "ended", len(row.changes), row.episodes)
        return None
    if state == "ok" and now - row.changed_at >= FLAP_WINDOW:
        row.gone = True  # quiet and healthy for the whole window: forget it
    return None


class FlapTracker:
    """Observes alert keys' states and tells when one starts or stops flapping."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _read(self, session: Session, keys: Iterable[str], lock: bool) -> dict[str, _Row]:
        """The rows of ``keys``. The table holds only keys that fired lately, so it is read
        whole: a sweep of a big fleet observes thousands of keys, too many for one IN list."""
        wanted = set(keys)
        stmt = select(CheckStateRow)
        if lock:
            stmt = stmt.with_for_update()
        return {r.key: _Row.of(r) for r in session.exec(stmt) if r.key in wanted}

    def observe(self, observations: Sequence[tuple[str, State]], now: datetime) -> list[FlapChange]:
        """Take one batch of observations (key, state), in order; returns the flapping
        episodes that started or ended. Writes only when some key's state moves."""
        if not observations:
            return []
        now = utc(now)
        keys = [k for k, _ in observations]
        with Session(self.engine) as session:
            rows = self._read(session, keys, lock=False)
        probe = dict(rows)
        for key, state in observations:
            _step(probe, key, state, now)
        if not any(r.dirty or r.gone for r in probe.values()):
            return []
        for _attempt in range(3):
            try:
                return self._apply(observations, now)
            except IntegrityError:
                continue  # another observer inserted the same key first: read it again
        return []

    def _apply(self, observations: Sequence[tuple[str, State]], now: datetime) -> list[FlapChange]:
        out: list[FlapChange] = []
        with write_session(self.engine) as session:
            rows = self._read(session, [k for k, _ in observations], lock=True)
            for key, state in observations:
                change = _step(rows, key, state, now)
                if change is not None:
                    out.append(change)
            gone = [r.key for r in rows.values() if r.gone]
            if gone:
                session.connection().execute(
                    delete(CheckStateRow).where(col(CheckStateRow.key).in_(gone))
                )
            for r in rows.values():
                if r.gone or not r.dirty:
                    continue
                row = CheckStateRow(
                    key=r.key,
                    state=r.state,
                    changed_at=r.changed_at,
                    changes=[c.isoformat() for c in r.changes],
                    flapping=r.flapping,
                    flapping_since=r.flapping_since,
                    stable=r.stable,
                    episodes=r.episodes,
                    updated_at=now,
                )
                if r.new:
                    session.add(row)
                else:
                    session.merge(row)
        return out

    def flapping(self, keys: Iterable[str], now: datetime) -> set[str]:
        """Which of ``keys`` are flapping now."""
        wanted = sorted({k for k in keys if k})
        if not wanted:
            return set()
        now = utc(now)
        stmt = (
            select(CheckStateRow)
            .where(col(CheckStateRow.key).in_(wanted))
            .where(col(CheckStateRow.flapping).is_(True))
        )
        with Session(self.engine) as session:
            rows = list(session.exec(stmt))
        return {r.key for r in rows if now - (aware(r.changed_at) or now) < FLAP_WINDOW}

    def changes(self, key: str) -> int:
        with Session(self.engine) as session:
            row = session.get(CheckStateRow, key)
        return len(row.changes or []) if row is not None else 0
