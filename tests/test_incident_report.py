"""`/db incident report` and `dbops incident report`: every number is what the event log says.

The incident's events are recorded with the kinds and payloads core records them with (opened,
paged, acked, a restart, a restore, an email, an SLA credit, resolved), beside another incident's
and other customers' events; the test then computes each number itself, in SQL over the raw
table, and compares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, text

from bot.commands.roles import Roles
from bot.commands.router import Invocation
from core.fleet import load_fleet
from storage.events import EventLog, NewEvent
from tests.bot_kit import make_router, runtime

T0 = datetime(2026, 11, 3, 14, 0, 5, tzinfo=UTC)
FLEET = """
[[servers]]
name = "vps1"
host = "127.0.0.1"
dsn = "host=127.0.0.1 user=dbops_monitor dbname=postgres"
"""


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def log(engine: Engine) -> EventLog:
    events = EventLog(engine)
    inc, other = "inc-4", "inc-5"
    events.append_many(
        [
            NewEvent(
                "incident.opened",
                inc,
                {"title": "acme down", "severity": "P0", "server": "vps1", "customers": ["acme"]},
                "health_sweep",
                ts=_at(0),
            ),
            NewEvent("incident.opened", other, {"title": "x", "customers": ["globex"]}, ts=_at(1)),
            NewEvent("escalation.dm", inc, {"kind": "page", "to": "U_ALICE"}, "dbops", ts=_at(0.5)),
            NewEvent(
                "incident.customer_added", inc, {"customer": "initech"}, "health_sweep", ts=_at(2)
            ),
            NewEvent(
                "escalation.dm", inc, {"kind": "reminder", "to": "U_ALICE"}, "dbops", ts=_at(3)
            ),
            NewEvent("incident.acknowledged", inc, {"owner": "U_ALICE"}, "U_ALICE", ts=_at(4.25)),
            NewEvent("server.restart", "vps1", {"answering": True}, "U_ALICE", ts=_at(6)),
            NewEvent("incident.restart", inc, {"answering": True}, "U_ALICE", ts=_at(6)),
            NewEvent("restore.done", "acme", {"customer": "acme"}, "U_CAROL", ts=_at(20)),
            NewEvent("restore.done", "globex", {"customer": "globex"}, "U_CAROL", ts=_at(21)),
            NewEvent(
                "email.sent",
                inc,
                {
                    "template": "incident_investigating",
                    "to": ["ops@acme.test"],
                    "delivered": ["ops@acme.test"],
                },
                "U_ALICE",
                ts=_at(8),
            ),
            NewEvent("email.sent", other, {"template": "x", "to": ["a@b.test"]}, ts=_at(9)),
            NewEvent("incident.resolved", inc, {"cause": "disk full"}, "U_ALICE", ts=_at(75.5)),
            NewEvent(
                "billing.credit_applied",
                "acme",
                {
                    "incident": inc,
                    "amount_cents": 4167,
                    "currency": "usd",
                    "stripe_customer": "cus_ACME1",
                    "stripe_txn": "cbtxn_1QACME",
                },
                "U_CAROL",
                ts=_at(80),
            ),
            NewEvent(
                "billing.credit_applied",
                "globex",
                {"incident": other, "amount_cents": 999, "stripe_txn": "cbtxn_OTHER"},
                ts=_at(81),
            ),
            NewEvent("restore.done", "acme", {"customer": "acme"}, "U_CAROL", ts=_at(90)),
        ]
    )
    return events


def _truth(engine: Engine, ref: str) -> dict[str, Any]:
    """The numbers, computed here from the raw table, not through dbops' code."""

    def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
        with engine.connect() as conn:
            out = [dict(r._mapping) for r in conn.execute(text(sql), params)]
        for r in out:
            if isinstance(r.get("payload"), str):
                r["payload"] = json.loads(r["payload"])
            if isinstance(r.get("ts"), str):
                r["ts"] = datetime.fromisoformat(r["ts"])
            if r.get("ts") is not None and r["ts"].tzinfo is None:
                r["ts"] = r["ts"].replace(tzinfo=UTC)
        return out

    own = rows("SELECT kind, ts, payload FROM events WHERE subject = :s ORDER BY id", s=ref)
    first = {}
    for r in own:
        first.setdefault(r["kind"], r)
    opened, resolved = first["incident.opened"]["ts"], first["incident.resolved"]["ts"]
    customers = first["incident.opened"]["payload"]["customers"] + [
        r["payload"]["customer"] for r in own if r["kind"] == "incident.customer_added"
    ]
    restores = rows(
        "SELECT subject, ts FROM events WHERE kind = 'restore.done' ORDER BY id",
    )
    credits = rows("SELECT payload FROM events WHERE kind = 'billing.credit_applied'")
    return {
        "time_to_ack_s": int((first["incident.acknowledged"]["ts"] - opened).total_seconds()),
        "time_to_resolve_s": int((resolved - opened).total_seconds()),
        "customers": customers,
        "restarts": sum(1 for r in own if r["kind"] == "incident.restart"),
        "restores": sum(
            1 for r in restores if r["subject"] in customers and opened <= r["ts"] <= resolved
        ),
        "emails": sum(1 for r in own if r["kind"] == "email.sent"),
        "stripe_txns": [
            c["payload"]["stripe_txn"] for c in credits if c["payload"]["incident"] == ref
        ],
        "paged_at": first["escalation.dm"]["ts"],
    }


