"""Forms (Slack modals) for commands that ask before they act, on Slack's 3-second trigger.

A form command that answers quickly opens its form directly; one that takes longer opens a
placeholder at once and fills it in; an error after the placeholder shows in it; a trigger Slack
refuses (expired) turns the reply into a message that says how to do it by typing. A test
command stands in for restore, so each path is reached on purpose, without a fleet.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

import bot.slack.background
from bot.commands.catalog import build_registry
from bot.commands.roles import Roles
from bot.commands.router import Arg, Call, Router, Spec
from bot.views.blocks import Reply
from core.errors import DbopsError
from tests.bot_kit import make_router, no_fleet
from tests.slack_app import SlackApp
from tests.slack_stub import SlackStub, slash_body

VIEW = {
    "type": "modal",
    "callback_id": "t_form",
    "title": {"type": "plain_text", "text": "Wipe"},
    "submit": {"type": "plain_text", "text": "Wipe"},
    "private_metadata": json.dumps({"target": "acme"}),
    "blocks": [
        {
            "type": "input",
            "block_id": "confirm",
            "label": {"type": "plain_text", "text": "Type acme"},
            "element": {"type": "plain_text_input", "action_id": "typed"},
        }
    ],
}


class Gate:
    """What the test command does: answer at once, or when released, or fail when released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.wait = False
        self.fail = False

    def handler(self, call: Call) -> Reply:
        if self.wait:
            assert self.release.wait(30), "the test never released the command"
        if self.fail:
            raise DbopsError("acme's backups could not be read: vps1 did not answer.")
        return Reply(text="Wipe acme? Type: /db wipe acme --confirm acme", view=dict(VIEW))


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture
def router(gate: Gate, sqlite_engine: Engine) -> Router:
    registry = build_registry()
    registry.add(
        Spec(
            "wipe",
            "a stand-in for restore",
            gate.handler,
            (Arg("target", "customer"), Arg("confirm", "customer", optional=True, flag=True)),
            button="Wipe…",
            form="confirm",
        )
    )

    return make_router(no_fleet(sqlite_engine, timezone="UTC"), Roles(), registry)


def typed(
    router: Router, stub: SlackStub, text: str, *, during: Any = None, trigger_age_s: float = 0
) -> tuple[str, str]:
    """`/db <text>` through the Bolt app, with a trigger ``trigger_age_s`` old when it
    arrives; returns the trigger and the response_url's token."""
    slack = SlackApp(router, stub)
    trigger, token = stub.trigger(age_s=trigger_age_s), uuid.uuid4().hex
    body = slash_body(text, trigger_id=trigger, response_url=stub.response_url(token))

    async def scenario() -> None:
        try:
            assert (await slack.dispatch(body))[0] == 200
            if during is not None:
                await asyncio.to_thread(during)
            await slack.drain(timeout=30)
        finally:
            await slack.close()

    asyncio.run(scenario())
    return trigger, token


def view(call: Any) -> dict[str, Any]:
    v = call.body["view"]
    return dict(json.loads(v) if isinstance(v, str) else v)


def test_a_form_ready_in_time_opens_as_it_is(router: Router, stub: SlackStub) -> None:
    trigger, token = typed(router, stub, "wipe acme")
    (opened,) = stub.find(lambda c: c.kind == "views.open")
    assert opened.body["trigger_id"] == trigger
    form = view(opened)
    assert form["callback_id"] == "t_form" and form["blocks"] == VIEW["blocks"]
    # Where the result goes rides along, for the submit.
    meta = json.loads(form["private_metadata"])
    assert meta["target"] == "acme" and meta["channel"] == "C0DBOPS"
    assert meta["response_url"].endswith(token)
    assert stub.find(lambda c: c.kind == "views.update") == [] and stub.replies_to(token) == []
    (sent,) = router.events.query(kind="message.sent", limit=5)
    assert sent.payload["via"] == "form"
    assert "/response/" not in json.dumps(sent.payload)  # the response_url is not logged


def test_a_slow_form_opens_a_placeholder_then_fills_it(
    router: Router, stub: SlackStub, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.slack.background, "FORM_WAIT_S", 0.05)
    gate.wait = True

    def once_the_placeholder_is_open() -> None:
        stub.wait_for(lambda c: c.kind == "views.open")
        gate.release.set()

    trigger, token = typed(router, stub, "wipe acme", during=once_the_placeholder_is_open)
    (opened,) = stub.find(lambda c: c.kind == "views.open")
    assert opened.body["trigger_id"] == trigger
    assert "callback_id" not in view(opened) and "wipe acme" in json.dumps(view(opened))
    (updated,) = stub.find(lambda c: c.kind == "views.update")
    assert view(updated)["callback_id"] == "t_form"
    assert json.loads(view(updated)["private_metadata"])["channel"] == "C0DBOPS"
    assert stub.replies_to(token) == []


def test_an_error_after_the_placeholder_shows_in_it(
    router: Router, stub: SlackStub, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.slack.background, "FORM_WAIT_S", 0.05)
    gate.wait = gate.fail = True

    def once_the_placeholder_is_open() -> None:
        stub.wait_for(lambda c: c.kind == "views.open")
        gate.release.set()

    _, token = typed(router, stub, "wipe acme", during=once_the_placeholder_is_open)
    (updated,) = stub.find(lambda c: c.kind == "views.update")
    shown = view(updated)
    assert "callback_id" not in shown and "did not answer" in json.dumps(shown)
    assert stub.replies_to(token) == []


def test_an_error_in_time_is_a_message_and_no_modal(
    router: Router, stub: SlackStub, gate: Gate
) -> None:
    gate.fail = True
    _, token = typed(router, stub, "wipe acme")
    assert stub.find(lambda c: c.kind.startswith("views.")) == []
    (said,) = stub.replies_to(token)
    assert "did not answer" in said.body["text"] and said.body["response_type"] == "ephemeral"


def test_an_expired_trigger_turns_the_form_into_a_message(router: Router, stub: SlackStub) -> None:
    stub.expect_refusals("expired_trigger_id")
    _, token = typed(router, stub, "wipe acme", trigger_age_s=4)  # Slack's 3 s are over
    (refused,) = stub.find(lambda c: c.kind == "views.open")
    assert refused.error == "expired_trigger_id"
    (said,) = stub.replies_to(token)
    assert "/db wipe acme --confirm acme" in said.body["text"]
    (sent,) = router.events.query(kind="message.sent", limit=5)
    assert sent.payload["via"] == "response_url"
