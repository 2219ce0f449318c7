"""What people type reaches dbops as they typed it: Slack sends a typed &, < and > as &amp;,
&lt; and &gt;, decoded once where the text comes in. Alice opens an incident titled with all
three through a signed `/db` request; the title is stored as typed, the card shows it escaped
once (inert, never double-escaped) and the customer's resolution email shows a plain &."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.commands.roles import Roles
from bot.commands.router import Router
from bot.views.blocks import unescape
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import Fleet
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.bot_kit import make_router, runtime
from tests.slack_app import SlackApp
from tests.slack_stub import BOT_TOKEN, SlackStub, slash_body

ALICE = "U_ALICE"  # an operator
OPS = "C0DBOPS"
TYPED = "Disk & CPU <high>"
AS_SLACK_SENDS = "Disk &amp; CPU &lt;high&gt;"


@pytest.fixture
def desk(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, tmp_path: Path
) -> Iterator[tuple[Router, SlackStub]]:
    with SlackStub() as stub:
        engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
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
        )
        try:
            yield make_router(rt, Roles(operators=frozenset({ALICE}))), stub
        finally:
            rt.close()
            engine.dispose()


def slash(router: Router, stub: SlackStub, text: str) -> None:
    """`/db <text>` as Slack sends it, signed, through Bolt; its work done."""
    slack = SlackApp(router, stub)
    body = slash_body(text, user=ALICE, response_url=stub.response_url(uuid.uuid4().hex))

    async def scenario() -> int:
        try:
            status, _ = await slack.send(body)
            return status
        finally:
            await slack.close()

    assert asyncio.run(scenario()) == 200


def test_unescape_decodes_each_entity_once() -> None:
    assert unescape(AS_SLACK_SENDS) == TYPED
    # Someone who typed an entity gets the entity, not the character.
    assert unescape("&amp;lt; &amp;amp;") == "&lt; &amp;"
    assert unescape("&quot; &#60;") == "&quot; &#60;"


def test_an_incident_title_and_resolution_email_show_what_was_typed(
    desk: tuple[Router, SlackStub],
) -> None:
    router, stub = desk
    slash(router, stub, f"incident open acme P1 {AS_SLACK_SENDS}")
    incidents = router.rt.incidents
    opened = router.events.query(kind="incident.opened", newest_first=True, limit=1)[0]
    inc = incidents.get(str(opened.subject).removeprefix("inc-"))
    assert inc.title == TYPED

    card = stub.wait_for(
        lambda c: c.kind == "chat.postMessage" and c.body.get("channel") == OPS
        and not c.body.get("thread_ts")
    )  # fmt: skip
    assert card.ok, card.error
    assert AS_SLACK_SENDS in card.text  # escaped once: shown as typed, never a link or ping
    assert "&amp;amp;" not in card.text and "&amp;lt;" not in card.text
    assert TYPED not in card.text

    slash(router, stub, f"incident resolve {inc.id} disk full &amp; autovacuum &lt;stuck&gt;")
    resolved = incidents.get(inc.id)
    assert resolved.status == "resolved"
    emails = incidents.email_preview(inc.id, "resolved")
    assert emails
    for email in emails:
        assert "disk full & autovacuum <stuck>" in email.body
        assert "&amp;" not in email.body and "&lt;" not in email.body
