"""`/db checklist <name>`, `/db jobs`, and the checklist checkboxes (who ticked what, when).

Registered on the router on import (bot/surfaces.py imports this module).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from bot import blocks
from bot.blocks import Reply, escape
from bot.outbox import outbox_notifier
from bot.roles import Role
from bot.router import REGISTRY, Arg, Call, Spec
from bot.scheduler import (
    CHECKLIST_ACTION,
    ChecklistBlock,
    checklist_message,
    jobs_table,
    parse_checklist_block,
)
from core import checklists as cl
from core.errors import DbopsError
from core.jobs import job_specs
from core.settings import Settings, load_settings

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncAck, AsyncApp

    from bot.app import Services

log = logging.getLogger("dbops.checklists")


@lru_cache(maxsize=1)
def _settings() -> Settings:
    return load_settings()


def _checklist(call: Call) -> Reply:
    name = call.arg("name")
    checklist = cl.get_checklist(name)
    ops = call.ops
    state = cl.start_run(ops.engine, ops.events, checklist, actor=call.actor, now=datetime.now(UTC))
    message = checklist_message(state, call.tz)
    settings = _settings()
    if settings.slack_bot_token is not None:
        ref = outbox_notifier(settings, ops.events).post(settings.ops_channel, message)
        cl.attach_message(ops.engine, state.id, ref.channel, ref.ts)
        return Reply(
            text=f"Posted “{checklist.title}” in {settings.ops_channel}.",
            blocks=[
                blocks.section(
                    f"Posted *{escape(checklist.title)}* in {escape(settings.ops_channel)}."
                )
            ],
        )
    # No Slack (the shell): the checklist itself is the reply.
    items = "\n".join(f"☐ {escape(i.text)}" for i in state.items)
    return Reply(
        text=message.text,
        blocks=[
            blocks.header(checklist.title),
            *blocks.text_sections(items),
            blocks.context(f"run {state.id} · `/db checklist {escape(name)}`"),
        ],
    )


def _jobs(call: Call) -> Reply:
    rows = jobs_table(job_specs(call.tz, cl.load_checklists()), datetime.now(UTC), call.tz)
    lines = []
    for r in rows:
        when = (r["next_run_local"] or "never")[:16].replace("T", " ")
        lines.append(
            f"• `{escape(r['id'])}`: next {when} local "
            f"({(r['next_run_utc'] or '')[11:16]} UTC), {escape(r['description'])}"
        )
    return Reply(
        text=f"{len(rows)} scheduled jobs",
        blocks=[blocks.section("*Scheduled jobs*"), *blocks.text_sections("\n".join(lines))],
    )


def _names() -> str:
    return ", ".join(sorted(cl.load_checklists()))


REGISTRY.add(
    Spec(
        "checklist",
        f"post a routine checklist now ({_names()})",
        _checklist,
        (Arg("name", "word"),),
        role=Role.OPERATOR,
    )
)
REGISTRY.add(Spec("jobs", "the scheduled jobs and when each runs next", _jobs))


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
        settings = services.settings
        if settings.slack_bot_token is not None and state.channel and state.message_ts:
            from core.notify import MessageRef

            outbox_notifier(settings, router.events).update(
                MessageRef(state.channel, state.message_ts), checklist_message(state, router.tz)
            )
    except DbopsError as exc:  # a denial (already an event) or a checklist that changed
        log.info("checklist tick refused: %s", exc)
    except Exception:
        log.exception("could not record a checklist tick")
