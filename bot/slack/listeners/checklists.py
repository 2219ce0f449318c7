"""A posted checklist's checkboxes: a click applies only the item it ticks or unticks, under the
operator role, and the message is updated for everyone (`/db checklist` and the scheduler post
the checklist: bot/commands/checklists.py, bot/scheduler.py)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bot.commands.roles import Role
from bot.scheduler import CHECKLIST_ACTION, ChecklistBlock, checklist_message, parse_checklist_block
from core import checklists as cl
from core.errors import DbopsError

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncAck, AsyncApp

    from bot.slack.background import Services

log = logging.getLogger("dbops.checklists")


def register(app: AsyncApp, services: Services) -> list[str]:
    """The checkboxes of a posted checklist: a click applies only the item it ticks or unticks."""

    async def ticked(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user = str((body.get("user") or {}).get("id", ""))
        block_id = str(action.get("block_id", ""))
        selected = {
            int(o["value"])
            for o in action.get("selected_options") or []
            if str(o.get("value", "")).isdigit()
        }
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            services.background.pool, _record, services, user, block_id, selected
        )

    app.action(CHECKLIST_ACTION)(ticked)
    return [CHECKLIST_ACTION]


def click_changes(
    block: ChecklistBlock, selected: set[int], before: dict[int, bool]
) -> dict[int, bool]:
    """The change a click carries: Slack sends the element's whole client state, so compare it
    with what that person's client showed before (``before``: item -> ticked), item by item of
    that element only. Another person's ticks, made since, are never overwritten."""
    items = block.items if block.items is not None else range(len(before))
    return {i: i in selected for i in items if i in before and (i in selected) != before[i]}


def _record(services: Services, user: str, block_id: str, selected: set[int]) -> None:
    router = services.router
    try:
        block = parse_checklist_block(block_id)
        if block is None:
            raise ValueError(f"not a checklist block: {block_id[:40]!r}")
        router.roles.require(
            user,
            Role.OPERATOR,
            "tick a checklist",
            events=router.events,
            surface="slack",
            subject=f"checklist-{block.run_id}",
        )
        ops = router.ops
        current = cl.run_state(ops.engine, block.run_id)
        if block.items is None or block.shown is None:
            # A rendering from before elements were split: all items, what it showed unknown.
            before = {i.index: i.done for i in current.items}
        else:  # what the rendering showed, then this person's own clicks on it since
            shown, items = block.shown, block.items
            before = {i.index: i.index in shown for i in current.items if i.index in items}
            before.update(cl.changes_by(router.events, block.run_id, user=user, via=block.via))
        changes = click_changes(block, selected, before)
        state = cl.apply(
            ops.engine,
            router.events,
            block.run_id,
            changes,
            user=user,
            now=datetime.now(UTC),
            via=block.via,
        )
        if router.rt.settings.slack_bot_token is not None and state.channel and state.message_ts:
            from core.notify import MessageRef

            router.rt.notifier.update(
                MessageRef(state.channel, state.message_ts), checklist_message(state, router.tz)
            )
    except DbopsError as exc:  # a denial (already an event) or a checklist that changed
        log.info("checklist tick refused: %s", exc)
    except Exception:
        log.exception("could not record a checklist tick")
