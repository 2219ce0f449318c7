"""`/db checklist <name>` and `/db jobs`. A posted checklist's checkboxes (who ticked what,
when) are bot/slack/listeners/checklists.py.

``SPECS`` go on the router through bot/commands/catalog.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

from bot.attachments import with_files
from bot.commands.roles import Role
from bot.commands.router import Arg, Call, Spec
from bot.scheduler import checklist_message, post_attachments
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core import checklists as cl
from core.jobs import job_specs, jobs_table


def _checklist(call: Call) -> Reply:
    name = call.arg("name")
    checklist = cl.get_checklist(name)
    ops = call.ops
    state = cl.start_run(ops.engine, ops.events, checklist, actor=call.actor, now=datetime.now(UTC))
    message = checklist_message(state, call.tz)
    settings = call.rt.settings
    if settings.slack_bot_token is not None:
        ref = call.rt.notifier.post(settings.ops_channel, message)
        cl.attach_message(ops.engine, state.id, ref.channel, ref.ts)
        sent = post_attachments(call.rt, checklist, ref, call.rt.clock())
        with_chart = f", with {sent} chart{'' if sent == 1 else 's'} in its thread" if sent else ""
        return Reply(
            text=f"Posted “{checklist.title}” in {settings.ops_channel}{with_chart}.",
            blocks=[
                blocks.section(
                    f"Posted *{escape(checklist.title)}* in {escape(settings.ops_channel)}"
                    f"{with_chart}."
                )
            ],
        )
    # No Slack (the shell): the checklist itself is the reply, its files saved by the shell.
    items = "\n".join(f"☐ {escape(i.text)}" for i in state.items)
    reply = Reply(
        text=message.text,
        blocks=[
            blocks.header(checklist.title),
            *blocks.text_sections(items),
            blocks.context(f"run {state.id} · `/db checklist {escape(name)}`"),
        ],
    )
    if not checklist.attach:
        return reply
    return with_files(reply, ops.checklist_attachments(checklist, call.rt.clock()))


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


SPECS: list[Spec] = [
    Spec(
        "checklist",
        f"post a routine checklist now ({_names()})",
        _checklist,
        (Arg("name", "word"),),
        role=Role.OPERATOR,
    ),
    Spec("jobs", "the scheduled jobs and when each runs next", _jobs),
]
