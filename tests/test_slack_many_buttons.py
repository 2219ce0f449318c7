"""Messages with many buttons for one command: Slack takes them, and every button works.

Slack refuses a block in which two elements share an action_id (``invalid_blocks``), so the
incident list's Ack per incident and the resolve note's Apply per credited customer number
their repeats (db_incident_ack, db_incident_ack:2, ...) and carry the command line as value.
Here, as Slack does it (signed requests through Bolt, the strict stub for Slack, the Stripe stub
for credits): `/db incident list` with five unacknowledged incidents is accepted and each Ack
acks its own incident; a resolve note with fifteen credits is accepted, in the reply and in the
card's thread, and each Apply credits its own customer in Stripe, once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import time_machine

from bot.commands import incidents
from bot.commands.router import Router
from bot.desk import Desk
from core.customers import Customer, customer_from_mapping, upsert_customers
from core.fleet import Fleet
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from storage.models_billing import link_stripe_customer
from tests.bot_kit import ALICE, BOB, CAROL, make_router, runtime
from tests.slack_app import send_once
from tests.slack_stub import BOT_TOKEN, Call, SlackStub, action_body, slash_body
from tests.stripe_stub import StripeStub, running_stub
from tests.test_billing import API_KEY

OPS = "C0DBOPS"
TZ = ZoneInfo("America/New_York")
CREDITED = [f"credit{k:02d}" for k in range(1, 16)]  # fifteen customers down with vps1
ELSEWHERE = "vps99"


@dataclass
class Env:
    router: Router
    slack: SlackStub
    stripe: StripeStub

    @property
    def desk(self) -> Desk:
        return self.router.rt.desk


@pytest.fixture
def env(sandbox: dict[str, Any], sandbox_fleet: Fleet, tmp_path: Path) -> Iterator[Env]:
    engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
    upgrade(engine)
    plan = next(iter(sandbox_fleet.plans))
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    # On paper only: on a server the fleet does not have, so the health checks these tests
    # cause (the card, an ack's refresh) never try their databases, which do not exist (a
    # FATAL in vps1's log for each would fail later tests that read that log).
    upsert_customers(engine, [Customer(name=n, server=ELSEWHERE, database=n, role=n, plan=plan)
                              for n in CREDITED])  # fmt: skip
    for n in CREDITED:
        link_stripe_customer(engine, n, f"cus_{n}")
    events = EventLog(engine)
    with SlackStub() as slack, running_stub() as stripe:
        rt = runtime(
            engine,
            sandbox_fleet,
            events=events,
            slack_bot_token=BOT_TOKEN,
            slack_api_url=slack.base_url,
            ops_channel=OPS,
            stripe_api_key=API_KEY,
            stripe_api_base=stripe.base_url,
            timezone=str(TZ),
        )
        try:
            yield Env(make_router(rt), slack, stripe)
        finally:
            rt.close()
            engine.dispose()


def typed(env: Env, user: str, text: str) -> Call:
    """`/db <text>` as Slack sends it; the reply on its response_url, which Slack took."""
    token = uuid.uuid4().hex
    body = slash_body(text, user=user, response_url=env.slack.response_url(token), channel=OPS)
    assert send_once(env.router, env.slack, body) == 200
    (reply,) = env.slack.replies_to(token)
    return reply


def pressed(env: Env, user: str, button: dict[str, Any], block_id: str) -> Call:
    """A press of ``button`` as Slack sends it; the reply on the press's response_url."""
    token = uuid.uuid4().hex
    body = action_body(
        button["action_id"],
        button["value"],
        user=user,
        response_url=env.slack.response_url(token),
        channel=OPS,
        block_id=block_id,
    )
    assert send_once(env.router, env.slack, body) == 200
    (reply,) = env.slack.replies_to(token)
    return reply


def buttons(call: Call) -> list[tuple[str, dict[str, Any]]]:
    """Every button of a message Slack took, with the block it is in."""
    assert call.ok, (call.kind, call.error, call.answer)
    blocks = call.body.get("blocks") or []
    blocks = json.loads(blocks) if isinstance(blocks, str) else blocks
    return [
        (block["block_id"], el)
        for block in blocks
        if block["type"] == "actions"
        for el in block["elements"]
    ]


def test_incident_list_with_five_unacknowledged_and_each_ack_acks_its_own(env: Env) -> None:
    opened = [
        env.desk.incidents.open(
            f"queue {n} is stuck", "P1", actor=ALICE, customers=[n], server="vps1"
        )
        for n in CREDITED[:5]
    ]
    listed = typed(env, BOB, "incident list")
    found = buttons(listed)
    assert sorted(el["value"] for _, el in found) == sorted(f"incident ack {i.ref}" for i in opened)
    actions = [el["action_id"] for _, el in found]
    registry = env.router.registry
    assert len(set(actions)) == 5 and {registry.by_action(a) for a in actions} == {
        registry.get("incident ack")
    }
    for block_id, button in found:
        ref = button["value"].split()[-1]
        said = pressed(env, ALICE, button, block_id)
        assert f"You acknowledged *{ref}*" in said.text, said.text
    for inc in opened:
        now = env.desk.incidents.get(inc.id)
        assert (now.status, now.owner) == ("acknowledged", ALICE), inc.ref
    # With nothing left to ack, the list has no buttons.
    assert buttons(typed(env, BOB, "incident list")) == []


def test_a_resolve_note_with_fifteen_credits_and_each_apply_credits_its_customer(
    env: Env,
) -> None:
    inc = env.desk.incidents.open(
        "vps1 lost its disk", "P0", actor=ALICE, customers=CREDITED, server="vps1"
    )
    said = incidents.announce(env.router.rt, inc.id)
    assert said.ref is not None
    with time_machine.travel(datetime.now(UTC) + timedelta(hours=2), tick=True):
        note = typed(env, ALICE, f"incident resolve {inc.id} the disk was replaced")
    thread = env.slack.wait_for(
        lambda c: c.kind == "chat.postMessage" and c.body.get("thread_ts") == said.ref.ts
        and "Proposed SLA credits" in c.text
    )  # fmt: skip
    for message in (note, thread):
        found = buttons(message)
        assert sorted(el["value"] for _, el in found) == [
            f"credit apply {inc.ref} {n}" for n in CREDITED
        ]
        assert len({el["action_id"] for _, el in found}) == 15
        registry = env.router.registry
        assert {registry.by_action(el["action_id"]) for _, el in found} == {
            registry.get("credit apply")
        }
        assert all(el["style"] == "danger" and el["confirm"] for _, el in found)

    for block_id, button in buttons(thread):
        customer = button["value"].split()[-1]
        applied = pressed(env, CAROL, button, block_id)
        assert f"Applied the SLA credit for {customer}" in applied.text, applied.text
    keys = sorted(p.idempotency_key or "" for p in env.stripe.posts("/v1/customers/"))
    assert keys == sorted(f"sla-credit:{inc.id}:{n}" for n in CREDITED)
    paths = {p.path for p in env.stripe.posts("/v1/customers/")}
    assert paths == {f"/v1/customers/cus_{n}/balance_transactions" for n in CREDITED}
