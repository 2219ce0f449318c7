"""Escalation: who gets paged when, an ack stops it, and no step is ever sent twice or dropped.

Alice is primary, bob secondary; nobody acks unless the test says so. Time is moved by
time-machine in-process; the cross-process tests use real seconds (ack_timeout 2 s).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from sqlalchemy import Engine, select, update

from core.customers import Customer, upsert_customers
from core.escalation import LEASE, RETRY_AFTER, Escalator, StepResult, plan
from core.fleet import Fleet, parse_fleet
from core.incidents import Incidents
from core.notify import NotifyError, RecordingNotifier
from storage.events import EventLog
from storage.models_incidents import EscalationTimer, IncidentRow
from tests.pgserver import wait_until

ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"
ESCALATIONS = "#db-escalations"
OPS = "#db-ops"
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)  # a Monday afternoon
TIMERS = EscalationTimer.__table__  # type: ignore[attr-defined]


def fleet_with(oncall: dict[str, Any] | None = None, **escalation: Any) -> Fleet:
    return parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1 dbname=postgres"}],
            "plans": {"small": {"ram_mb": 1024, "storage_gb": 10, "connection_limit": 20,
                                "price_usd_month": 15}},
            "oncall": {"primary": ALICE, "secondary": BOB, "escalation_channel": ESCALATIONS}
            if oncall is None else oncall,
            "escalation": {"ack_timeout": "5m", "channel_after": "15m", "repeat": 0,
                           **escalation},
        }
    )  # fmt: skip


class Desk:
    """An incident desk and its pager on one database, with a notifier that keeps messages."""

    def __init__(self, engine: Engine, fleet: Fleet, *, kick: bool = True) -> None:
        self.engine = engine
        self.events = EventLog(engine)
        self.notifier = RecordingNotifier()
        self.pager = Escalator(
            engine, self.events, fleet, self.notifier, ops_channel=OPS, worker_id="pager-1"
        )
        self.incidents = Incidents(
            engine, self.events, fleet, escalator=self.pager if kick else None
        )
        upsert_customers(engine, [Customer("acme", "vps1", "acme", "acme", "small")])

    def open_p0(self, title: str = "acme's database down", now: datetime | None = None) -> int:
        return self.incidents.open(
            title, "P0", actor=ALICE, customers=["acme"], server="vps1", now=now
        ).id

    def sent(self) -> list[tuple[str, str]]:
        return [(s.how, s.to) for s in self.notifier.sent]

    def paged(self) -> list[tuple[str, str]]:
        """What was sent, less the P0's update reminders and the pages rewritten on an ack."""
        return [
            (s.how, s.to)
            for s in self.notifier.sent
            if "update" not in s.message.text and s.how != "update"
        ]


def pages(steps: list[StepResult]) -> list[StepResult]:
    """The page steps (a P0's 15-minute update reminders left out)."""
    return [s for s in steps if s.kind == "page"]


@pytest.fixture
def traveller() -> Iterator[time_machine.Traveller]:
    with time_machine.travel(T0, tick=False) as t:
        yield t


def test_plan_orders_steps_and_repeats() -> None:
    steps = plan(fleet_with(repeat=1).escalation, "P0")
    assert [(s.target, s.offset) for s in steps] == [
        ("primary", timedelta(0)),
        ("secondary", timedelta(minutes=5)),
        ("channel", timedelta(minutes=15)),
        ("primary", timedelta(minutes=20)),
        ("secondary", timedelta(minutes=25)),
        ("channel", timedelta(minutes=35)),
    ]
    assert [s.target for s in plan(fleet_with().escalation, "P3")] == ["primary"]


