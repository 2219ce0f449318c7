"""Typing to the bot in its DM (the App Home messages tab): "status acme" answers in the DM as
`/db status acme` answers in a channel, with the sender's role; the bot's own messages and a
retried event run nothing more. Signed Events API requests through Bolt, Slack as the stub."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.commands.roles import Roles
from bot.commands.router import Router
from bot.slack.listeners.messages import command_line
from core.fleet import Fleet
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.bot_kit import make_router, runtime
from tests.slack_app import SlackApp
from tests.slack_stub import Call, SlackStub, dm_channel, sign, slash_body

ALICE, BOB = "U_ALICE", "U_BOB"  # operator, viewer


@pytest.fixture
def router(sandbox_fleet: Fleet, tmp_path: Path) -> Iterator[Router]:
    engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
    upgrade(engine)
    events = EventLog(engine)
    rt = runtime(engine, sandbox_fleet, events=events, timezone="UTC")
    roles = Roles(operators=frozenset({ALICE}))
    try:
        yield make_router(rt, roles)
    finally:
        rt.close()
        engine.dispose()


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


def dm_body(user: str, text: str, *, event_id: str | None = None, **extra: Any) -> str:
    """A message.im event as Slack sends it (JSON, typed text entity-escaped)."""
    event = {
        "type": "message",
        "channel_type": "im",
        "channel": dm_channel(user),
        "user": user,
        "text": text,
        "ts": "1700000000.000100",
        **extra,
    }
    envelope = {
        "token": "legacy-verification-token",
        "team_id": "T0DBOPS",
        "api_app_id": "A0DBOPS",
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": 1700000000,
        "event": event,
    }
    return json.dumps(envelope)


def send(router: Router, stub: SlackStub, *bodies: str) -> list[int]:
    """Signed requests through Bolt, one after another, and the work they started."""
    slack = SlackApp(router, stub)

    async def scenario() -> list[int]:
        statuses = []
        try:
            for body in bodies:
                headers: dict[str, str | Sequence[str]] = {**sign(body)}
                if body.startswith("{"):
                    headers["Content-Type"] = "application/json"
                resp = await slack.app.async_dispatch(AsyncBoltRequest(body=body, headers=headers))
                statuses.append(resp.status)
            await slack.drain()
            return statuses
        finally:
            await slack.close()

    return asyncio.run(scenario())


def in_dm(stub: SlackStub, user: str) -> list[Call]:
    return stub.find(
        lambda c: c.kind == "chat.postMessage" and c.body.get("channel") == dm_channel(user)
    )


def kinds(call: Call) -> list[str]:
    blocks = call.body.get("blocks") or []
    return [b["type"] for b in (json.loads(blocks) if isinstance(blocks, str) else blocks)]


def test_status_typed_in_the_dm_answers_like_the_slash_command(
    router: Router, stub: SlackStub
) -> None:
    token = uuid.uuid4().hex
    slashed = slash_body("status acme", user=ALICE, response_url=stub.response_url(token))
    assert send(router, stub, slashed, dm_body(ALICE, "status acme")) == [200, 200]
    by_slash = stub.wait_for(lambda c: c.path == f"/response/{token}")
    (by_dm,) = in_dm(stub, ALICE)
    assert by_dm.ok, by_dm.error
    assert by_dm.body["text"] == by_slash.body["text"] and "acme" in by_dm.body["text"]
    assert kinds(by_dm) == kinds(by_slash)


def test_a_dm_runs_with_the_senders_role(router: Router, stub: SlackStub) -> None:
    assert send(router, stub, dm_body(BOB, "backup acme")) == [200]
    (reply,) = in_dm(stub, BOB)
    assert reply.ok, reply.error
    denied = router.events.query(kind="auth.denied")
    assert [e.actor for e in denied] == [BOB]
    assert not router.events.query(kind_prefix="backup.")


def test_the_bots_own_messages_and_a_retried_event_run_nothing_more(
    router: Router, stub: SlackStub
) -> None:
    once = dm_body(ALICE, "help", event_id="Ev0RETRIED")
    own = dm_body(ALICE, "help", bot_id="B0DBOPS")
    edited = dm_body(ALICE, "help", subtype="message_changed")
    assert send(router, stub, once, once, own, edited) == [200, 200, 200, 200]
    assert len(in_dm(stub, ALICE)) == 1


def test_the_command_line_in_a_dm() -> None:
    assert command_line("status acme") == "status acme"
    assert command_line("/db status acme") == "status acme"
    assert command_line("  db status acme ") == "status acme"
    assert command_line("/db") == "help"
    assert (
        command_line("incident open acme P1 Disk &amp; CPU") == "incident open acme P1 Disk & CPU"
    )
