"""Incidents in Slack: the card in #db-ops, its thread, its buttons, on-call.

Alice (an operator) opens an incident on acme; the card lands in the ops channel with Ack and a
red Restart behind a confirm dialog, the diagnostics in its thread. Bob (a viewer) presses Ack
and is told no; Alice presses it and the card changes in place. With vps1's PostgreSQL down,
Restart on the card brings it back and the thread and the card say so. Carol (an admin) puts
someone on call. Slack is our stub; the router runs every line as a slash command or a button.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import time_machine

from bot.commands.cards import credit_buttons, resolution_reply
from bot.commands.catalog import build_registry
from bot.commands.errors import reply_for
from bot.commands.roles import Denied, Roles
from bot.commands.router import Invocation, Router, UsageError, parse
from bot.runtime import Runtime
from bot.shell import render_blocks
from bot.slack.rules import assert_message_ok
from bot.views.blocks import Reply
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import Fleet
from core.incidents import CreditProposal, Incident, Resolution, credit_cents
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.bot_kit import ALICE, BOB, CAROL, make_router, runtime
from tests.slack_app import send_once
from tests.slack_stub import BOT_TOKEN, Call, SlackStub, action_body
from tests.test_blocks_contract import check_contract

OPS = "C0DBOPS"
TZ = ZoneInfo("America/New_York")


@pytest.fixture(scope="module")
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture(scope="module")
def router(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    stub: SlackStub,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Router]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('incidents') / 'dbops.db'}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    events = EventLog(engine)
    rt = runtime(
        engine,
        sandbox_fleet,
        events=events,
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
        ops_channel=OPS,
        smtp_url=None,
        timezone=str(TZ),
    )
    yield make_router(rt)
    rt.close()
    engine.dispose()


def say(router: Router, user: str, text: str) -> Reply:
    reply = router.run(Invocation(actor=user, surface="slack", text=text, channel=OPS))
    assert reply is not None
    check_contract(text, reply)
    return reply


def press(router: Router, user: str, line: str) -> Reply:
    command = parse(line, router.registry)
    inv = Invocation(
        actor=user,
        surface="slack",
        action_id=command.spec.action_id,
        value=command.line,
        channel=OPS,
    )
    try:
        reply = router.run(inv)
    except Exception as exc:  # what the Slack app does with it (bot.slack.background.Background)
        reply = reply_for(exc)
    assert reply is not None
    check_contract(line, reply)
    return reply


def bolt_press(router: Router, stub: SlackStub, user: str, line: str) -> Call:
    """Press a card button as Slack does: a signed block_actions request through Bolt, the
    router in the background, the reply on the press's response_url (which is returned)."""
    command = parse(line, router.registry)
    token = uuid.uuid4().hex
    body = action_body(
        command.spec.action_id,
        command.line,
        user=user,
        response_url=stub.response_url(token),
        channel=OPS,
    )
    assert send_once(router, stub, body) == 200
    reply = stub.wait_for(lambda c: c.path == f"/response/{token}")
    posted_contract(reply)
    return reply


def restore_button(rt: Runtime) -> list[str]:
    """The card's Restore button, when acme has a backup that passed its restore test."""
    tested = [b for b in rt.backups.list_backups("acme") if b.complete and b.verified]
    return ["db_restore"] if tested else []


def posted_contract(call: Call) -> None:
    """A message we sent with chat.postMessage / chat.update / a response_url: Slack took it
    (the stub applies Slack's rules), with a text fallback for notifications."""
    assert call.ok, (call.kind, call.error, call.answer)
    assert_message_ok(call.body, call.kind)
    assert str(call.body.get("text", "")).strip() and len(call.body["text"]) <= 3000


def card_of(stub: SlackStub, title: str) -> Call:
    card = stub.wait_for(
        lambda c: (
            c.kind == "chat.postMessage"
            and c.body.get("channel") == OPS
            and not c.body.get("thread_ts")
            and title in c.body.get("text", "")
        )
    )
    posted_contract(card)
    return card


def ts_of(router: Router, card: Call) -> str:
    """The ts Slack (our stub) gave the card, as the incident recorded it."""
    desk = router.rt.desk
    ref = desk.incidents.get(incident_id(card)).card_ref
    assert ref is not None
    return ref.ts


def incident_id(card: Call) -> int:
    return int(card.body["text"].split(" inc-")[1].split(" ")[0])


def buttons(call: Call) -> dict[str, dict[str, Any]]:
    return {
        el["action_id"]: el
        for block in call.body.get("blocks") or []
        if block["type"] == "actions"
        for el in block["elements"]
    }