def test_secondary_after_ack_timeout_then_the_channel(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with())
    inc = desk.open_p0()
    assert desk.sent() == [("dm", ALICE)], "the primary is paged at open"
    assert "acme's database down" in desk.notifier.sent[0].message.text

    traveller.shift(timedelta(minutes=5) - timedelta(seconds=1))
    assert pages(desk.pager.tick()) == []
    traveller.shift(timedelta(seconds=1))
    (step,) = pages(desk.pager.tick())
    assert (step.action, step.to, step.lag_s) == ("dm", BOB, 0)
    assert desk.sent()[-1] == ("dm", BOB)
    assert f"not acknowledged by <@{ALICE}>" in desk.notifier.sent[-1].message.text

    traveller.shift(timedelta(minutes=10) - timedelta(seconds=1))
    assert pages(desk.pager.tick()) == []
    traveller.shift(timedelta(seconds=1))
    (step,) = pages(desk.pager.tick())
    assert (step.action, step.to) == ("post", ESCALATIONS)
    assert desk.paged() == [("dm", ALICE), ("dm", BOB), ("post", ESCALATIONS)]

    traveller.shift(timedelta(hours=2))
    assert pages(desk.pager.tick()) == [], "repeat = 0: paged once each"
    kinds = [e.kind for e in desk.incidents.timeline(inc)]
    # A P0 reminder every 15 minutes: at +15 min, then one (not seven) after the 2 h jump.
    assert kinds.count("escalation.reminder") == 2
    assert kinds.count("escalation.dm") == 2 and kinds.count("escalation.post") == 1


def test_an_ack_before_the_timeout_sends_nothing_more(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with(repeat=3))
    inc = desk.open_p0()
    traveller.shift(timedelta(minutes=4))
    acked = desk.incidents.ack(inc, actor=ALICE)
    assert (acked.status, acked.owner) == ("acknowledged", ALICE)
    for minutes in (1, 10, 60, 600):
        traveller.shift(timedelta(minutes=minutes))
        assert pages(desk.pager.tick()) == []
    assert desk.paged() == [("dm", ALICE)], "only the owner's P0 update reminders after the ack"
    ack_event = next(e for e in desk.incidents.timeline(inc) if e.kind == "incident.acknowledged")
    assert ack_event.payload["cancelled_steps"] == 11  # 4 rounds x 3 steps, less the one sent
    assert [t.kind for t in desk.pager.pending(inc)] == ["reminder"]


def test_the_cycle_repeats_up_to_repeat_times(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with(repeat=1))
    desk.open_p0()
    traveller.shift(timedelta(hours=3))
    steps = pages(desk.pager.tick())  # a worker that was down for hours catches up, in order
    assert [(s.action, s.to, s.round) for s in steps] == [
        ("dm", BOB, 0),
        ("post", ESCALATIONS, 0),
        ("dm", ALICE, 1),
        ("dm", BOB, 1),
        ("post", ESCALATIONS, 1),
    ]
    traveller.shift(timedelta(hours=3))
    assert pages(desk.pager.tick()) == []


def test_low_urgency_pages_the_primary_only(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with())
    desk.incidents.open("slow queries on acme", "P3", actor=CAROL, customers=["acme"])
    traveller.shift(timedelta(days=1))
    assert desk.pager.tick() == []
    assert desk.sent() == [("dm", ALICE)]


def test_nobody_on_call_is_itself_an_alert(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with(oncall={}))
    inc = desk.open_p0()
    assert desk.sent() == [("post", OPS)], "no escalation channel either: the ops channel"
    assert "nobody is on call as primary" in desk.notifier.sent[0].message.text
    traveller.shift(timedelta(minutes=15))
    pages(desk.pager.tick())
    kinds = [e.kind for e in desk.incidents.timeline(inc)]
    # primary, secondary, and the P0's 15-minute update reminder with no owner to go to
    assert kinds.count("escalation.nobody_oncall") == 3
    assert kinds.count("escalation.post") == 1  # the channel step itself, to the ops channel