def test_cli_report_numbers_equal_the_log(log: EventLog, engine: Engine, tmp_path: Path) -> None:
    truth = _truth(engine, "inc-4")
    assert truth["restarts"] == 1 and truth["emails"] == 1 and truth["restores"] == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBOPS_", "SLACK_"))}
    env["DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, "-m", "bot", "incident", "report", "4", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("time_to_ack_s", "time_to_resolve_s", "customers", "restarts", "restores"):
        assert report[key] == truth[key], key
    assert len(report["emails"]) == truth["emails"]
    assert [c["stripe_txn"] for c in report["credits"]] == truth["stripe_txns"]
    assert report["paged_at"] == truth["paged_at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    whats = [s["what"] for s in report["timeline"]]
    for step in ("detected", "paged", "acked", "restarted", "restored", "resolved"):
        assert step in whats, step
    assert whats.index("detected") < whats.index("acked") < whats.index("resolved")


def test_slash_command_report(log: EventLog, engine: Engine, tmp_path: Path) -> None:
    truth = _truth(engine, "inc-4")
    (tmp_path / "fleet.toml").write_text(FLEET)
    fleet = load_fleet(tmp_path / "fleet.toml")
    tz = ZoneInfo("America/New_York")
    rt = runtime(engine, fleet, events=log, timezone=str(tz))
    try:
        reply = make_router(rt, Roles()).run(
            Invocation("U_BOB", "shell", text="incident report inc-4")
        )
    finally:
        rt.close()
    assert reply is not None
    text_ = reply.text
    assert f"Time to ack: {truth['time_to_ack_s'] // 60}m {truth['time_to_ack_s'] % 60:02d}s" in (
        text_
    )
    hours, rest = divmod(truth["time_to_resolve_s"], 3600)
    assert f"time to resolve: {hours}h {rest // 60:02d}m {rest % 60:02d}s" in text_
    assert f"Customers affected: {', '.join(truth['customers'])}" in text_
    assert f"Restarts: {truth['restarts']}; restores: {truth['restores']}" in text_
    assert f"Emails sent: {truth['emails']}" in text_
    assert "41.67 USD (Stripe cbtxn_1QACME, customer cus_ACME1)" in text_
    assert "cbtxn_OTHER" not in text_
    rendered = json.dumps([b.to_dict() for b in reply.blocks])
    assert "cbtxn_1QACME" in rendered and "acme, initech" in rendered
