"""Flap damping: a check that changes state 4 or more times in 30 minutes says so once and
pages no more until it holds steady for two sweeps; its incident's timeline keeps every change.

alice is primary on call, bob secondary; the secondary is paged 5 minutes after an unacked
page. The check is vps1's pgbouncer (a P1: it escalates), seen by a health sweep a minute.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select

from core.alerts import Alert
from core.customers import Customer, upsert_customers
from core.escalation import Escalator
from core.flapping import FlapTracker
from core.fleet import parse_fleet
from core.incidents import Incidents
from core.maintenance import Maintenance
from core.notify import RecordingNotifier
from storage.events import EventLog
from storage.models_maintenance import CheckStateRow

ALICE, BOB = "U0ALICE", "U0BOB"
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
KEY = "check:pgbouncer:vps1"


def pgbouncer(status: str) -> Alert:
    return Alert(status, "check", KEY, "P1", "pgbouncer critical on vps1: not answering",  # type: ignore[arg-type]
                 "health", "pgbouncer", server="vps1")  # fmt: skip


class Desk:
    def __init__(self, engine: Engine) -> None:
        upsert_customers(engine, [Customer("acme", "vps1", "acme", "acme", "small")])
        fleet = parse_fleet(
            {
                "servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}],
                "oncall": {"primary": ALICE, "secondary": BOB, "escalation_channel": "#esc"},
                "escalation": {"ack_timeout": "5m", "channel_after": "15m", "repeat": 0},
            }
        )
        self.events = EventLog(engine)
        self.notifier = RecordingNotifier()
        self.pager = Escalator(engine, self.events, fleet, self.notifier, clock=lambda: T0)
        self.incidents = Incidents(engine, self.events, fleet, escalator=self.pager)
        self.windows = Maintenance(engine, self.events, fleet)

    def sweep(self, minute: int, status: str) -> None:
        now = T0 + timedelta(minutes=minute)
        self.incidents.ingest([pgbouncer(status)], now=now)
        self.pager.tick(now)

    def told(self) -> list[tuple[str, str, str]]:
        return [(s.how, s.to, s.message.text) for s in self.notifier.sent if s.how != "update"]


@pytest.fixture
def desk(sqlite_engine: Engine) -> Desk:
    return Desk(sqlite_engine)


def test_a_check_toggled_ten_times_in_ten_minutes_notifies_at_most_twice(desk: Desk) -> None:
    for minute in range(10):  # crit, ok, crit, ok, ... a change every sweep
        desk.sweep(minute, "firing" if minute % 2 == 0 else "resolved")
    told = desk.told()
    assert len(told) == 2, told
    assert told[0][:2] == ("dm", ALICE) and "pgbouncer critical" in told[0][2]
    assert told[1][:2] == ("dm", ALICE) and "is flapping" in desk.notifier.sent[1].message.text
    (marker,) = desk.events.query(kind="incident.flapping")
    (inc,) = desk.incidents.list_incidents()
    assert marker.subject == inc.ref and marker.payload["changes"] == 4
    assert marker.payload["notified"] is True
    # Every change is on the incident's timeline: opened, then 9 more.
    changes = [e.kind for e in desk.incidents.timeline(inc.id) if e.kind.startswith("alert.")]
    assert changes == ["alert.firing"] + ["alert.recovered", "alert.refired"] * 4 + [
        "alert.recovered"
    ]
    assert [e.kind for e in desk.events.query(kind="escalation.held")] == ["escalation.held"]

    # Steady (ok) for two sweeps: it is no longer flapping, and the held page goes out.
    desk.sweep(10, "resolved")
    assert desk.events.query(kind="incident.flapping_ended") == []
    desk.sweep(11, "resolved")
    (ended,) = desk.events.query(kind="incident.flapping_ended")
    assert ended.subject == inc.ref
    assert desk.told()[2][:2] == ("dm", BOB), "the escalation the flapping held, at last"


def test_a_new_incident_for_a_flapping_check_pages_no_one(desk: Desk) -> None:
    for minute in range(4):
        desk.sweep(minute, "firing" if minute % 2 == 0 else "resolved")
    (first,) = desk.incidents.list_incidents()
    desk.incidents.resolve(
        first.id, "pgbouncer restarted", actor=ALICE, now=T0 + timedelta(minutes=4)
    )
    before = len(desk.told())
    for minute in range(5, 9):  # it goes on flapping: a new incident, held
        desk.sweep(minute, "firing" if minute % 2 == 1 else "resolved")
    (second,) = desk.incidents.list_incidents()
    assert second.id != first.id
    assert len(desk.told()) == before, desk.told()
    assert len(desk.events.query(kind="incident.flapping")) == 1, "one marker per episode"


def test_flapping_inside_a_maintenance_window_tells_no_one(desk: Desk) -> None:
    desk.windows.schedule("vps1", "1h", "pgbouncer upgrade", actor=ALICE, now=T0)
    for minute in range(10):
        desk.sweep(minute, "firing" if minute % 2 == 0 else "resolved")
    assert desk.told() == [] and desk.incidents.list_incidents() == []
    (marker,) = desk.events.query(kind="incident.flapping")
    assert marker.subject == "vps1" and marker.payload["notified"] is False


def test_what_counts_as_flapping(sqlite_engine: Engine) -> None:
    tracker = FlapTracker(sqlite_engine)

    def at(minute: float) -> datetime:
        return T0 + timedelta(minutes=minute)

    def rows() -> int:
        with sqlite_engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(CheckStateRow)).scalar_one())

    # Healthy keys that never fired leave nothing behind, whatever the number of sweeps.
    for minute in range(5):
        assert tracker.observe([("check:x:a", "ok"), ("check:y:a", "ok")], at(minute)) == []
    assert rows() == 0
    # Three changes is a bad patch, not flapping; the fourth within 30 minutes is.
    for minute, state in ((0, "firing"), (1, "ok"), (2, "firing")):
        assert tracker.observe([("k", state)], at(minute)) == []  # type: ignore[list-item]
    (started,) = tracker.observe([("k", "ok")], at(3))
    assert (started.key, started.what, started.changes, started.episode) == ("k", "started", 4, 1)
    assert tracker.flapping(["k", "other"], at(3)) == {"k"}
    assert tracker.observe([("k", "ok")], at(4)) == []
    (steady,) = tracker.observe([("k", "ok")], at(5))
    assert steady.what == "ended" and tracker.flapping(["k"], at(5)) == set()
    # Changes spread over more than 30 minutes are not flapping.
    for minute, state in ((0, "firing"), (11, "ok"), (22, "firing"), (33, "ok"), (44, "firing")):
        assert tracker.observe([("slow", state)], at(minute)) == []  # type: ignore[list-item]
    assert tracker.observe([("slow", "ok")], at(55)) == []  # 33, 44, 55: three in 30 min
    # Quiet and healthy for 30 minutes: forgotten.
    before = rows()
    tracker.observe([("slow", "ok")], at(84))
    assert rows() == before
    tracker.observe([("slow", "ok")], at(85))
    assert rows() == before - 1