def test_a_stale_timer_is_a_no_op(engine: Engine, traveller: time_machine.Traveller) -> None:
    desk = Desk(engine, fleet_with(), kick=False)
    desk.open_p0()
    # The incident moves on (a new token) without its timers being told: they must not page.
    with engine.begin() as conn:
        conn.execute(update(IncidentRow.__table__).values(token="f" * 32))  # type: ignore[attr-defined]
    steps = desk.pager.tick()
    assert [s.action for s in steps] == ["stale"]
    # And an incident acknowledged behind the timers' back: its due steps are no-ops too.
    other = desk.open_p0("acme again")
    with engine.begin() as conn:
        conn.execute(
            update(IncidentRow.__table__)  # type: ignore[attr-defined]
            .where(IncidentRow.__table__.c.id == other)  # type: ignore[attr-defined]
            .values(status="acknowledged")
        )
    traveller.shift(timedelta(hours=1))
    assert {s.action for s in pages(desk.pager.tick())} == {"stale"}
    assert all(
        how == "dm" and "update" in s.message.text
        for (how, _), s in zip(desk.sent(), desk.notifier.sent, strict=True)
    ), "only P0 update reminders"
    assert all(t.kind == "reminder" for t in desk.pager.pending())


def test_racing_tickers_never_send_a_step_twice(engine: Engine) -> None:
    fleet = fleet_with(repeat=1)
    desk = Desk(engine, fleet, kick=False)
    ids = [
        desk.incidents.open(f"outage {i}", "P1", actor=ALICE, customers=["acme"], now=T0).id
        for i in range(25)
    ]
    shared = RecordingNotifier()
    pagers = [
        Escalator(engine, EventLog(engine), fleet, shared, worker_id=f"pager-{i}", batch=7)
        for i in range(6)
    ]
    start = threading.Barrier(len(pagers))
    errors: list[BaseException] = []

    def race(pager: Escalator) -> None:
        try:
            for minutes in (0, 5, 15, 20, 25, 35):
                start.wait()  # the clocks of the racers agree, as NTP keeps real ones
                pager.tick(T0 + timedelta(minutes=minutes, seconds=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(p,)) for p in pagers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # Two rounds: each incident pages alice, bob and the channel twice each, no more.
    per_target = Counter((s.to, (s.message.meta or {})["incident"]) for s in shared.sent)
    assert len(shared.sent) == len(ids) * 6
    assert set(per_target.values()) == {2}, [k for k, v in per_target.items() if v != 2]
    with engine.connect() as conn:
        states = Counter(
            conn.execute(select(TIMERS.c.state).where(TIMERS.c.kind == "page")).scalars()
        )
    assert states == {"done": len(ids) * 6}


def test_a_worker_dead_mid_step_is_retried_after_its_lease(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with(), kick=False)
    desk.open_p0()
    dead = Escalator(engine, desk.events, fleet_with(), RecordingNotifier(), worker_id="dead")
    (claimed,) = dead.claim(T0)  # ... and the process is killed here
    assert desk.pager.tick() == [], "the claim holds until its lease ends"
    traveller.shift(LEASE)
    (step,) = desk.pager.tick()
    assert (step.action, step.to, step.timer_id) == ("dm", ALICE, claimed.id)
    assert desk.sent() == [("dm", ALICE)]


def test_a_step_sent_just_before_a_crash_is_not_sent_again(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with(), kick=False)
    desk.open_p0()
    dying = RecordingNotifier()
    dead = Escalator(engine, desk.events, fleet_with(), dying, worker_id="dead")
    # Sent and recorded, then killed before marking the timer done.
    dead._finish = lambda *a, **k: None  # type: ignore[method-assign]
    dead.tick(T0)
    assert [(s.how, s.to) for s in dying.sent] == [("dm", ALICE)]
    traveller.shift(LEASE)
    (step,) = desk.pager.tick()
    assert step.action == "resent-skipped"
    assert desk.sent() == []


def test_a_failing_transport_is_retried_then_given_up(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with(), kick=False)
    inc = desk.open_p0()
    desk.notifier.fail_with = NotifyError("slack timed out")
    assert [s.action for s in desk.pager.tick()] == ["retry"]
    desk.notifier.fail_with = None
    traveller.shift(RETRY_AFTER)
    assert [(s.action, s.to) for s in desk.pager.tick()] == [("dm", ALICE)]

    traveller.shift(timedelta(minutes=5))
    desk.notifier.fail_with = NotifyError("channel_not_found", permanent=True)
    assert [s.action for s in desk.pager.tick()] == ["failed"]
    assert any(e.kind == "escalation.failed" for e in desk.incidents.timeline(inc))


def test_p0_reminds_the_owner_to_update_customers_until_resolved(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with())
    inc = desk.open_p0()
    traveller.shift(timedelta(minutes=1))
    desk.incidents.ack(inc, actor=CAROL)
    traveller.shift(timedelta(minutes=14))
    (step,) = desk.pager.tick()
    assert (step.kind, step.to) == ("reminder", CAROL)
    assert "send the customers an update" in desk.notifier.sent[-1].message.text
    traveller.shift(timedelta(minutes=15))
    assert [s.to for s in desk.pager.tick()] == [CAROL]
    desk.incidents.resolve(inc, "max_connections reached", actor=CAROL)
    traveller.shift(timedelta(hours=1))
    assert desk.pager.tick() == []


# --- worker processes -------------------------------------------------------------------------


def _fleet_file(tmp_path: Path, ack: str = "2s", channel: str = "4s") -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(
        f"""
[[servers]]
name = "vps1"
dsn = "host=127.0.0.1 dbname=postgres"

[oncall]
primary = "{ALICE}"
secondary = "{BOB}"
escalation_channel = "{ESCALATIONS}"

[escalation]
ack_timeout = "{ack}"
channel_after = "{channel}"
repeat = 0
"""
    )
    return path


def _worker(engine: Engine, fleet: Path, out: Path, name: str) -> subprocess.Popen[str]:
    url = engine.url.render_as_string(hide_password=False)
    return subprocess.Popen(
        [sys.executable, "-m", "core.escalation", "--db", url, "--fleet", str(fleet),
         "--jsonl", str(out), "--interval", "0.05", "--lease", "3", "--worker-id", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def _ready(worker: subprocess.Popen[str]) -> None:
    """Wait for the worker's first line: it is ticking (imports and start-up are done)."""
    assert worker.stdout is not None
    assert "ticking" in worker.stdout.readline()


def _lines(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        pending = select(TIMERS.c.id).where(TIMERS.c.state == "pending", TIMERS.c.kind == "page")
        return len(conn.execute(pending).all())


def _due_times(engine: Engine) -> dict[tuple[int, str], datetime]:
    with engine.connect() as conn:
        rows = conn.execute(select(TIMERS.c.incident_id, TIMERS.c.target, TIMERS.c.due_at)).all()
    return {(r[0], r[1]): (r[2] if r[2].tzinfo else r[2].replace(tzinfo=UTC)) for r in rows}


def test_sigkill_while_an_escalation_is_pending_then_restart(
    engine: Engine, tmp_path: Path
) -> None:
    fleet_path, out = _fleet_file(tmp_path), tmp_path / "sent.jsonl"
    from core.fleet import load_fleet

    incidents = Incidents(engine, EventLog(engine), load_fleet(fleet_path))
    upsert_customers(engine, [Customer("acme", "vps1", "acme", "acme")])
    worker = _worker(engine, fleet_path, out, "first")
    try:
        _ready(worker)
        inc = incidents.open("acme's database down", "P0", actor=ALICE, customers=["acme"]).id
        # Kill once the primary's page is sent *and* recorded, with the secondary and channel
        # steps pending. (A kill between a send and its record is the documented at-least-once
        # window: that step is sent again after its lease.)
        assert wait_until(lambda: len(_lines(out)) >= 1 and _pending(engine) == 2, timeout=10)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=5)
        assert _pending(engine) == 2
        worker = _worker(engine, fleet_path, out, "second")
        assert wait_until(lambda: _pending(engine) == 0, timeout=10)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=5)
    lines = _lines(out)
    assert [(m["how"], m["to"]) for m in lines] == [
        ("dm", ALICE),
        ("dm", BOB),
        ("post", ESCALATIONS),
    ], "each step exactly once"
    due = _due_times(engine)
    for m, target in zip(lines, ("primary", "secondary", "channel"), strict=True):
        lag = (datetime.fromisoformat(m["at"]) - due[(inc, target)]).total_seconds()
        assert 0 <= lag < 1.0, f"{target} sent {lag:.2f}s after it was due"


def test_two_worker_processes_racing_send_each_step_once(engine: Engine, tmp_path: Path) -> None:
    fleet_path, out = _fleet_file(tmp_path, "1s", "2s"), tmp_path / "sent.jsonl"
    from core.fleet import load_fleet

    incidents = Incidents(engine, EventLog(engine), load_fleet(fleet_path))
    upsert_customers(engine, [Customer("acme", "vps1", "acme", "acme")])
    workers = [_worker(engine, fleet_path, out, f"racer-{i}") for i in range(2)]
    try:
        for w in workers:
            _ready(w)
        ids = [
            incidents.open(f"outage {i}", "P1", actor=ALICE, customers=["acme"]).id
            for i in range(20)
        ]
        assert wait_until(lambda: _pending(engine) == 0 and len(_lines(out)) >= 60, timeout=12)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=5)
    lines = _lines(out)
    keys = Counter((m["to"], m["text"]) for m in lines)
    assert len(lines) == len(ids) * 3 and max(keys.values()) == 1


def test_a_hostile_title_cannot_ping_or_link_from_a_page(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    """An alert's summary becomes the incident's title and goes into every page: `<!channel>`
    or a link in it must reach Slack as text, while the page's own mentions still work."""
    desk = Desk(engine, fleet_with())
    desk.open_p0("<!channel> acme down <https://evil.example|click>")
    traveller.shift(timedelta(minutes=15))
    desk.pager.tick()
    texts = [s.message.text for s in desk.notifier.sent if "update" not in s.message.text]
    assert len(texts) == 3  # primary, secondary, the escalation channel
    for text in texts:
        assert "<!channel>" not in text and "<https://evil" not in text
        assert "\u2039!channel\u203a acme down" in text  # look-alike angle quotes
    assert f"not acknowledged by <@{ALICE}>" in texts[1]  # our mention is still a mention


def test_an_ack_rewrites_the_pages_already_sent(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    """Bob, paged second, wakes later: his page says Alice has it, with no Ack button left."""
    desk = Desk(engine, fleet_with())
    number = desk.open_p0()
    traveller.shift(timedelta(minutes=5))
    desk.pager.tick()
    pages_sent = [s for s in desk.notifier.sent if s.how == "dm"]
    assert [s.to for s in pages_sent] == [ALICE, BOB]
    traveller.shift(timedelta(minutes=2))
    desk.incidents.ack(number, actor=ALICE)

    updates = [s for s in desk.notifier.sent if s.how == "update"]
    assert {u.ref for u in updates} == {p.ref for p in pages_sent} and len(updates) == 2
    for u in updates:
        assert f"was acknowledged by <@{ALICE}>, 7m after it opened" in u.message.text
        assert u.message.meta == {"incident": number, "actions": []}  # no Ack button
    # A failed rewrite never fails the ack; a second look changes nothing.
    assert desk.incidents.get(number).status == "acknowledged"


def test_a_resolve_without_an_ack_rewrites_the_pages_and_a_broken_transport_is_harmless(
    engine: Engine, traveller: time_machine.Traveller
) -> None:
    desk = Desk(engine, fleet_with())
    number = desk.open_p0()
    desk.notifier.fail_with = NotifyError("Slack is down")
    desk.incidents.resolve(number, "a false alarm", actor=BOB)  # the update fails: logged only
    assert desk.incidents.get(number).status == "resolved"
    desk.notifier.fail_with = None
    assert [s.how for s in desk.notifier.sent] == ["dm"]

    other = desk.open_p0("umbrella's database down")
    desk.incidents.resolve(other, "it came back", actor=BOB)
    (update,) = [s for s in desk.notifier.sent if s.how == "update"]
    assert f"was resolved by <@{BOB}>" in update.message.text
