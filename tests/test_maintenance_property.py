"""The maintenance promises over interleavings (hypothesis): an alert on acme's database
{starts, ends} x windows on vps1 or acme {start, end early, are cancelled}, with escalation
steps pending from before a window.

A simulated scheduler on a fake clock: a health sweep on the minute (first the windows whose
end has passed, core.maintenance.close_due, then the sweep's alerts), Alertmanager deliveries
at the moment an alert changes, the pager ticking whenever a step is due. Coverage is worked
out here from the model, not asked of the code. The promises:

1. nothing is sent (page, post or reminder) while a window covers acme;
2. an alert still firing when the cover ends pages within 60 s (the next sweep), unless
   another window starts within that minute: then 1. holds, and it pages when that one ends;
3. an alert that started and recovered inside a cover never pages;
4. an incident opened before a cover whose alert recovered inside it pages no more;
5. an alert starting outside any cover pages within 60 s (no window: as ever).

Plan: the secondary 5 min after a page, the channel after 15, six rounds (120 min, past the
horizon; a step is due at least every 10 minutes, so an incident open through a cover, which
lasts 10 minutes or more, always has one held).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from core.alerts import Alert
from core.customers import Customer, upsert_customers
from core.escalation import Escalator
from core.fleet import Fleet, parse_fleet
from core.incidents import Incidents
from core.maintenance import Maintenance
from core.notify import Message, MessageRef
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade

ALICE, BOB, ESC = "U0ALICE", "U0BOB", "#db-escalations"
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
HORIZON = 110  # minutes simulated: past the last cover (at most 102) and its minute after
MINUTE = timedelta(minutes=1)
SECOND = timedelta(seconds=1)
REMINDER = "send the customers an update"


def fleet() -> Fleet:
    return parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}],
            "oncall": {"primary": ALICE, "secondary": BOB, "escalation_channel": ESC},
            "escalation": {"ack_timeout": "5m", "channel_after": "15m", "repeat": 5},
        }
    )


@dataclass
class Sim:
    now: datetime = T0


@dataclass
class Sent:
    at: datetime
    how: str
    to: str
    text: str

    @property
    def page(self) -> bool:
        return REMINDER not in self.text


@dataclass
class FakeNotifier:
    sim: Sim
    sent: list[Sent] = field(default_factory=list)

    def _add(self, how: str, to: str, message: Message) -> MessageRef:
        self.sent.append(Sent(self.sim.now, how, to, message.text))
        return MessageRef(to, f"{len(self.sent)}.0")

    def dm(self, user: str, message: Message) -> MessageRef:
        return self._add("dm", user, message)

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        return self._add("post", channel, message)

    def update(self, ref: MessageRef, message: Message) -> None:
        pass


# --- the model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedWindow:
    target: str  # vps1 (covers acme's database) or acme
    start: timedelta
    length: timedelta
    action: str  # none, end, cancel
    action_at: timedelta  # end: start + >= 10 min; cancel: before start

    def covers(self) -> tuple[timedelta, timedelta] | None:
        if self.action == "cancel":
            return None
        end = self.start + self.length
        if self.action == "end":
            end = min(end, self.action_at)
        return (self.start, end)


@dataclass(frozen=True)
class Story:
    source: str  # health, alertmanager
    windows: tuple[PlannedWindow, ...]
    first: tuple[timedelta, timedelta | None]  # an episode: starts, ends (None: keeps firing)
    second: timedelta | None  # a later episode that keeps firing

    def firing(self, t: timedelta) -> bool:
        a, b = self.first
        if a <= t and (b is None or t < b):
            return True
        return self.second is not None and t >= self.second

    def changes(self) -> list[timedelta]:
        out = [self.first[0]]
        if self.first[1] is not None:
            out.append(self.first[1])
        if self.second is not None:
            out.append(self.second)
        return out

    def covers(self) -> list[tuple[timedelta, timedelta]]:
        """The covers, windows that overlap or touch merged: [start, end)."""
        spans = sorted(c for w in self.windows if (c := w.covers()) is not None)
        merged: list[tuple[timedelta, timedelta]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        return merged

    def covered(self, t: timedelta) -> bool:
        return any(s <= t < e for s, e in self.covers())


minutes = st.integers(min_value=0, max_value=60).map(lambda m: timedelta(minutes=m))


@st.composite
def windows(draw: st.DrawFn) -> PlannedWindow:
    start = draw(minutes) + timedelta(minutes=1)
    length = timedelta(minutes=draw(st.integers(10, 40)), seconds=draw(st.integers(0, 59)))
    action = draw(st.sampled_from(["none", "none", "end", "cancel"]))
    if action == "end":
        at = start + timedelta(minutes=draw(st.integers(10, 39)), seconds=draw(st.integers(0, 59)))
        if at >= start + length:
            action, at = "none", timedelta(0)
    elif action == "cancel":
        at = timedelta(seconds=draw(st.integers(0, int(start.total_seconds()) - 1)))
    else:
        at = timedelta(0)
    return PlannedWindow(draw(st.sampled_from(["vps1", "acme"])), start, length, action, at)


@st.composite
def stories(draw: st.DrawFn) -> Story:
    planned = tuple(draw(st.lists(windows(), min_size=1, max_size=2)))
    # The alert starts anywhere, or near the first window (before it, or inside it).
    near = planned[0].start + timedelta(minutes=draw(st.integers(-15, 30)))
    a = draw(st.sampled_from([near, timedelta(minutes=draw(st.integers(0, 90)))]))
    a = max(a, timedelta(0))
    b = draw(st.one_of(st.none(), st.integers(1, 25).map(lambda m: a + timedelta(minutes=m))))
    second = None
    if b is not None and draw(st.booleans()):
        second = min(b + timedelta(minutes=draw(st.integers(1, 30))), timedelta(minutes=HORIZON))
    return Story(draw(st.sampled_from(["health", "alertmanager"])), planned, (a, b), second)


# --- the simulation -------------------------------------------------------------------------


@dataclass
class Fresh:
    """One engine for every example (SQLAlchemy's statement cache lives on the engine, and
    compiling afresh each time would be most of an example's time) over a file that is a new
    copy of a migrated database, with acme in it, at each example."""

    template: Path
    path: Path
    engine: Engine

    def __call__(self) -> Engine:
        self.engine.dispose()
        for leftover in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.copy(self.template, self.path)
        return self.engine


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fresh]:
    where = tmp_path_factory.mktemp("mw-property")
    template = where / "template.db"
    engine = make_engine(f"sqlite:///{template}")
    upgrade(engine)
    upsert_customers(engine, [Customer("acme", "vps1", "acme", "acme", "small")])
    engine.dispose()
    path = where / "example.db"
    engine = make_engine(f"sqlite:///{path}")
    yield Fresh(template, path, engine)
    engine.dispose()


def acme_alert(status: str, source: str, starts: datetime) -> Alert:
    return Alert(
        status=status,  # type: ignore[arg-type]
        kind="db_down",
        dedupe_key="db-down:acme",
        severity="P0",
        title="acme's database down",
        source=source,  # type: ignore[arg-type]
        alertname="connection",
        server="vps1" if source == "health" else None,
        customer="acme",
        fingerprint="fp-acme" if source == "alertmanager" else None,
        starts_at=starts if source == "alertmanager" else None,
    )


def simulate(engine: Engine, story: Story) -> list[Sent]:
    sim = Sim()
    clock = lambda: sim.now  # noqa: E731
    events, fl = EventLog(engine), fleet()
    notifier = FakeNotifier(sim)
    pager = Escalator(engine, events, fl, notifier, clock=clock, worker_id="sim")
    desk = Incidents(engine, events, fl, escalator=pager, clock=clock)
    m = Maintenance(engine, events, fl, clock=clock)
    refs = [
        m.schedule(w.target, w.length, f"work {i}", actor=ALICE, starts_at=T0 + w.start, now=T0)
        for i, w in enumerate(story.windows)
    ]
    actions: dict[timedelta, list[tuple[str, object]]] = {}
    for w, made in zip(story.windows, refs, strict=True):
        if w.action != "none":
            actions.setdefault(w.action_at, []).append(("end", made.window.ref))
    if story.source == "alertmanager":
        for t in story.changes():
            actions.setdefault(t, []).append(("alert", t))
    # Sweeps: on the minute, the first at or after anything that can change what one sees (an
    # alert's change, a window's start or end); sweeps in between repeat what they saw.
    marks = [*story.changes()]
    for w in story.windows:
        marks += [w.start, w.start + w.length, w.action_at]
    sweeps = {timedelta(minutes=-(-mark // MINUTE)) for mark in marks}
    # Until two minutes after the last mark (a cover's held steps fall due at its end; what
    # happens later is the plan as ever), or the horizon.
    horizon = min(timedelta(minutes=HORIZON), max(marks) + 2 * MINUTE)
    times = sorted({t for t in [*actions, *sweeps] if t <= horizon})

    def tick_until(t: timedelta) -> None:
        for _ in range(100):
            due = pager.next_due()
            if due is None or due > T0 + t:
                return
            sim.now = max(due, sim.now)
            pager.tick(sim.now)

    def ingest(alerts: list[Alert]) -> None:
        desk.ingest(alerts, now=sim.now)

    for t in times:
        tick_until(t)
        sim.now = T0 + t
        for what, arg in actions.get(t, []):
            if what == "end":
                m.end(str(arg), actor=ALICE)
            else:
                status = "firing" if story.firing(t) else "resolved"
                ingest([acme_alert(status, "alertmanager", T0 + story.first[0])])
        if t in sweeps:
            m.close_due(sim.now, raise_again=ingest)
            if story.source == "health":
                ingest([acme_alert("firing" if story.firing(t) else "resolved", "health", T0)])
        tick_until(t)  # what an end brought back is due now
    tick_until(horizon)
    return notifier.sent


@pytest.mark.slow
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(story=stories())
def test_windows_hold_pages_and_let_them_go_at_the_end(story: Story, fresh: Fresh) -> None:
    sent = simulate(fresh(), story)
    at = [s.at - T0 for s in sent]
    pages = [s.at - T0 for s in sent if s.page]
    covers = story.covers()

    # 1. Nothing inside a cover.
    inside = [(t, s.text[:60]) for t, s in zip(at, sent, strict=True) if story.covered(t)]
    assert inside == [], (story, covers)

    for start, end in covers:
        # 2. Still firing at the end (and for the next minute): paged within 60 s, unless
        # another window begins within that minute (then 1. wins: it pages when that ends).
        uncovered = not any(story.covered(end + k * SECOND) for k in range(61))
        if story.firing(end) and story.firing(end + MINUTE) and uncovered:
            assert any(end <= p <= end + MINUTE for p in pages), (story, covers, pages)
        a, b = story.first
        later = story.second or timedelta(minutes=HORIZON + 1)
        # 3. Started and recovered inside the cover: no page until it fires again.
        if b is not None and start <= a and b < end:
            assert not any(a <= p < later for p in pages), (story, covers, pages)
        # 4. Open before the cover, recovered inside it: its pages stop.
        if b is not None and a < start and not story.covered(a) and start <= b < end:
            assert not any(b <= p < later for p in pages), (story, covers, pages)

    # 5. Outside every cover an alert pages within 60 s of starting.
    a = story.first[0]
    clear = all(not story.covered(a + s * MINUTE / 4) for s in range(5))
    if clear and story.firing(a + MINUTE):
        assert any(a <= p <= a + MINUTE for p in pages), (story, covers, pages)
