"""Escalation pages carry an Ack button: pressed from the DM, it acks and the paging stops.

An alert opens an incident while alice (an operator) is primary and dave (an operator)
secondary. Alice's DM has the page's words, the command to type, and an Ack button; she presses
it from the DM and nobody else is paged. Left alone, the page goes on to dave and then the
escalation channel, each with the button; once alice acks from the channel, dave's button is a
dead one that says who acked. Bob (a viewer) is refused, as when he types it. Slack is our stub,
the press a signed block_actions through Bolt; time is moved with time-machine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import time_machine
from slack_sdk import WebClient
from slack_sdk.models.blocks import Block

from bot.commands.catalog import build_registry
from bot.commands.roles import Roles
from bot.commands.router import Invocation, Registry, Router, parse
from bot.notifiers import SlackNotifier
from core.fleet import Fleet, parse_fleet
from core.notify import Message
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.bot_kit import ALICE, BOB, CAROL, make_router, runtime
from tests.slack_app import send_once
from tests.slack_stub import BOT_TOKEN, Call, SlackStub, action_body, dm_channel
from tests.test_slack_incidents import posted_contract

DAVE = "U_DAVE"  # a second operator
OPS = "C0DBOPS"
ESCALATIONS = "C0ESCALATE"
TZ = ZoneInfo("America/New_York")


@pytest.fixture(scope="module")
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


def fleet() -> Fleet:
    """One server nobody talks to (these incidents name none), the escalation policy."""
    return parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1 dbname=postgres"}],
            "oncall": {"escalation_channel": ESCALATIONS},
            "escalation": {"ack_timeout": "5m", "channel_after": "15m", "repeat": 0},
        }
    )


@pytest.fixture(scope="module")
def router(stub: SlackStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('pages') / 'dbops.db'}")
    upgrade(engine)
    events = EventLog(engine)
    rt = runtime(
        engine,
        fleet(),
        events=events,
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
        ops_channel=OPS,
        timezone=str(TZ),
    )
    roles = Roles(operators=frozenset({ALICE, DAVE}), admins=frozenset({CAROL}))
    router = make_router(rt, roles)
    for role, user in (("primary", ALICE), ("secondary", DAVE)):
        router.run(Invocation(CAROL, "slack", text=f"oncall set {role} <@{user}>", channel=OPS))
    yield router
    rt.close()
    engine.dispose()


def open_incident(router: Router, title: str) -> int:
    """What an alert does: the incident opens and the primary is paged at once."""
    desk = router.rt.desk
    return int(desk.incidents.open(title, "P1", actor="alertmanager").id)


def tick(router: Router, at: datetime) -> None:
    desk = router.rt.desk
    with time_machine.travel(at, tick=True):
        desk.incidents.escalator.tick()


def pages(stub: SlackStub, number: int, channel: str | None = None) -> list[Call]:
    """The page messages about inc-``number`` (to ``channel`` when given)."""
    return stub.find(
        lambda c: (
            c.kind == "chat.postMessage"
            and f"inc-{number}:" in str(c.body.get("text", ""))
            and (channel is None or c.body.get("channel") == channel)
        )
    )


def ack_button(call: Call) -> dict[str, Any]:
    (button,) = [
        el
        for block in call.body.get("blocks") or []
        if block["type"] == "actions"
        for el in block["elements"]
    ]
    return button


def assert_page(call: Call, number: int) -> None:
    """A page: the words and the typed command in the fallback, the words on screen, one Ack
    button that runs `incident ack <number>`, within Block Kit's limits."""
    posted_contract(call)
    for block in call.body["blocks"]:
        parsed = Block.parse(block)
        assert parsed is not None
        parsed.validate_json()
    assert f"`/db incident ack {number}`" in call.body["text"]
    section = call.body["blocks"][0]
    assert section["type"] == "section" and f"inc-{number}" in section["text"]["text"]
    button = ack_button(call)
    assert button["action_id"] == "db_incident_ack" and button["text"]["text"] == "Ack"
    registry = build_registry()
    assert button["value"] == parse(f"incident ack {number}", registry).line  # "incident ack inc-N"
    assert parse(button["value"], registry).spec.name == "incident ack"


def bolt_press(
    router: Router, stub: SlackStub, user: str, button: dict[str, Any], where: str
) -> Call:
    """Press ``button`` as Slack does, in channel ``where`` (a DM is D...): a signed
    block_actions through Bolt; the reply is what lands on the press's response_url."""
    token = uuid.uuid4().hex
    body = action_body(
        button["action_id"],
        button["value"],
        user=user,
        response_url=stub.response_url(token),
        channel=where,
    )
    assert send_once(router, stub, body) == 200
    return stub.wait_for(lambda c: c.path == f"/response/{token}")


