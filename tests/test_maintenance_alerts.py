"""Inside a maintenance window nothing opens and nobody is paged; at its end what still fails
pages, what recovered does not; the summary, the report's words, and SLA downtime.

acme, globex and initech live on vps1; hooli on vps2. alice is primary on call, bob secondary.
Escalation: the secondary 5 minutes after a page nobody acked, the channel after 15.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from core.alerts import Alert
from core.customers import Customer, upsert_customers
from core.escalation import Escalator
from core.fleet import Fleet, parse_fleet
from core.health import DatabaseHealth
from core.incidents import Incidents
from core.maintenance import Maintenance
from core.notify import RecordingNotifier
from core.report import database_json, render_text, summarize, text_view
from core.windows import Covers
from storage.events import EventLog

ALICE, BOB = "U0ALICE", "U0BOB"
ESC = "#db-escalations"
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


def make_fleet() -> Fleet:
    plan = {"ram_mb": 1024, "storage_gb": 10, "connection_limit": 20}
    return parse_fleet(
        {
            "servers": [
                {"name": "vps1", "dsn": "host=127.0.0.1"},
                {"name": "vps2", "dsn": "host=127.0.0.2"},
            ],
            "plans": {"big": {**plan, "price_usd_month": 720}},
            "oncall": {"primary": ALICE, "secondary": BOB, "escalation_channel": ESC},
            "escalation": {"ack_timeout": "5m", "channel_after": "15m", "repeat": 0},
        }
    )  # fmt: skip


class Desk:
    """The incident desk, its pager and the maintenance windows on one database."""

    def __init__(self, engine: Engine) -> None:
        upsert_customers(
            engine,
            [
                Customer("acme", "vps1", "acme", "acme", "big", "ops@acme.example"),
                Customer("globex", "vps1", "globex", "globex", "big"),
                Customer("initech", "vps1", "initech", "initech", "big"),
                Customer("hooli", "vps2", "hooli", "hooli", "big"),
            ],
        )
        fleet = make_fleet()
        self.events = EventLog(engine)
        self.notifier = RecordingNotifier()
        # Its clock stays at T0: a step's time is then the tick's (``max(clock, now)``).
        self.pager = Escalator(
            engine, self.events, fleet, self.notifier, worker_id="pager-1", clock=lambda: T0
        )
        self.incidents = Incidents(engine, self.events, fleet, escalator=self.pager)
        self.windows = Maintenance(engine, self.events, fleet)

    def sent(self) -> list[tuple[str, str]]:
        """Pages and posts (a P0's reminders to update the customers left out)."""
        return [
            (s.how, s.to)
            for s in self.notifier.sent
            if s.how != "update" and "send the customers an update" not in s.message.text
        ]

    def reminders(self) -> list[datetime]:
        return [
            s.at for s in self.notifier.sent if "send the customers an update" in s.message.text
        ]

    def kinds(self, prefix: str) -> list[str]:
        return [e.kind for e in self.events.query(kind_prefix=prefix, limit=1000)]


@pytest.fixture
def desk(sqlite_engine: Engine) -> Desk:
    return Desk(sqlite_engine)


def alert(kind: str, who: str, status: str = "firing", source: str = "health") -> Alert:
    if kind == "server_down":
        return Alert(
            status,
            "server_down",
            f"server-down:{who}",
            "P0",  # type: ignore[arg-type]
            f"PostgreSQL down on {who}",
            source,
            "connection",
            server=who,
        )  # type: ignore[arg-type]
    fingerprint = f"fp-{who}" if source == "alertmanager" else None
    starts = T0 if source == "alertmanager" else None
    return Alert(status, "db_down", f"db-down:{who}", "P0", f"{who}'s database down",  # type: ignore[arg-type]
                 source, "connection", customer=who, fingerprint=fingerprint,  # type: ignore[arg-type]
                 starts_at=starts)  # fmt: skip


def test_inside_a_window_failures_open_nothing_and_page_no_one(desk: Desk) -> None:
    window = desk.windows.schedule("vps1", "1h", "kernel upgrade", actor=ALICE, now=T0).window
    for minute in (1, 2, 3):  # three sweeps see vps1 down
        now = T0 + timedelta(minutes=minute)
        outcomes = desk.incidents.ingest(
            [alert("server_down", "vps1"), alert("db_down", "acme"), alert("db_down", "globex")],
            now=now,
        )
        assert {o.action for o in outcomes} == {"suppressed"}
        desk.pager.tick(now)
    assert desk.incidents.list_incidents() == [] and desk.sent() == []
    suppressed = desk.events.query(kind="maintenance.suppressed")
    assert [(e.subject, e.payload["check"], e.payload["windows"]) for e in suppressed] == [
        ("vps1", "connection", [window.ref]),
        ("acme", "connection", [window.ref]),
        ("globex", "connection", [window.ref]),
    ], "recorded once each, not once a sweep"
    # hooli, on a server nobody is working on, pages as usual at the same moment.
    (hooli,) = desk.incidents.ingest([alert("db_down", "hooli")], now=T0 + timedelta(minutes=3))
    assert hooli.action == "opened" and desk.sent() == [("dm", ALICE)]


def test_a_step_planned_before_the_window_waits_for_its_end(engine: Engine) -> None:
    desk = Desk(engine)
    inc = desk.incidents.raise_alert(alert("db_down", "acme"), now=T0).incident
    assert inc is not None and desk.sent() == [("dm", ALICE)], "paged before the window"
    start = T0 + timedelta(minutes=1)
    window = desk.windows.schedule("vps1", "30m", "failover", actor=ALICE, now=start).window
    for minute in range(2, 31):  # the secondary (due at 5m) and the channel (15m) wait
        now = T0 + timedelta(minutes=minute)
        desk.incidents.ingest([alert("db_down", "acme")], now=now)
        desk.pager.tick(now)
    assert desk.sent() == [("dm", ALICE)], "nothing inside the window"
    (held,) = desk.events.query(kind="escalation.held")
    assert held.subject == inc.ref and held.payload["window"] == window.ref
    assert (
        held.payload["until"]
        == "2026-03-02T14:31:00.000000Z"
        == window.ends_at.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    )
    # At the end the plan goes on where it stopped, its spacing kept.
    desk.pager.tick(window.ends_at)
    assert desk.sent() == [("dm", ALICE), ("dm", BOB)]
    desk.pager.tick(window.ends_at + timedelta(minutes=9, seconds=59))
    assert len(desk.sent()) == 2
    desk.pager.tick(window.ends_at + timedelta(minutes=10))
    assert desk.sent()[-1] == ("post", ESC)
    assert len(desk.reminders()) == 1, "the P0's update reminder waited for the end too"


def test_ending_a_window_early_brings_its_held_steps_back(desk: Desk) -> None:
    desk.incidents.raise_alert(alert("db_down", "acme"), now=T0)
    desk.windows.schedule("vps1", "2h", "kernel", actor=ALICE, now=T0 + timedelta(minutes=1))
    desk.pager.tick(T0 + timedelta(minutes=6))
    assert desk.sent() == [("dm", ALICE)]
    ended = T0 + timedelta(minutes=20)
    desk.windows.end("vps1", actor=ALICE, now=ended)
    pages = [s for s in desk.pager.tick(ended) if s.kind == "page"]
    assert [(s.action, s.to, s.at) for s in pages] == [("dm", BOB, ended)], "at once"


def test_a_failure_that_recovered_inside_the_window_pages_no_one_after_it(desk: Desk) -> None:
    inc = desk.incidents.raise_alert(alert("db_down", "acme"), now=T0).incident
    assert inc is not None
    window = desk.windows.schedule(
        "vps1", "30m", "failover", actor=ALICE, now=T0 + timedelta(minutes=1)
    ).window
    desk.pager.tick(T0 + timedelta(minutes=6))  # held
    desk.incidents.raise_alert(alert("db_down", "acme", "resolved"), now=T0 + timedelta(minutes=9))
    for minute in (31, 40, 60, 120):
        desk.pager.tick(T0 + timedelta(minutes=minute))
    assert desk.sent() == [("dm", ALICE)], "only the page from before the window"
    pending = [t for t in desk.pager.pending(inc.id) if t.kind == "page"]
    assert pending == [], "its page steps were dropped, not left to fire later"
    assert window.ref in desk.windows.summary(desk.windows.get(window.id)).data["window"]["ref"]


def test_at_the_end_what_still_fails_pages_within_a_sweep(desk: Desk) -> None:
    window = desk.windows.schedule("vps1", "30m", "kernel", actor=ALICE, now=T0).window
    # acme fails (the sweep sees it every minute); Alertmanager says globex is down, once.
    for minute in range(1, 30):
        now = T0 + timedelta(minutes=minute)
        batch = [alert("db_down", "acme")]
        if minute == 2:
            batch.append(alert("db_down", "globex", source="alertmanager"))
        desk.incidents.ingest(batch, now=now)
        desk.pager.tick(now)
    assert desk.sent() == []
    # The first sweep after the end: the window is closed, then the sweep's own alerts.
    sweep = window.ends_at + timedelta(seconds=40)
    (closing,) = desk.windows.close_due(
        sweep, raise_again=lambda alerts: desk.incidents.ingest(alerts, now=sweep)
    )
    assert [a.dedupe_key for a in closing.raised_again] == ["db-down:globex"]
    desk.incidents.ingest([alert("db_down", "acme")], now=sweep)
    opened = {i.customers[0]: i for i in desk.incidents.list_incidents()}
    assert set(opened) == {"acme", "globex"}
    assert desk.sent() == [("dm", ALICE), ("dm", ALICE)], "each paged at once"
    # Handled once; its summary is offered again (not fresh) until it is marked posted.
    again = desk.windows.close_due(sweep + timedelta(minutes=1))
    assert [(c.window.id, c.fresh, c.raised_again) for c in again] == [(window.id, False, [])]
    desk.windows.summary_posted(window.id, sweep)
    assert desk.windows.close_due(sweep + timedelta(minutes=2)) == []
    assert len(desk.sent()) == 2


def test_the_summary_has_one_line_for_what_failed_and_recovered(desk: Desk) -> None:
    window = desk.windows.schedule("vps1", "1h", "kernel upgrade", actor=ALICE, now=T0).window
    down, up = T0 + timedelta(minutes=2), T0 + timedelta(minutes=9)
    desk.incidents.ingest(
        [alert("server_down", "vps1"), alert("db_down", "acme"), alert("db_down", "globex")],
        now=down,
    )
    desk.incidents.ingest(
        [
            alert("server_down", "vps1", "resolved"),
            alert("db_down", "acme", "resolved"),
            alert("db_down", "globex", "resolved"),
        ],
        now=up,
    )
    assert desk.kinds("maintenance.recovered") == ["maintenance.recovered"] * 3
    (closing,) = desk.windows.close_due(window.ends_at)
    data = closing.summary.data
    (line,) = data["down"]
    assert line["kind"] == "server_down" and line["down_s"] == 7 * 60
    assert line["customers"] == ["acme", "globex", "initech"] and not line["still_failing"]
    assert data["customers"] == ["acme", "globex", "initech"] and data["still_failing"] == []
    text = closing.text
    assert f"Maintenance {window.ref} on server vps1 is over (kernel upgrade)" in text
    assert "PostgreSQL on vps1: 2026-03-02 14:02 UTC to 2026-03-02 14:09 UTC (7m)" in text
    assert "recovered inside the window, no page" in text
    assert text.count("\n- ") == 1, text
    assert "does not count toward SLA credits" in text
    assert desk.sent() == [] and desk.incidents.list_incidents() == []
    (summary,) = desk.events.query(kind="maintenance.summary")
    assert summary.subject == "vps1" and summary.payload["window"] == window.ref


def test_incidents_opened_by_hand_are_never_held(desk: Desk) -> None:
    desk.windows.schedule("vps1", "1h", "kernel", actor=ALICE, now=T0)
    inc = desk.incidents.open(
        "acme reports slow queries", "P1", actor=ALICE, customers=["acme"], server="vps1", now=T0
    )
    desk.pager.tick(T0 + timedelta(minutes=5))
    assert desk.sent() == [("dm", ALICE), ("dm", BOB)], f"{inc.ref}: someone chose to open it"


def test_the_report_says_in_maintenance_until_instead_of_the_failure(desk: Desk) -> None:
    window = desk.windows.schedule("vps1", "1h", "kernel upgrade", actor=ALICE, now=T0).window
    covers = Covers.load(desk.windows.engine, T0 + timedelta(minutes=5))
    cover = covers.database("acme", "vps1")
    assert cover is not None and covers.database("hooli", "vps2") is None
    down = {"name": "connection", "verdict": "crit", "value": None, "warn": None, "crit": None,
            "detail": "connection refused"}  # fmt: skip
    acme = {"customer": "acme", "server": "vps1", "online": False, "checks": [down],
            "maintenance": cover.as_json()}  # fmt: skip
    hooli = {"customer": "hooli", "server": "vps2", "online": True, "checks": []}
    report: dict[str, Any] = {
        "generated_at": "2026-03-02T14:05:00Z",
        "servers": [],
        "databases": [acme, hooli],
        "summary": summarize([], [acme, hooli]),
        "open_incidents": [],
    }
    assert report["summary"]["verdict"] == "ok", "what a window covers is not judged"
    assert report["summary"]["databases_online"] == 1, "but it is counted as it is"
    text = render_text(report)
    assert "  - acme (vps1): in maintenance until 2026-03-02 15:00 UTC (kernel upgrade)" in text
    assert "connection refused" not in text
    assert f"In maintenance until 2026-03-02 15:00 UTC: acme (kernel upgrade, {window.ref})" in text
    assert text_view(report)["maintenance"][0]["ref"] == window.ref
    health = DatabaseHealth("acme", "vps1", "acme", False, None, None, None, [])
    assert database_json(health, cover)["maintenance"] == cover.as_json()
    assert "maintenance" not in database_json(health), "absent when no window covers it"


def test_downtime_inside_a_window_does_not_count_toward_sla_credits(desk: Desk) -> None:
    inc = desk.incidents.raise_alert(alert("db_down", "acme"), now=T0).incident
    assert inc is not None
    window = desk.windows.schedule(
        "acme", "1h", "moving acme", actor=ALICE, now=T0 + timedelta(minutes=30)
    ).window
    recovered = T0 + timedelta(hours=2)
    desk.incidents.raise_alert(alert("db_down", "acme", "resolved"), now=recovered)
    done = desk.incidents.resolve(inc.id, "moved", actor=ALICE, now=recovered)
    assert done.downtime_s == {"acme": 3600}, "2 h down, 1 h of it in the window"
    assert done.maintenance_s == {"acme": 3600} and done.windows == [window.ref]
    assert done.credits == [], "an hour is not over the SLA's hour"
    raw = desk.incidents.downtime(inc.id, maintenance=False)
    assert raw == {"acme": 7200}
    (email,) = desk.incidents.email_preview(inc.id, "resolved")
    assert "Downtime: 60m" in email.body
    assert "announced maintenance window" in email.body
    assert "(2026-03-02 14:30 UTC to 15:30 UTC)" in email.body
    assert "does not count toward SLA credits" in email.body
