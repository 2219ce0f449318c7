"""The Slack error handler: a listener that itself fails answers through ``reply_for``
(bot.commands.errors), like the background work after an ack and the shell."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.commands.errors import reply_for

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.slack.background import Services


def register(app: AsyncApp, services: Services) -> None:
    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        # Reached only when a listener itself fails (they ack and hand off, so rarely).
        reply = reply_for(error, where="listener")
        url = body.get("response_url") if isinstance(body, dict) else None
        if url:
            await services.replier.respond(url, reply)
