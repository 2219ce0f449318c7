"""Customer notices for a maintenance window: one email ahead and one at the end to each
affected customer, none to anyone else, none twice; each an event. A real SMTP server
(aiosmtpd) listens on loopback.

acme, globex and initech live on vps1 (initech has no address on record); hooli on vps2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message as MailMessage
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import Engine

from core.alerts import Alert
from core.customers import Customer, upsert_customers
from core.fleet import parse_fleet
from core.incidents import Incidents
from core.maintenance import Maintenance
from storage.events import EventLog
from tests.pgserver import free_port

ALICE = "U0ALICE"
NY = ZoneInfo("America/New_York")
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)  # 09:00 in New York
LEFTOVER = ("{{", "}}", "{%", "[Customer]", "Undefined")


@dataclass
class Inbox:
    messages: list[MailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.original_content))
        return "250 OK"

    def to(self) -> list[str]:
        return [str(m["To"]) for m in self.messages]


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, str]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, f"smtp://127.0.0.1:{port}?from=ops@example-hosting.com"
    finally:
        controller.stop()


def subject(msg: MailMessage) -> str:
    return " ".join(str(msg["Subject"]).split())  # a long header arrives folded


def body(msg: MailMessage) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode().replace("\r\n", "\n")


@pytest.fixture
def setup(sqlite_engine: Engine, smtp: tuple[Inbox, str]) -> tuple[Maintenance, Inbox]:
    inbox, url = smtp
    upsert_customers(
        sqlite_engine,
        [
            Customer("acme", "vps1", "acme", "acme", "small", "ops@acme.example"),
            Customer("globex", "vps1", "globex", "globex", "small", "it@globex.example"),
            Customer("initech", "vps1", "initech", "initech", "small"),
            Customer("hooli", "vps2", "hooli", "hooli", "small", "dba@hooli.example"),
        ],
    )
    fleet = parse_fleet(
        {
            "servers": [
                {"name": "vps1", "dsn": "host=127.0.0.1"},
                {"name": "vps2", "dsn": "host=127.0.0.2"},
            ],
            "business": {
                "name": "Example Hosting",
                "support_email": "help@example-hosting.com",
                "signature": "Dana at Example Hosting",
            },
        }
    )
    m = Maintenance(sqlite_engine, EventLog(sqlite_engine), fleet, tz=NY, smtp_url=url)
    return m, inbox


def test_one_notice_ahead_and_one_at_the_end_to_each_affected_customer(
    setup: tuple[Maintenance, Inbox],
) -> None:
    m, inbox = setup
    start = T0 + timedelta(days=1)
    done = m.schedule(
        "vps1", "2h", "kernel upgrade", actor=ALICE, starts_at=start, notify=True, now=T0
    )
    assert sorted(inbox.to()) == ["it@globex.example", "ops@acme.example"], "nobody on vps2"
    notices = {n.customer: n for n in done.notices}
    assert notices["initech"].sent is False and notices["initech"].detail == "no address on record"
    ahead = next(x for x in inbox.messages if x["To"] == "ops@acme.example")
    assert subject(ahead) == "[MAINTENANCE] Planned database maintenance - 2026-03-03 09:00 EST"
    text = body(ahead)
    for line in (
        "Hi acme,",
        "We have planned maintenance on the server that runs your database.",
        "What: kernel upgrade",
        "Starts: 2026-03-03 09:00 EST",
        "Ends: 2026-03-03 11:00 EST at the latest",
        "does not count\ntoward SLA credits.",
        "- Dana at Example Hosting\nExample Hosting\n",
    ):
        assert line in text, line
    assert not any(left in text for left in LEFTOVER)

    # Nothing is sent twice, whoever asks again.
    assert [n.detail for n in m._notices(done.window, "ahead", actor=ALICE, now=T0)] == [
        "sent before",
        "sent before",
        "no address on record",
    ]
    assert len(inbox.messages) == 2

    # acme's database goes down inside the window and comes back; globex's never does.
    desk = Incidents(m.engine, m.events, m.fleet)
    down = Alert("firing", "db_down", "db-down:acme", "P0", "acme's database down", "health",
                 "connection", server="vps1", customer="acme")  # fmt: skip
    desk.ingest([down], now=start + timedelta(minutes=10))
    up = Alert("resolved", "db_down", "db-down:acme", "P0", "acme's database down", "health",
               "connection", server="vps1", customer="acme")  # fmt: skip
    desk.ingest([up], now=start + timedelta(minutes=17))
    (closing,) = m.close_due(start + timedelta(hours=2, seconds=30))
    assert sorted(n.customer for n in closing.notices if n.sent) == ["acme", "globex"]
    assert len(inbox.messages) == 4
    ends = {str(x["To"]): x for x in inbox.messages[2:]}
    assert subject(ends["ops@acme.example"]) == "[MAINTENANCE] Planned maintenance complete"
    acme = body(ends["ops@acme.example"])
    assert "Your database was unavailable for 7m during the window." in acme
    assert "Ended: 2026-03-03 11:00 EST" in acme
    assert "Your database stayed online throughout." in body(ends["it@globex.example"])
    again = m.close_due(start + timedelta(hours=3))  # its summary not posted yet: offered again
    assert [(c.fresh, c.notices) for c in again] == [(False, [])]
    assert len(inbox.messages) == 4

    sent = m.events.query(kind="email.sent", limit=100)
    assert sorted((e.subject, e.source, e.source_id) for e in sent) == [
        ("acme", "maintenance", f"{done.window.ref}:ahead:acme"),
        ("acme", "maintenance", f"{done.window.ref}:end:acme"),
        ("globex", "maintenance", f"{done.window.ref}:ahead:globex"),
        ("globex", "maintenance", f"{done.window.ref}:end:globex"),
    ]
    assert all("body" not in e.payload for e in sent)


def test_a_customer_window_notifies_that_customer_and_a_cancelled_one_says_so(
    setup: tuple[Maintenance, Inbox],
) -> None:
    m, inbox = setup
    planned = m.schedule(
        "hooli", "1h", "moving hooli to a bigger disk", actor=ALICE,
        starts_at=T0 + timedelta(hours=4), notify=True, now=T0,
    ).window  # fmt: skip
    assert inbox.to() == ["dba@hooli.example"]
    assert "We have planned maintenance on your database." in body(inbox.messages[0])
    m.end(planned.ref, actor=ALICE, now=T0 + timedelta(hours=1))
    (closing,) = m.close_due(T0 + timedelta(hours=1, minutes=1))
    assert [n.customer for n in closing.notices] == ["hooli"]
    cancelled = inbox.messages[-1]
    assert subject(cancelled) == "[MAINTENANCE] Planned maintenance cancelled"
    assert "The maintenance we planned for 2026-03-02 13:00 EST is cancelled." in body(cancelled)
    assert inbox.to() == ["dba@hooli.example", "dba@hooli.example"]
    # Without notify, nobody hears of a window.
    m.schedule("vps1", "1h", "quiet work", actor=ALICE, now=T0)
    m.close_due(T0 + timedelta(hours=2))
    assert len(inbox.messages) == 2
