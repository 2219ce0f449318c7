"""Buttons: each carries a command line as its value and is run like typing it, role check
included (a confirm dialog is not an authorization).

A message with several buttons for one command (an Ack per incident, an Apply per credit)
numbers the repeats (db_incident_ack, db_incident_ack:2, ...; bot.views.blocks.numbered), since
Slack refuses a block where two share an action_id; each listener matches its action_id and its
repeats, and the value says which incident or customer was meant."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slack_bolt.async_app import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.commands.router import Invocation, action_pattern
from bot.slack.listeners.delivery import Destination, delivery_key, trigger_of

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.slack.background import Services


def register(app: AsyncApp, services: Services) -> list[str]:
    async def pressed(
        ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], request: AsyncBoltRequest
    ) -> None:
        await ack()
        user = str((body.get("user") or {}).get("id", ""))
        channel = (body.get("channel") or {}).get("id")
        services.background.submit(
            Invocation(
                actor=user,
                surface="slack",
                action_id=str(action.get("action_id", "")),
                value=str(action.get("value", "")),
                channel=channel,
                delivery=delivery_key("button", body, request),
                trigger=trigger_of(body),
            ),
            Destination(body.get("response_url"), channel, user),
        )

    action_ids = services.router.registry.action_ids()
    for action_id in action_ids:
        app.action(action_pattern(action_id))(pressed)
    return action_ids
