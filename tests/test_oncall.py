"""On call: override > weekly rotation > fleet file; the handoff is announced once per change.

The rotation is alice, bob, carol; weeks hand off on Monday at 09:00 New York time.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine

from core import oncall
from core.errors import DbopsError
from core.escalation import Escalator
from core.fleet import Fleet, parse_fleet
from core.incidents import Incidents
from core.notify import RecordingNotifier
from storage.events import EventLog

ALICE, BOB, CAROL, DAVE = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"
NY = ZoneInfo("America/New_York")
# Monday 2026-03-02 08:59 and 09:00 in New York.
BEFORE_HANDOFF = datetime(2026, 3, 2, 8, 59, tzinfo=NY)
AFTER_HANDOFF = datetime(2026, 3, 2, 9, 0, tzinfo=NY)


def make_fleet(**on: Any) -> Fleet:
    return parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}],
            "oncall": {"primary": DAVE, "secondary": None, "escalation_channel": "#esc", **on},
        }
    )


def test_the_fleet_file_when_there_is_no_rotation(engine: Engine) -> None:
    now = oncall.current(engine, make_fleet(secondary=BOB))
    assert (now.primary, now.secondary) == (DAVE, BOB)
    assert (now.primary_from, now.secondary_from) == ("fleet", "fleet")
    assert now.next_handoff is None
    nobody = oncall.current(engine, make_fleet(primary=None))
    assert (nobody.primary, nobody.primary_from) == (None, "nobody")


def test_the_weekly_rotation_hands_off_on_monday_morning(engine: Engine) -> None:
    fleet = make_fleet(rotation=[ALICE, BOB, CAROL])
    before = oncall.current(engine, fleet, now=BEFORE_HANDOFF, tz=NY)
    after = oncall.current(engine, fleet, now=AFTER_HANDOFF, tz=NY)
    assert before.primary != after.primary
    assert (
        after.secondary == [ALICE, BOB, CAROL][([ALICE, BOB, CAROL].index(after.primary) + 1) % 3]
    )
    assert before.next_handoff == AFTER_HANDOFF.astimezone(UTC)
    assert after.next_handoff == (AFTER_HANDOFF + timedelta(days=7)).astimezone(UTC)
    # Three weeks later the same person is on call again; Sunday night is still last week.
    assert oncall.current(engine, fleet, now=AFTER_HANDOFF + timedelta(weeks=3), tz=NY).primary == (
        after.primary
    )
    sunday = oncall.current(engine, fleet, now=AFTER_HANDOFF + timedelta(days=6, hours=14), tz=NY)
    assert sunday.primary == after.primary
    week, _ = oncall.rotation_week(AFTER_HANDOFF, NY)
    assert after.primary == [ALICE, BOB, CAROL][week % 3]


def test_an_override_wins_until_cleared_or_it_ends(engine: Engine) -> None:
    fleet = make_fleet(rotation=[ALICE, BOB])
    events = EventLog(engine)
    now = AFTER_HANDOFF
    week = oncall.current(engine, fleet, now=now, tz=NY)
    taken = oncall.set_oncall(
        engine, events, fleet, "primary", f"<@{CAROL}|carol>", actor=ALICE, now=now, tz=NY
    )
    assert (taken.primary, taken.primary_from) == (CAROL, "override")
    assert taken.secondary == week.secondary
    (event,) = events.query(kind="oncall.set")
    assert event.actor == ALICE and event.payload == {
        "role": "primary",
        "user": CAROL,
        "until": None,
    }
    cleared = oncall.clear_oncall(engine, events, fleet, "primary", actor=ALICE, now=now, tz=NY)
    assert cleared.primary == week.primary
    # A bounded override: over when it ends.
    later = now + timedelta(hours=1)
    oncall.set_oncall(engine, events, fleet, "secondary", DAVE, actor=CAROL, now=now, until=later)
    assert oncall.current(engine, fleet, now=later - timedelta(seconds=1), tz=NY).secondary == DAVE
    assert oncall.current(engine, fleet, now=later, tz=NY).secondary == week.secondary


def test_the_secondary_is_never_the_primary_again(engine: Engine) -> None:
    fleet = make_fleet(rotation=[ALICE, BOB])
    events = EventLog(engine)
    week = oncall.current(engine, fleet, now=AFTER_HANDOFF, tz=NY)
    assert week.secondary is not None
    now = oncall.set_oncall(
        engine, events, fleet, "primary", week.secondary, actor=CAROL, now=AFTER_HANDOFF, tz=NY
    )
    assert now.primary == week.secondary
    assert now.secondary is not None and now.secondary != now.primary


@pytest.mark.parametrize("text", ["U0BOB", "<@U0BOB>", "<@U0BOB|bob>", "@U0BOB", " U0BOB "])
def test_user_forms(text: str) -> None:
    assert oncall.parse_user(text) == BOB


@pytest.mark.parametrize("text", ["bob", "<#C123|ops>", "U0BOB; rm -rf /", ""])
def test_bad_users_are_refused(text: str) -> None:
    with pytest.raises(DbopsError):
        oncall.parse_user(text)


def test_bad_role_and_past_until_are_refused(engine: Engine) -> None:
    fleet, events = make_fleet(), EventLog(engine)
    with pytest.raises(DbopsError, match="primary or secondary"):
        oncall.set_oncall(engine, events, fleet, "tertiary", BOB, actor=CAROL)
    with pytest.raises(DbopsError, match="future"):
        oncall.set_oncall(
            engine,
            events,
            fleet,
            "primary",
            BOB,
            actor=CAROL,
            until=datetime(2000, 1, 1, tzinfo=UTC),
        )


def test_the_handoff_is_announced_once_per_change(engine: Engine) -> None:
    fleet = make_fleet(rotation=[ALICE, BOB])
    events = EventLog(engine)
    first = oncall.handoff(engine, events, fleet, now=BEFORE_HANDOFF, tz=NY)
    assert first is not None and first.startswith("On call now.")
    assert oncall.handoff(engine, events, fleet, now=BEFORE_HANDOFF, tz=NY) is None
    # Two schedulers notice Monday's handoff at the same moment: one announcement.
    said: list[str | None] = []
    barrier = threading.Barrier(4)

    def announce() -> None:
        barrier.wait()
        said.append(oncall.handoff(engine, events, fleet, now=AFTER_HANDOFF, tz=NY))

    threads = [threading.Thread(target=announce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (message,) = [s for s in said if s]
    assert message.startswith("On-call handoff.") and "(was <@" in message
    assert "Next handoff: Mon 2026-03-09 09:00 EDT." in message
    assert len(events.query(kind="oncall.handoff")) == 2
    # An override is a change too.
    oncall.set_oncall(engine, events, fleet, "primary", CAROL, actor=ALICE, now=AFTER_HANDOFF)
    assert f"Primary: <@{CAROL}>" in (
        oncall.handoff(engine, events, fleet, now=AFTER_HANDOFF) or ""
    )


def test_pages_go_to_whoever_is_on_call_at_send_time(engine: Engine) -> None:
    fleet = make_fleet(primary=ALICE, secondary=BOB)
    events = EventLog(engine)
    notifier = RecordingNotifier()
    pager = Escalator(engine, events, fleet, notifier)
    desk = Incidents(engine, events, fleet, escalator=pager)
    oncall.set_oncall(engine, events, fleet, "secondary", CAROL, actor=ALICE)
    inc = desk.open("vps1 PostgreSQL down", "P1", actor=ALICE, server="vps1")
    pager.tick(inc.opened_at + fleet.escalation.ack_timeout)
    assert [(s.how, s.to) for s in notifier.sent] == [("dm", ALICE), ("dm", CAROL)]
