"""The `/db` slash command: ack at once, hand the text (as typed: Slack's entities decoded)
to the router in the background."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slack_bolt.async_app import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.commands.router import Invocation
from bot.slack.listeners.delivery import Destination, delivery_key, trigger_of
from bot.views.blocks import unescape

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.slack.background import Services

SLASH_COMMANDS = ["/db"]


def register(app: AsyncApp, services: Services) -> list[str]:
    async def db_command(ack: AsyncAck, body: dict[str, Any], request: AsyncBoltRequest) -> None:
        await ack()  # Slack retries what is not acked in 3 s; the router drops repeats
        user, channel = str(body.get("user_id", "")), body.get("channel_id")
        services.background.submit(
            Invocation(
                actor=user,
                surface="slack",
                text=unescape(str(body.get("text", ""))),
                channel=channel,
                delivery=delivery_key("command", body, request),
                trigger=trigger_of(body),
            ),
            Destination(body.get("response_url"), channel, user),
        )

    for name in SLASH_COMMANDS:
        app.command(name)(db_command)
    return list(SLASH_COMMANDS)
