"""Who is on call now, and the handoff announcement when that changes.

For each role (primary, secondary) the first of these that names someone wins:

1. an admin's override (``/db oncall set primary @user``), stored in ``oncall_overrides`` until
   cleared or until its optional end;
2. the weekly rotation from fleet.toml ``[oncall] rotation``: week *w* has ``rotation[w % n]`` as
   primary and the next person, ``rotation[(w + 1) % n]``, as secondary (next week's primary
   backs up this week's). Weeks hand off on Monday at 09:00 in the configured time zone;
3. ``[oncall] primary`` / ``secondary``.

When the secondary would be the primary again (an override names this week's secondary as
primary, say) the next candidate down the list takes the secondary's place, so a page never
"escalates" to the person who already ignored it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, Literal

from sqlalchemy import Engine, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.errors import DbopsError
from core.fleet import Fleet
from storage.db import is_sqlite
from storage.events import EventLog
from storage.models_incidents import OnCallOverride, OnCallState, aware, utc, write_session

Role = Literal["primary", "secondary"]
ROLES: tuple[Role, ...] = ("primary", "secondary")
HANDOFF_WEEKDAY = 0  # Monday
HANDOFF_TIME = time(9, 0)
# The first rotation week starts on Monday 1970-01-05, so week numbers never depend on when
# the rotation was written down.
_EPOCH_MONDAY = date(1970, 1, 5)
_ANNOUNCED = "announced"
_MENTION = re.compile(r"^<@([UW][A-Z0-9_]{2,})(?:\|[^>]*)?>$")
_USER_ID = re.compile(r"^[UW][A-Z0-9_]{2,}$")


@dataclass(frozen=True)
class OnCallNow:
    primary: str | None
    secondary: str | None
    # Where each came from: override, rotation, fleet, or nobody.
    primary_from: str
    secondary_from: str
    escalation_channel: str | None
    next_handoff: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "secondary": self.secondary,
            "primary_from": self.primary_from,
            "secondary_from": self.secondary_from,
            "escalation_channel": self.escalation_channel,
            "next_handoff": self.next_handoff.isoformat() if self.next_handoff else None,
        }

    def user(self, role: str) -> str | None:
        return self.primary if role == "primary" else self.secondary


def parse_user(text: str) -> str:
    """A Slack user id from ``U012ABC`` or a mention ``<@U012ABC|bob>``; else a DbopsError."""
    raw = text.strip()
    match = _MENTION.match(raw)
    user = match.group(1) if match else raw.lstrip("@")
    if not _USER_ID.fullmatch(user):
        raise DbopsError(
            f"{raw[:40]!r} is not a Slack user.", hint="Mention them, e.g. `@bob`, or give an id."
        )
    return user


def parse_role(text: str) -> Role:
    role = text.strip().lower()
    if role == "primary":
        return "primary"
    if role == "secondary":
        return "secondary"
    raise DbopsError(f"{text[:20]!r} is not an on-call role.", hint="Use primary or secondary.")


def rotation_week(now: datetime, tz: tzinfo) -> tuple[int, datetime]:
    """The rotation week number at ``now`` and when the next handoff happens (aware, UTC)."""
    local = utc(now).astimezone(tz)
    day = local.date()
    start = datetime.combine(day - timedelta(days=day.weekday()), HANDOFF_TIME, tzinfo=tz)
    if local < start:
        start = datetime.combine(start.date() - timedelta(days=7), HANDOFF_TIME, tzinfo=tz)
    week = (start.date() - _EPOCH_MONDAY).days // 7
    following = datetime.combine(start.date() + timedelta(days=7), HANDOFF_TIME, tzinfo=tz)
    return week, following.astimezone(UTC)


def _active_overrides(session: Session, now: datetime) -> dict[str, str]:
    stmt = (
        select(OnCallOverride)
        .where(col(OnCallOverride.cleared_at).is_(None))
        .where(col(OnCallOverride.set_at) <= now)
        .where(or_(col(OnCallOverride.ends_at).is_(None), col(OnCallOverride.ends_at) > now))
        .order_by(col(OnCallOverride.set_at), col(OnCallOverride.id))
    )
    found: dict[str, str] = {}
    for row in session.exec(stmt):
        found[row.role] = row.user_id  # the newest wins
    return found


def current(
    engine: Engine, fleet: Fleet, *, now: datetime | None = None, tz: tzinfo = UTC
) -> OnCallNow:
    """Primary and secondary at ``now`` (default: the current time)."""
    now = utc(now or datetime.now(UTC))
    with Session(engine) as session:
        overrides = _active_overrides(session, now)
    policy = fleet.oncall
    next_handoff: datetime | None = None
    rot_primary = rot_secondary = None
    if policy.rotation:
        week, next_handoff = rotation_week(now, tz)
        n = len(policy.rotation)
        rot_primary = policy.rotation[week % n]
        rot_secondary = policy.rotation[(week + 1) % n] if n > 1 else None

    def pick(candidates: list[tuple[str | None, str]], avoid: str | None) -> tuple[str | None, str]:
        for user, source in candidates:
            if user and user != avoid:
                return user, source
        return None, "nobody"

    primary, primary_from = pick(
        [
            (overrides.get("primary"), "override"),
            (rot_primary, "rotation"),
            (policy.primary, "fleet"),
        ],
        None,
    )
    secondary, secondary_from = pick(
        [
            (overrides.get("secondary"), "override"),
            (rot_secondary, "rotation"),
            (policy.secondary, "fleet"),
            # This week's rotation primary, when an override took the primary's place.
            (rot_primary if primary_from == "override" else None, "rotation"),
        ],
        primary,
    )
    return OnCallNow(
        primary,
        secondary,
        primary_from,
        secondary_from,
        policy.escalation_channel,
        next_handoff,
    )


def set_oncall(
    engine: Engine,
    events: EventLog,
    fleet: Fleet,
    role: str,
    user: str,
    *,
    actor: str,
    now: datetime | None = None,
    until: datetime | None = None,
    tz: tzinfo = UTC,
) -> OnCallNow:
    """An override: ``user`` is ``role`` from now until cleared (or ``until``).

    Admin only: the bot checks the role; ``actor`` is recorded.
    """
    role = parse_role(role)
    user = parse_user(user)
    now = utc(now or datetime.now(UTC))
    if until is not None and utc(until) <= now:
        raise DbopsError("an on-call override must end in the future.")
    with write_session(engine) as session:
        for old in session.exec(
            select(OnCallOverride)
            .where(OnCallOverride.role == role)
            .where(col(OnCallOverride.cleared_at).is_(None))
        ):
            old.cleared_at, old.cleared_by = now, actor
            session.add(old)
        session.add(
            OnCallOverride(
                role=role,
                user_id=user,
                set_by=actor,
                set_at=now,
                ends_at=utc(until) if until else None,
            )
        )
    events.append(
        "oncall.set",
        "oncall",
        {"role": role, "user": user, "until": until},
        actor=actor,
        ts=now,
    )
    return current(engine, fleet, now=now, tz=tz)


def clear_oncall(
    engine: Engine,
    events: EventLog,
    fleet: Fleet,
    role: str,
    *,
    actor: str,
    now: datetime | None = None,
    tz: tzinfo = UTC,
) -> OnCallNow:
    """Drop the override for ``role``: the rotation (or the fleet file) applies again."""
    role = parse_role(role)
    now = utc(now or datetime.now(UTC))
    cleared = 0
    with write_session(engine) as session:
        for old in session.exec(
            select(OnCallOverride)
            .where(OnCallOverride.role == role)
            .where(col(OnCallOverride.cleared_at).is_(None))
        ):
            old.cleared_at, old.cleared_by = now, actor
            session.add(old)
            cleared += 1
    if cleared:
        events.append("oncall.cleared", "oncall", {"role": role}, actor=actor, ts=now)
    return current(engine, fleet, now=now, tz=tz)


def _who(user: str | None) -> str:
    return f"<@{user}>" if user else "nobody"


def handoff(
    engine: Engine,
    events: EventLog,
    fleet: Fleet,
    *,
    now: datetime | None = None,
    tz: tzinfo = UTC,
) -> str | None:
    """The handoff announcement when who is on call differs from what was last announced.

    The scheduler calls this every few minutes and posts what it returns. The comparison and
    the update are one transaction, so two schedulers never announce the same handoff twice.
    """
    now = utc(now or datetime.now(UTC))
    on = current(engine, fleet, now=now, tz=tz)
    try:
        before = _swap_announced(engine, on, now)
    except IntegrityError:
        return None  # another scheduler announced the very first pair a moment ago
    if before is None:
        return None
    lines = ["On-call handoff." if before != (None, None) else "On call now."]
    for role, old, new in (
        ("Primary", before[0], on.primary),
        ("Secondary", before[1], on.secondary),
    ):
        lines.append(f"{role}: {_who(new)}" + (f" (was {_who(old)})" if old and old != new else ""))
    if on.next_handoff is not None:
        lines.append(f"Next handoff: {on.next_handoff.astimezone(tz):%a %Y-%m-%d %H:%M %Z}.")
    if on.primary is None:
        lines.append("Nobody is on call as primary: pages go to the escalation channel.")
    text = "\n".join(lines)
    events.append(
        "oncall.handoff",
        "oncall",
        {
            "primary": on.primary,
            "secondary": on.secondary,
            "was_primary": before[0],
            "was_secondary": before[1],
        },
        actor="dbops",
        ts=now,
    )
    return text


def _swap_announced(
    engine: Engine, on: OnCallNow, now: datetime
) -> tuple[str | None, str | None] | None:
    """Store ``on`` as announced; returns the pair announced before, or None when ``on`` was
    announced already. One transaction, the state row locked, so only one caller wins."""
    with write_session(engine) as session:
        stmt = select(OnCallState).where(OnCallState.name == _ANNOUNCED)
        if not is_sqlite(engine):
            stmt = stmt.with_for_update()
        state = session.exec(stmt).first()
        pair = (on.primary, on.secondary)
        if state is not None and (state.primary_user, state.secondary_user) == pair:
            return None
        before = (state.primary_user, state.secondary_user) if state else (None, None)
        if state is None:
            state = OnCallState(name=_ANNOUNCED, updated_at=now)
        state.primary_user, state.secondary_user, state.updated_at = on.primary, on.secondary, now
        session.add(state)
    return before


def last_announced(engine: Engine) -> tuple[str | None, str | None, datetime | None]:
    with Session(engine) as session:
        state = session.get(OnCallState, _ANNOUNCED)
    if state is None:
        return None, None, None
    return state.primary_user, state.secondary_user, aware(state.updated_at)
