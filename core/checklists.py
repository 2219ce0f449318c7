"""Routine checklists from the manuals: data files, postings, and who ticked what, when.

A checklist is a TOML file in templates/checklists/ (title, the manual it comes from, an
APScheduler cron schedule, items, and ``attach``: what its posting carries besides the items,
from ``ATTACHMENTS``; core.ops.Ops.checklist_attachments makes them). Each posting is a
ChecklistRun; each item's latest state is a ChecklistTick; every tick, untick, completion and
nudge is also an event.
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
from storage.models_incidents import write_session
from storage.models_jobs import ChecklistRun, ChecklistTick

CHECKLISTS = Path(__file__).resolve().parents[1] / "templates" / "checklists"
CRON_FIELDS = {"year", "month", "day", "week", "day_of_week", "hour", "minute", "second"}
# What a checklist may attach: name -> what it is.
ATTACHMENTS = {"capacity": "the fleet's disk chart, with servers by runway and customers by growth"}


@dataclass(frozen=True)
class Checklist:
    name: str
    title: str
    items: tuple[str, ...]
    schedule: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    attach: tuple[str, ...] = ()


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
    # Changes with every tick or untick: a rendering names it so clients drop stale state.
    revision: int = 0

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
        attach = data.get("attach", [])
        if not isinstance(attach, list) or not set(map(str, attach)) <= set(ATTACHMENTS):
            raise DbopsError(
                f"checklist {path.name}: attach is a list of {', '.join(sorted(ATTACHMENTS))}."
            )
        out[name] = Checklist(
            name,
            str(data["title"]),
            tuple(str(i) for i in items),
            schedule,
            str(data.get("source", "")),
            tuple(str(a) for a in attach),
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
        max((_revision(t.at) for t in ticks.values()), default=0),
    )


def _revision(at: datetime) -> int:
    aware = _aware(at) or at
    return int(aware.timestamp() * 1_000_000)


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
    """Make the ticked items exactly ``done``: every item not in it is unticked. For the shell
    and tests; a Slack click goes through ``apply`` with only the change it carries."""
    state = run_state(engine, run_id)
    if not done <= {i.index for i in state.items}:
        raise DbopsError("that checklist item does not exist (was the checklist edited?).")
    return apply(
        engine, events, run_id, {i.index: i.index in done for i in state.items}, user=user, now=now
    )


def apply(
    engine: Engine,
    events: EventLog,
    run_id: int,
    changes: dict[int, bool],
    *,
    user: str,
    now: datetime,
    via: str | None = None,
) -> RunState:
    """Tick (True) or untick (False) the given items only, leaving every other item as it is,
    so two people ticking different items at once both stay ticked. Each change is an event
    with the user who made it; ``via`` (the rendering clicked) goes into the event so that
    ``changes_by`` can tell what that person's client has since shown."""
    applied: list[tuple[int, bool]] = []
    # Read-modify-write under the write lock (the run's row lock on PostgreSQL), so two clicks
    # at once are applied one after the other, each to the other's result.
    with write_session(engine) as session:
        run = session.get(ChecklistRun, run_id, with_for_update=True)
        if run is None:
            raise DbopsError(f"no checklist run {run_id}.")
        if not set(changes) <= set(range(len(run.items))):
            raise DbopsError("that checklist item does not exist (was the checklist edited?).")
        ticks = {
            t.item: t
            for t in session.exec(select(ChecklistTick).where(ChecklistTick.run_id == run_id))
        }
        for index, want in sorted(changes.items()):
            tick = ticks.get(index)
            if (tick.done if tick else False) == want:
                continue
            if tick is None:
                tick = ChecklistTick(run_id=run_id, item=index, done=want, user=user, at=now)
                ticks[index] = tick
            else:
                tick.done, tick.user, tick.at = want, user, now
            session.add(tick)
            applied.append((index, want))
        complete = all(ticks[i].done if i in ticks else False for i in range(len(run.items)))
        if complete and run.completed_at is None:
            run.completed_at = now
        elif not complete:
            run.completed_at = None
        session.add(run)
        session.flush()
        state = _state(session, run)
    subject = f"checklist-{run_id}"
    for index, want in applied:
        payload: dict[str, Any] = {"checklist": state.name, "item": index}
        payload["text"] = state.items[index].text
        if via is not None:
            payload["via"] = via
        events.append(
            "checklist.tick" if want else "checklist.untick", subject, payload, actor=user, ts=now
        )
    if applied and state.complete:
        events.append("checklist.completed", subject, {"checklist": state.name}, actor=user, ts=now)
    return state


def changes_by(events: EventLog, run_id: int, *, user: str, via: str) -> dict[int, bool]:
    """The changes ``user`` made through the rendering ``via``, latest per item: what their
    client shows on top of that rendering until the message is updated."""
    out: dict[int, bool] = {}
    for event in events.query(
        subject=f"checklist-{run_id}", kind_prefix="checklist.", limit=10_000
    ):
        mine = event.actor == user and event.payload.get("via") == via
        if mine and event.kind in ("checklist.tick", "checklist.untick"):
            out[int(event.payload["item"])] = event.kind == "checklist.tick"
    return out


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
