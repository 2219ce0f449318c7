"""Routine checklists from the manuals: data files, postings, and who ticked what, when.

A checklist is a TOML file in templates/checklists/ (title, the manual it comes from, an
APScheduler cron schedule, items). Each posting is a ChecklistRun; each item's latest state is a
ChecklistTick; every tick, untick, completion and nudge is also an event.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from core.errors import DbopsError
from core.names import not_found
from storage.events import EventLog
from storage.models_jobs import ChecklistRun, ChecklistTick

CHECKLISTS = Path(__file__).resolve().parents[1] / "templates" / "checklists"
CRON_FIELDS = {"year", "month", "day", "week", "day_of_week", "hour", "minute", "second"}


@dataclass(frozen=True)
class Checklist:
    name: str
    title: str
    items: tuple[str, ...]
    schedule: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class Item:
    index: int
    text: str
    done: bool
    user: str | None
    at: datetime | None


@dataclass(frozen=True)
class RunState:
    id: int
    name: str
    title: str
    items: tuple[Item, ...]
    posted_at: datetime
    posted_by: str
    channel: str | None
    message_ts: str | None
    completed_at: datetime | None
    nudged_at: datetime | None

    @property
    def open_items(self) -> list[Item]:
        return [i for i in self.items if not i.done]

    @property
    def complete(self) -> bool:
        return not self.open_items


def load_checklists(directory: Path = CHECKLISTS) -> dict[str, Checklist]:
    out: dict[str, Checklist] = {}
    for path in sorted(directory.glob("*.toml")):
        name = path.stem
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise DbopsError(f"checklist {path.name} is not valid TOML: {exc}") from None
        items = data.get("items")
        if not data.get("title") or not isinstance(items, list) or not items:
            raise DbopsError(f"checklist {path.name} needs a title and a list of items.")
        schedule = dict(data.get("schedule") or {})
        unknown = set(schedule) - CRON_FIELDS
        if unknown:
            raise DbopsError(
                f"checklist {path.name}: unknown schedule field(s) {', '.join(sorted(unknown))}.",
                hint=f"Use cron fields: {', '.join(sorted(CRON_FIELDS))}.",
            )
        out[name] = Checklist(
            name,
            str(data["title"]),
            tuple(str(i) for i in items),
            schedule,
            str(data.get("source", "")),
        )
    return out


def get_checklist(name: str, directory: Path = CHECKLISTS) -> Checklist:
    checklists = load_checklists(directory)
    if name not in checklists:
        raise not_found("checklist", name[:64], checklists)
    return checklists[name]


def _aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _state(session: Session, run: ChecklistRun) -> RunState:
    assert run.id is not None
    ticks = {
        t.item: t for t in session.exec(select(ChecklistTick).where(ChecklistTick.run_id == run.id))
    }
    items = tuple(
        Item(
            i,
            text,
            bool(ticks[i].done) if i in ticks else False,
            ticks[i].user if i in ticks else None,
            _aware(ticks[i].at) if i in ticks else None,
        )
        for i, text in enumerate(run.items)
    )
    return RunState(
        run.id,
        run.name,
        run.title,
        items,
        _aware(run.posted_at) or run.posted_at,
        run.posted_by,
        run.channel,
        run.message_ts,
        _aware(run.completed_at),
        _aware(run.nudged_at),
    )


def start_run(
    engine: Engine, events: EventLog, checklist: Checklist, *, actor: str, now: datetime
) -> RunState:
    with Session(engine) as session:
        run = ChecklistRun(
            name=checklist.name,
            title=checklist.title,
            items=list(checklist.items),
            posted_at=now,
            posted_by=actor,
        )
        session.add(run)
        session.commit()
        session.refresh(run)
        state = _state(session, run)
    events.append(
        "checklist.posted",
        f"checklist-{state.id}",
        {"checklist": checklist.name, "items": len(checklist.items)},
        actor=actor,
    )
    return state


def attach_message(engine: Engine, run_id: int, channel: str, ts: str) -> None:
    with Session(engine) as session:
        run = session.get(ChecklistRun, run_id)
        if run is None:
            raise DbopsError(f"no checklist run {run_id}.")
        run.channel, run.message_ts = channel, ts
        session.add(run)
        session.commit()


def run_state(engine: Engine, run_id: int) -> RunState:
    with Session(engine) as session:
        run = session.get(ChecklistRun, run_id)
        if run is None:
            raise DbopsError(f"no checklist run {run_id}.")
        return _state(session, run)


def set_done(
    engine: Engine, events: EventLog, run_id: int, done: set[int], *, user: str, now: datetime
) -> RunState:
    """Make the ticked items exactly ``done`` (Slack sends the whole checkbox state on each
    click); record each change as an event with the user who made it."""
    changes: list[tuple[int, bool]] = []
    with Session(engine) as session:
        run = session.get(ChecklistRun, run_id)
        if run is None:
            raise DbopsError(f"no checklist run {run_id}.")
        valid = set(range(len(run.items)))
        if not done <= valid:
            raise DbopsError("that checklist item does not exist (was the checklist edited?).")
        ticks = {
            t.item: t
            for t in session.exec(select(ChecklistTick).where(ChecklistTick.run_id == run_id))
        }
        for index in sorted(valid):
            want = index in done
            tick = ticks.get(index)
            if (tick.done if tick else False) == want:
                continue
            if tick is None:
                tick = ChecklistTick(run_id=run_id, item=index, done=want, user=user, at=now)
            else:
                tick.done, tick.user, tick.at = want, user, now
            session.add(tick)
            changes.append((index, want))
        completed = done == valid
        if completed and run.completed_at is None:
            run.completed_at = now
        elif not completed:
            run.completed_at = None
        session.add(run)
        session.commit()
        state = _state(session, run)
    subject = f"checklist-{run_id}"
    for index, want in changes:
        events.append(
            "checklist.tick" if want else "checklist.untick",
            subject,
            {"checklist": state.name, "item": index, "text": state.items[index].text},
            actor=user,
            ts=now,
        )
    if changes and state.complete:
        events.append("checklist.completed", subject, {"checklist": state.name}, actor=user, ts=now)
    return state


def unfinished(engine: Engine, *, posted_after: datetime | None = None) -> list[RunState]:
    """Posted checklists with items still open and no nudge yet."""
    with Session(engine) as session:
        stmt = select(ChecklistRun).where(
            col(ChecklistRun.completed_at).is_(None), col(ChecklistRun.nudged_at).is_(None)
        )
        if posted_after is not None:
            stmt = stmt.where(ChecklistRun.posted_at >= posted_after)
        return [_state(session, r) for r in session.exec(stmt.order_by(col(ChecklistRun.id)))]


def mark_nudged(engine: Engine, events: EventLog, state: RunState, *, now: datetime) -> None:
    with Session(engine) as session:
        run = session.get(ChecklistRun, state.id)
        if run is None:
            return
        run.nudged_at = now
        session.add(run)
        session.commit()
    events.append(
        "checklist.nudged",
        f"checklist-{state.id}",
        {"checklist": state.name, "open_items": [i.index for i in state.open_items]},
        actor="dbops",
        ts=now,
    )
