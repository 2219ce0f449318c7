"""The restore form's submit (bot/commands/restore.py opens the form): the typed name checked at
once (a mismatch keeps the modal open, with the error, and is an event), then the restore run
after the ack like any command, through the router: role check again, events."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from bot.commands.restore import (
    BACKUP_ACTION,
    BACKUP_BLOCK,
    FORM_ID,
    NAME_ACTION,
    NAME_BLOCK,
    progress_view,
)
from bot.commands.router import Invocation, shown
from bot.slack.listeners.delivery import Destination
from bot.views.blocks import unescape

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncAck, AsyncApp

    from bot.slack.background import Services


def _metadata(view: dict[str, Any]) -> dict[str, Any]:
    try:
        data = json.loads(view.get("private_metadata") or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _state(view: dict[str, Any], block: str, action: str) -> dict[str, Any]:
    values = ((view.get("state") or {}).get("values") or {}).get(block) or {}
    found = values.get(action)
    return found if isinstance(found, dict) else {}


def register(app: AsyncApp, services: Services) -> list[str]:
    """The restore modal's submit: check the typed name now (Slack keeps the modal open with
    the error), then run the restore after the ack like any command."""

    async def submitted(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = str((body.get("user") or {}).get("id", ""))
        meta = _metadata(view)
        customer = str(meta.get("customer") or "")
        option = _state(view, BACKUP_BLOCK, BACKUP_ACTION).get("selected_option") or {}
        backup = str(option.get("value") or "")
        typed = unescape(str(_state(view, NAME_BLOCK, NAME_ACTION).get("value") or "")).strip()
        if not customer or typed != customer:
            await ack(
                response_action="errors",
                errors={NAME_BLOCK: f"That is not {customer!r}; type the name exactly to restore."},
            )
            payload = {"form": FORM_ID, "typed": shown(typed), "backup": backup[:40]}
            await asyncio.get_running_loop().run_in_executor(
                services.background.pool,
                lambda: services.router.events.append(
                    "restore.refused", customer or None, payload, actor=user
                ),
            )
            return
        channel = meta.get("channel") if isinstance(meta.get("channel"), str) else None
        await ack(response_action="update", view=progress_view(customer, backup, channel))
        url = meta.get("response_url") if isinstance(meta.get("response_url"), str) else None
        services.background.submit(
            Invocation(
                actor=user,
                surface="slack",
                text=f"restore {customer} {backup} --confirm {typed}",
                channel=channel,
                delivery=f"form:{view.get('id') or body.get('trigger_id')}",
                form=FORM_ID,
            ),
            Destination(url, channel, user),
        )

    app.view(FORM_ID)(submitted)
    return [FORM_ID]
