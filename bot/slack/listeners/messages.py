"""A message typed to the bot in its DM (the App Home messages tab): run as a `/db` line.

"status acme" in the DM answers as `/db status acme` does, with the sender's role; the reply
is posted in the DM. The bot's own messages and edits (any subtype) are not commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slack_bolt.request.async_request import AsyncBoltRequest

from bot.commands.router import Invocation
from bot.slack.listeners.delivery import Destination, delivery_key
from bot.views.blocks import unescape

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.slack.background import Services

BOT_EVENTS = ["message.im"]


def command_line(text: str) -> str:
    """The command in a DM's text, as typed: entities decoded, a leading `/db` optional."""
    line = unescape(text).strip()
    for prefix in ("/db ", "db "):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip()
    return "help" if line.lower() in ("/db", "db") else line


def register(app: AsyncApp, services: Services) -> list[str]:
    async def direct_message(
        body: dict[str, Any], event: dict[str, Any], request: AsyncBoltRequest
    ) -> None:
        # Bolt acks events itself. Only a person's new message in a DM is a command.
        if event.get("channel_type") != "im" or event.get("subtype") or event.get("bot_id"):
            return
        user, channel = str(event.get("user", "")), event.get("channel")
        text = command_line(str(event.get("text", "")))
        if not user or not isinstance(channel, str) or not text:
            return
        # Slack retries an event it thinks was not received, with the same event_id.
        event_id = body.get("event_id")
        key = f"dm:{event_id}" if isinstance(event_id, str) else delivery_key("dm", body, request)
        services.background.submit(
            Invocation(actor=user, surface="slack", text=text, channel=channel, delivery=key),
            # A DM is seen by its user alone: the reply is an ordinary message there.
            Destination(None, channel, None),
        )

    app.event("message")(direct_message)
    return list(BOT_EVENTS)