def test_open_posts_the_card_with_ack_and_a_guarded_restart(
    router: Router, stub: SlackStub
) -> None:
    reply = say(router, ALICE, "incident open acme P1 checkout is slow")
    assert "Opened" in reply.text and reply.ephemeral

    card = card_of(stub, "checkout is slow")
    assert "P1" in card.text and "acme" in card.text and "vps1" in card.text
    found = buttons(card)
    # Restore is offered when acme has a restore-tested backup (other tests may have made one).
    assert set(found) == {"db_incident_ack", "db_incident_restart", *restore_button(router.rt)}
    restart = found["db_incident_restart"]
    assert restart["style"] == "danger" and restart["confirm"]["style"] == "danger"
    # PostgreSQL answers, so the card says why Restart will not act.
    assert "nothing to restart" in card.text

    number = incident_id(card)
    ts = ts_of(router, card)
    diag = stub.wait_for(lambda c: c.kind == "chat.postMessage" and c.body.get("thread_ts") == ts)
    posted_contract(diag)
    for part in ("Diagnostics", "pg_stat_activity", "Log errors", "Disk"):
        assert part in diag.text, part

    # Pressing Restart anyway says why, to the presser alone, and runs nothing.
    refused = press(router, ALICE, f"incident restart {number}")
    assert refused.ephemeral and "not run" in refused.text and "answers" in refused.text
    assert not router.events.query(kind="incident.restart", subject=f"inc-{number}")


def test_a_viewer_cannot_ack_and_an_operator_acks_in_place(router: Router, stub: SlackStub) -> None:
    say(router, ALICE, "incident open acme P2 replication lag on acme")
    card = card_of(stub, "replication lag")
    number, ts = incident_id(card), ts_of(router, card)

    denied = bolt_press(router, stub, BOB, f"incident ack {number}")
    assert denied.body["response_type"] == "ephemeral" and "operator" in denied.text
    assert router.events.query(kind="auth.denied", subject=f"inc-{number}")
    assert not [c for c in stub.find(lambda c: c.kind == "chat.update") if c.body["ts"] == ts]

    acked = bolt_press(router, stub, ALICE, f"incident ack {number}")
    assert acked.body["response_type"] == "ephemeral" and "acknowledged" in acked.text
    update = stub.wait_for(lambda c: c.kind == "chat.update" and c.body.get("ts") == ts)
    posted_contract(update)
    assert "acknowledged" in update.text and "U_ALICE" in update.text
    assert "db_incident_ack" not in buttons(update)  # nothing left to ack

    again = press(router, ALICE, f"incident ack {number}")
    assert "already acknowledged" in again.text


def test_restart_from_the_card_brings_a_down_server_back(
    router: Router, stub: SlackStub, sandbox_break: Any
) -> None:
    sandbox_break("server-down", "vps1")
    say(router, ALICE, "incident open vps1 P0 vps1 postgres down")
    card = card_of(stub, "vps1 postgres down")
    number, ts = incident_id(card), ts_of(router, card)
    assert "nothing to restart" not in card.text
    assert "db_incident_restart" in buttons(card)

    result = press(router, ALICE, f"incident restart {number}")
    assert "answers again" in result.text, result.text

    thread = stub.wait_for(
        lambda c: (
            c.kind == "chat.postMessage"
            and c.body.get("thread_ts") == ts
            and "answers again" in c.text
        )
    )
    posted_contract(thread)
    update = stub.wait_for(
        lambda c: c.kind == "chat.update" and c.body.get("ts") == ts and "answers again" in c.text
    )
    assert "acknowledged" in update.text  # pressing Restart means someone is on it
    kinds = [e.kind for e in router.ops.events.query(subject=f"inc-{number}", limit=100)]
    assert "incident.restart" in kinds and "incident.recovered" in kinds


def test_log_shows_the_timeline_and_resolve_posts_the_downtime(
    router: Router, stub: SlackStub
) -> None:
    say(router, ALICE, "incident open acme P0 acme database down")
    card = card_of(stub, "acme database down")
    number, ts = incident_id(card), ts_of(router, card)
    press(router, ALICE, f"incident ack {number}")

    # Two hours later (over the SLA's hour), it is resolved with its cause.
    with time_machine.travel(datetime.now(UTC) + timedelta(hours=2), tick=True):
        resolved = say(router, ALICE, f"incident resolve inc-{number} disk filled by WAL")
    assert "resolved" in resolved.text and "SLA credit" in resolved.text
    thread = stub.wait_for(
        lambda c: (
            c.kind == "chat.postMessage" and c.body.get("thread_ts") == ts and "Downtime" in c.text
        )
    )
    posted_contract(thread)
    assert "disk filled by WAL" in thread.text and "acme: 2h00m" in thread.text
    assert "Proposed SLA credits" in thread.text and "$" in thread.text
    assert router.events.query(kind="sla.credit_proposed", subject=f"inc-{number}")
    closed = stub.wait_for(
        lambda c: c.kind == "chat.update" and c.body.get("ts") == ts and "resolved" in c.text
    )
    assert buttons(closed) == {}

    log = say(router, BOB, f"log inc-{number}")
    body = json.dumps([b.to_dict() for b in log.blocks])
    for kind in ("incident.opened", "incident.acknowledged", "incident.resolved"):
        assert kind in body, kind


