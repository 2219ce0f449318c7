"""The forms' submits. Restore (bot/commands/restore.py opens them: ``FORM_ID`` restores a
backup, ``TO_FORM_ID`` restores to a moment): the typed name checked at once (a mismatch keeps
the modal open, with the error, and is an event), then the restore run after the ack like any
command, through the router: role check again, events. A maintenance window
(bot/commands/maintenance.py, ``maintenance.FORM_ID``): each field checked at once (an error
keeps the modal open under that field), then the window scheduled and announced the same way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bot.commands import maintenance
from bot.commands.restore import (
    BACKUP_ACTION,
    BACKUP_BLOCK,
    FORM_ID,
    NAME_ACTION,
    NAME_BLOCK,
    TO_FORM_ID,
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


def _typed(view: dict[str, Any]) -> str:
    return unescape(str(_state(view, NAME_BLOCK, NAME_ACTION).get("value") or "")).strip()


def _where(view: dict[str, Any]) -> tuple[str | None, str | None]:
    """(channel, response_url) the bot put in the form's metadata when it opened it."""
    meta = _metadata(view)
    channel, url = meta.get("channel"), meta.get("response_url")
    return (
        channel if isinstance(channel, str) else None,
        url if isinstance(url, str) else None,
    )


def register(app: AsyncApp, services: Services) -> list[str]:
    """The restore modals' submits (from a backup; to a moment): check the typed name now
    (Slack keeps the modal open with the error), then run the restore after the ack like any
    command. The maintenance modal's: check its fields, then schedule it the same way."""

    async def refused(ack: AsyncAck, user: str, customer: str, payload: dict[str, Any]) -> None:
        await ack(
            response_action="errors",
            errors={NAME_BLOCK: f"That is not {customer!r}; type the name exactly to restore."},
        )
        await asyncio.get_running_loop().run_in_executor(
            services.background.pool,
            lambda: services.router.events.append(
                "restore.refused", customer or None, payload, actor=user
            ),
        )

    async def run(
        ack: AsyncAck,
        body: dict[str, Any],
        view: dict[str, Any],
        line: str,
        form: str,
        progress: Callable[[str | None], dict[str, Any]],
    ) -> None:
        """Ack with ``progress(channel)`` (the modal while it runs), then ``line`` after the
        ack, through the router like any command (the role check again, the events)."""
        user = str((body.get("user") or {}).get("id", ""))
        channel, url = _where(view)
        await ack(response_action="update", view=progress(channel))
        services.background.submit(
            Invocation(
                actor=user,
                surface="slack",
                text=line,
                channel=channel,
                delivery=f"form:{view.get('id') or body.get('trigger_id')}",
                form=form,
            ),
            Destination(url, channel, user),
        )

    async def submitted(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = str((body.get("user") or {}).get("id", ""))
        customer = str(_metadata(view).get("customer") or "")
        option = _state(view, BACKUP_BLOCK, BACKUP_ACTION).get("selected_option") or {}
        backup = str(option.get("value") or "")
        typed = _typed(view)
        if not customer or typed != customer:
            payload = {"form": FORM_ID, "typed": shown(typed), "backup": backup[:40]}
            await refused(ack, user, customer, payload)
            return
        line = f"restore {customer} {backup} --confirm {typed}"
        await run(ack, body, view, line, FORM_ID, lambda ch: progress_view(customer, backup, ch))

    async def submitted_to(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        """A restore to a moment: the moment is the one the plan showed (UTC, in the metadata)."""
        user = str((body.get("user") or {}).get("id", ""))
        meta = _metadata(view)
        customer, to = str(meta.get("customer") or ""), str(meta.get("to") or "")
        typed = _typed(view)
        if not customer or len(to.split()) != 1 or typed != customer:
            payload = {"form": TO_FORM_ID, "typed": shown(typed), "target": shown(to, 40)}
            await refused(ack, user, customer, payload)
            return
        line = f"restore {customer} --to {to} --confirm {typed}"

        def progress(channel: str | None) -> dict[str, Any]:
            return progress_view(customer, "", channel, to=to)

        await run(ack, body, view, line, TO_FORM_ID, progress)

    async def submitted_maintenance(
        ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]
    ) -> None:
        """A maintenance window: every field checked now (the target is looked up, so off the
        event loop); errors keep the modal open, each under its field."""
        values = (view.get("state") or {}).get("values") or {}
        form = maintenance.FormInput.from_state(values if isinstance(values, dict) else {})
        rt = services.router.rt  # the runtime the commands run on
        line, errors = await asyncio.get_running_loop().run_in_executor(
            services.background.pool, lambda: maintenance.check_form(rt, form)
        )
        if line is None:
            await ack(response_action="errors", errors=errors)
            return
        ops_channel = rt.settings.ops_channel

        def progress(channel: str | None) -> dict[str, Any]:
            return maintenance.progress_view(form.target, channel, ops_channel)

        await run(ack, body, view, line, maintenance.FORM_ID, progress)

    app.view(FORM_ID)(submitted)
    app.view(TO_FORM_ID)(submitted_to)
    app.view(maintenance.FORM_ID)(submitted_maintenance)
    return [FORM_ID, TO_FORM_ID, maintenance.FORM_ID]
