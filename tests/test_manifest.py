"""manifest.yml and the app agree: the slash commands, interactivity for the buttons, the DM
events, scopes.

The app's side is read twice: what ``listeners.register`` says it registered, and what Bolt
itself routes (a signed request for every command and action id is handled, not 404).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from slack_bolt.request.async_request import AsyncBoltRequest
from sqlalchemy import Engine

from bot.commands.catalog import build_registry
from bot.runtime import Runtime
from bot.slack.app import create_app
from bot.slack.background import build_services
from tests.slack_stub import (
    BOT_TOKEN,
    SCOPES,
    SIGNING_SECRET,
    SlackStub,
    action_body,
    sign,
    slash_body,
)

REGISTRY = build_registry()  # every command, as the app has them

MANIFEST = Path(__file__).resolve().parents[1] / "manifest.yml"


def load_yaml(text: str) -> Any:
    """The block-style YAML subset the manifest is written in (PyYAML is not a dependency)."""
    lines = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            lines.append((len(raw) - len(raw.lstrip(" ")), stripped))
    value, end = _block(lines, 0, lines[0][0])
    assert end == len(lines), f"could not read line {end + 1}: {lines[end]}"
    return value


def _scalar(text: str) -> Any:
    if text.startswith('"'):
        return json.loads(text)
    return {"true": True, "false": False}.get(text, text)


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- "):
        items: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            item = lines[i][1][2:]
            if ": " in item or item.endswith(":"):
                lines[i] = (indent + 2, item)
                value, i = _block(lines, i, indent + 2)
            else:
                value, i = _scalar(item), i + 1
            items.append(value)
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        key, _, rest = lines[i][1].partition(":")
        rest, i = rest.strip(), i + 1
        if rest:
            mapping[key] = _scalar(rest)
        else:
            mapping[key], i = _block(lines, i, lines[i][0])
    return mapping, i


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return load_yaml(MANIFEST.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _services(engine: Engine, stub: SlackStub) -> Any:
    ctx = Runtime.load(
        database_url=str(engine.url),
        slack_bot_token=BOT_TOKEN,
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=stub.base_url,
    )
    return build_services(ctx)


def test_the_manifest_declares_what_the_app_registers(
    manifest: dict[str, Any], sqlite_engine: Engine
) -> None:
    with SlackStub() as stub:
        services = _services(sqlite_engine, stub)
        create_app(services)
    registered = services.registered
    commands = manifest["features"]["slash_commands"]
    assert [c["command"] for c in commands] == registered["commands"] == ["/db"]
    (db,) = commands
    for spec in REGISTRY.specs:
        assert spec.name in db["usage_hint"], spec.name
    assert db["url"].endswith("/slack/events") and db["description"]
    interactivity = manifest["settings"]["interactivity"]
    assert registered["actions"] == REGISTRY.action_ids() != []
    assert interactivity["is_enabled"] is True
    assert interactivity["request_url"].endswith("/slack/events")
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == {
        "commands",
        "chat:write",
        "chat:write.public",
        "im:write",
        "im:history",
        "channels:read",  # /healthz: the ops and escalation channels are postable
        "groups:read",
        "channels:history",  # the outbox finds a post whose answer was lost (metadata)
        "groups:history",
        "files:write",  # charts: files.getUploadURLExternal / files.completeUploadExternal
    }
    # What the strict stub grants is what the manifest asks for.
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == set(SCOPES.split(","))
    # No users:read: nothing calls users.info. DMs to the bot are commands (message.im).
    assert manifest["settings"]["event_subscriptions"]["bot_events"] == registered["events"]
    assert registered["events"] == ["message.im"]
    assert manifest["settings"]["event_subscriptions"]["request_url"].endswith("/slack/events")
    home = manifest["features"]["app_home"]
    assert home["messages_tab_enabled"] is True
    assert home["messages_tab_read_only_enabled"] is False
    assert manifest["settings"]["socket_mode_enabled"] is True
    assert manifest["features"]["bot_user"]["display_name"] == "dbops"


def test_bolt_routes_every_registered_command_and_action(sqlite_engine: Engine) -> None:
    with SlackStub() as stub:
        services = _services(sqlite_engine, stub)
        app = create_app(services)
        url = stub.response_url  # one per request, as Slack gives
        known = [slash_body("help", response_url=url())]
        known += [action_body(a, "report", response_url=url()) for a in REGISTRY.action_ids()]
        # A repeat in a block (bot.views.blocks.numbered) goes to the same listener.
        known += [
            action_body(f"{a}:2", "report", response_url=url()) for a in REGISTRY.action_ids()
        ]
        unknown = [
            action_body("db_unknown", "report", response_url=url()),
            action_body("db_report:x", "report", response_url=url()),
            slash_body("help", response_url=url()).replace("%2Fdb", "%2Fother"),
        ]

        async def dispatch(bodies: list[str]) -> list[int]:
            out = []
            for body in bodies:
                headers: dict[str, str | Sequence[str]] = {**sign(body)}
                resp = await app.async_dispatch(AsyncBoltRequest(body=body, headers=headers))
                out.append(resp.status)
            return out

        async def scenario() -> tuple[list[int], list[int]]:
            try:
                return await dispatch(known), await dispatch(unknown)
            finally:
                await services.aclose()

        handled, refused = asyncio.run(scenario())
    assert handled == [200] * len(known)
    assert refused == [404, 404, 404]