def test_ack_from_the_page_dm_stops_the_escalation(router: Router, stub: SlackStub) -> None:
    opened = datetime.now(UTC)
    number = open_incident(router, "checkout returns 500s")

    assert stub.find(lambda c: c.kind == "conversations.open" and c.body["users"] == ALICE)
    (dm,) = pages(stub, number)
    assert dm.body["channel"] == dm_channel(ALICE)  # the DM conversations.open gave us
    assert_page(dm, number)

    reply = bolt_press(router, stub, ALICE, ack_button(dm), dm_channel(ALICE))
    assert reply.body["response_type"] == "ephemeral"
    assert f"You acknowledged inc-{number}" in reply.text
    (pressed,) = router.events.query(kind="button", subject=f"inc-{number}")
    assert pressed.payload["channel"] == dm_channel(ALICE) and pressed.actor == ALICE
    (acked,) = router.events.query(kind="incident.acknowledged", subject=f"inc-{number}")
    assert acked.actor == ALICE and acked.payload["owner"] == ALICE

    # Past the ack timeout and the channel's turn: nobody else hears of it.
    tick(router, opened + timedelta(minutes=5, seconds=1))
    tick(router, opened + timedelta(minutes=15, seconds=1))
    assert pages(stub, number) == [dm]
    sent = router.events.query(subject=f"inc-{number}", limit=100)
    assert [e.kind for e in sent if e.kind.startswith("escalation.")] == ["escalation.dm"]


def test_each_page_has_the_button_and_a_dead_one_says_who_acked(
    router: Router, stub: SlackStub
) -> None:
    opened = datetime.now(UTC)
    number = open_incident(router, "replica is a day behind")
    tick(router, opened + timedelta(minutes=5, seconds=1))
    tick(router, opened + timedelta(minutes=15, seconds=1))

    (secondary,) = pages(stub, number, dm_channel(DAVE))
    (channel,) = pages(stub, number, ESCALATIONS)
    for page in (secondary, channel):
        assert_page(page, number)
    assert f"not acknowledged by <@{ALICE}>" in secondary.body["text"]

    # A viewer in the escalation channel is refused, as when he types it.
    denied = bolt_press(router, stub, BOB, ack_button(channel), ESCALATIONS)
    assert "operator" in denied.text
    alice = bolt_press(router, stub, ALICE, ack_button(channel), ESCALATIONS)
    assert f"You acknowledged inc-{number}" in alice.text

    # Dave wakes up later and presses the button in his DM: told who has it, nothing changes.
    late = bolt_press(router, stub, DAVE, ack_button(secondary), dm_channel(DAVE))
    assert late.body["response_type"] == "ephemeral"
    # Alice is named as a person in the message (a user mention survives the escaping of
    # errors; the plain-text fallback keeps it as text).
    shown = json.dumps(late.body["blocks"])
    assert f"inc-{number} is already acknowledged by <@{ALICE}>" in shown
    assert f"already acknowledged by &lt;@{ALICE}&gt;" in late.body["text"]
    (acked,) = router.events.query(kind="incident.acknowledged", subject=f"inc-{number}")
    assert acked.actor == ALICE


def test_only_an_ack_page_gets_the_button(stub: SlackStub) -> None:
    notifier = SlackNotifier(
        WebClient(token=BOT_TOKEN, base_url=stub.base_url), registry=build_registry()
    )
    sent = [
        ("plain", Message("a note", meta=None)),
        ("reminder", Message("send an update", meta={"incident": 7, "actions": []})),
        ("no id", Message("page", meta={"actions": ["ack"]})),
        ("bad id", Message("page", meta={"incident": "7", "actions": ["ack"]})),
    ]
    for name, message in sent:
        notifier.post(OPS, Message(f"{name}: {message.text}", meta=message.meta))
    for name, _ in sent:
        call = stub.wait_for(lambda c, n=name: c.body.get("text", "").startswith(f"{n}:"))
        assert "blocks" not in call.body, name

    # Blocks of its own keep theirs, with the button after them.
    own = [{"type": "section", "text": {"type": "mrkdwn", "text": "*own* words"}}]
    notifier.post(OPS, Message("own: page", blocks=own, meta={"incident": 7, "actions": ["ack"]}))
    call = stub.wait_for(lambda c: c.body.get("text") == "own: page")
    assert call.body["blocks"][0] == own[0] and ack_button(call)["value"] == "incident ack inc-7"

    # No button to be had (a registry without `incident ack`): the page still goes, as text.
    bare = SlackNotifier(WebClient(token=BOT_TOKEN, base_url=stub.base_url), registry=Registry())
    bare.dm(DAVE, Message("bare: page inc-7", meta={"incident": 7, "actions": ["ack"]}))
    call = stub.wait_for(lambda c: c.body.get("text") == "bare: page inc-7")
    assert call.body["channel"] == dm_channel(DAVE) and "blocks" not in call.body
    # No registry at all (a checkpoint's poster): the same.
    plain = SlackNotifier(WebClient(token=BOT_TOKEN, base_url=stub.base_url))
    plain.post(OPS, Message("plain: page inc-7", meta={"incident": 7, "actions": ["ack"]}))
    call = stub.wait_for(lambda c: c.body.get("text") == "plain: page inc-7")
    assert "blocks" not in call.body