def test_an_outage_over_an_hour_proposes_the_credit() -> None:
    now = datetime.now(UTC)
    res = two_hours_down(now)
    reply = resolution_reply(res, ALICE, credit_buttons(res, build_registry()))
    check_contract("credit", reply)
    body = json.dumps([b.to_dict() for b in reply.blocks])
    cents = credit_cents(300, timedelta(hours=2))
    assert "Proposed SLA credits" in body and f"${cents / 100:.2f}" in body
    assert "acme: 2h" in body or "acme: 2 h" in body, body


def two_hours_down(now: datetime) -> Resolution:
    """What core.incidents.resolve returns for acme down two hours on a $300/month plan."""
    inc = Incident(
        7, "acme down", "P0", "resolved", "db_down", "vps1", ("acme",), (), None, None,
        ALICE, ALICE, "manual", now - timedelta(hours=2), now, None, now, None, None, 0,
        "disk full", None,
    )  # fmt: skip
    cents = credit_cents(300, timedelta(hours=2))
    credit = CreditProposal("acme", "pro", 300, 7200, cents, "down 2 h (over 1 h)")
    return Resolution(inc, {"acme": 7200}, [credit], [])


def test_hostile_text_and_bad_arguments(router: Router, stub: SlackStub) -> None:
    say(router, ALICE, "incident open acme P3 <!channel> & <https://evil.example|click>")
    card = card_of(stub, "&lt;!channel&gt;")
    assert "<!channel>" not in card.text
    with pytest.raises(UsageError):
        router.run(Invocation(ALICE, "slack", text="incident open acme P9 broken"))
    with pytest.raises(UsageError):
        router.run(Invocation(ALICE, "slack", text="incident open acme P1"))
    listed = say(router, BOB, "incident list")
    assert "open incident" in listed.text
    assert any(str(b.text.text).startswith("Ack inc-") for b in listed.buttons())


def test_oncall_shows_and_an_admin_sets_it(router: Router) -> None:
    shown = say(router, BOB, "oncall")
    assert "primary U_ALICE" in shown.text
    with pytest.raises(Denied):
        router.run(Invocation(BOB, "slack", text="oncall set primary <@U_DAVE|dave>"))
    done = say(router, CAROL, "oncall set primary <@U_DAVE|dave>")
    assert "primary U_DAVE" in done.text
    assert "U_DAVE" in say(router, BOB, "oncall").text


def test_without_slack_the_reply_is_the_card(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    tmp_path: Path,
) -> None:
    """The shell (no SLACK_BOT_TOKEN): nothing is posted; the card and diagnostics are the reply,
    buttons and all, so `press 1` acks."""
    engine = make_engine(f"sqlite:///{tmp_path / 'shell.db'}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    rt = runtime(engine, sandbox_fleet, slack_bot_token=None, timezone=str(TZ))
    router = make_router(rt, Roles(operators=frozenset({ALICE})))
    try:
        reply = say(router, ALICE, "incident open acme P2 slow queries")
        text, shown = render_blocks(reply.blocks)
        assert "slow queries" in text and "Diagnostics" in text
        assert [b.action_id for b in shown] == [
            "db_incident_ack",
            "db_incident_restart",
            *restore_button(rt),
        ]
        assert "acknowledged" in press(router, ALICE, str(shown[0].value)).text
    finally:
        rt.close()
        engine.dispose()


def test_customer_email_preview_then_send_over_smtp(router: Router) -> None:
    from aiosmtpd.controller import Controller

    from tests.pgserver import free_port

    class Inbox:
        def __init__(self) -> None:
            self.messages: list[bytes] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.messages.append(envelope.content)
            return "250 OK"

    say(router, ALICE, "incident open acme P0 acme database down")
    inc = router.ops.events.query(kind="incident.opened", newest_first=True, limit=1)[0]
    number = int(str(inc.subject).removeprefix("inc-"))
    preview = say(router, ALICE, f"incident email {number} investigating")
    text = json.dumps(preview.message())
    assert "[INCIDENT]" in text and "{{" not in text and "acme" in text
    (send,) = preview.buttons()
    assert send.style == "danger" and send.confirm is not None
    # A viewer may not send; without SMTP_URL the operator is told what to set.
    with pytest.raises(Denied):
        router.run(
            Invocation(
                actor=BOB, surface="slack", action_id=send.action_id, value=send.value, channel=OPS
            )
        )
    assert router.rt.smtp_url is None
    assert "SMTP_URL is not set" in press(router, ALICE, str(send.value)).text
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    # The same bot restarted with SMTP_URL set: its database, event log and fleet.
    rt = router.rt
    mailing = Runtime(
        rt.settings.model_copy(update={"smtp_url": f"smtp://127.0.0.1:{port}"}),
        engine=rt.engine,
        events=rt.events,
        fleet=rt.fleet,
    )
    try:
        sent = press(make_router(mailing), ALICE, str(send.value))
    finally:
        controller.stop()
        mailing.close()
    assert "Sent the investigating email" in sent.text
    (message,) = inbox.messages
    body = message.decode()
    assert "[INCIDENT] Database outage - investigating" in body and "{{" not in body
    assert router.ops.events.query(kind="email.sent", subject=f"inc-{number}")
