"""Incidents as Slack messages: the card in OPS_CHANNEL, the diagnostics, restart and resolve
notes in its thread, the incident list and who is on call. Pure: core's data in, Block Kit out.

Everything a user or a server wrote (titles, causes, queries, log lines) goes through
``escape`` so it can never ping or link; the card's buttons carry command lines, so a press is
parsed and role-checked like typing it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from slack_sdk.models.blocks import Block, ButtonElement

from bot.commands.router import Registry
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core.incidents import Incident, Resolution
from core.notify import Message, inert
from core.oncall import OnCallNow
from core.settings import SLACK_USER_ID
from core.units import pretty_age

SEVERITY_ICON = {"P0": ":red_circle:", "P1": ":large_orange_circle:"}
TARGET = {"P0": "respond now", "P1": "respond within 1 h", "P2": "within 4 h", "P3": "within 24 h"}
STATUS_ICON = {
    "open": ":rotating_light:",
    "acknowledged": ":eyes:",
    "mitigated": ":adhesive_bandage:",
    "resolved": ":white_check_mark:",
}


def as_message(reply: Reply) -> Message:
    """A Reply as core's Message, for a Notifier (chat.postMessage / chat.update)."""
    message = reply.message()
    return Message(text=message["text"], blocks=message["blocks"])


def mention(user: str | None) -> str:
    """A Slack user as a mention; anything else (an alert source) as text."""
    return f"<@{user}>" if user and re.fullmatch(SLACK_USER_ID, user) else escape(user or "-")


def _scope(card: Mapping[str, Any]) -> str:
    customers = list(card.get("customers") or [])
    shown = ", ".join(escape(c) for c in customers[:8])
    if len(customers) > 8:
        shown += f" +{len(customers) - 8}"
    server = escape(card["server"]) if card.get("server") else ""
    if server and shown:
        return f"{server}: {shown}"
    return server or shown or "-"


def card_reply(
    card: Mapping[str, Any], buttons: Sequence[ButtonElement], *, note: str = ""
) -> Reply:
    """The incident card: what, who, since when, severity, and the buttons that fit the state.

    ``card`` is core.incidents.Incidents.card(); ``buttons`` the Slack buttons for its enabled
    (and explained-disabled) actions, in order. A disabled action is listed with its reason.
    """
    sev, status = str(card["severity"]), str(card["status"])
    # Plain text renders no mentions, but a "<!channel>" in a header still reads like one.
    title = inert(f"{sev} {card['ref']}: {card['title']}")
    state = f"{STATUS_ICON.get(status, '')} *{escape(status)}*"
    if card.get("owner"):
        state += f" by {mention(card['owner'])}"
    if card.get("overdue"):
        state += " · :alarm_clock: no ack within the response target"
    fields = [
        ("What", escape(card["title"])),
        ("Who", _scope(card)),
        ("Since", f"{escape(card['since_local'])} ({escape(card['age'])} ago)"),
        ("Severity", f"{SEVERITY_ICON.get(sev, '')} {sev}, {TARGET.get(sev, '')}".strip()),
        ("Status", state),
        ("Opened by", mention(card.get("opened_by"))),
    ]
    out: list[Block] = [blocks.header(title), blocks.fields(fields)]
    if status == "resolved" and card.get("cause"):
        out.append(blocks.section(f"*Cause:* {escape(card['cause'])}"))
    why = [
        f"*{escape(b['label'])}*: {escape(b['reason'])}"
        for b in card.get("buttons") or []
        if not b.get("enabled") and b.get("reason") and b["action"] != "ack"
    ]
    if why:
        out.append(blocks.context("Not now: " + "; ".join(why)))
    hint = f"`/db incident resolve {card['id']} <cause>` · `/db log {card['ref']}`"
    out.append(blocks.context(note + " · " + hint if note else hint))
    if buttons:
        out.append(blocks.actions(buttons, block_id=f"incident-{card['id']}"))
    text = f"{sev} {card['ref']} {card['title']} [{_scope(card)}] {status}"
    return Reply(text=text, blocks=out, ephemeral=False)


def diagnostics_reply(ref: str, diag: Mapping[str, Any], tz: ZoneInfo) -> Reply:
    """What the server looked like at open: PostgreSQL, activity, locks, log errors, disk."""
    lines = [f"*Diagnostics for {escape(ref)}* on `{escape(diag['server'])}`"]
    pg = diag.get("postgres") or "unknown"
    conn = diag.get("connection") or ""
    lines.append(f"• PostgreSQL: *{escape(pg)}*" + (f", {escape(conn)}" if conn else ""))
    activity = diag.get("activity")
    if activity is None:
        lines.append("• pg_stat_activity: not read (no connection)")
    elif not activity:
        lines.append("• pg_stat_activity: no client sessions busy")
    else:
        lines.append("• Top of pg_stat_activity (longest transactions first):")
        for a in activity:
            query = " ".join(str(a.get("query") or "").split())[:90]
            lines.append(
                f"    `{a['pid']}` {escape(a.get('datname') or '-')} "
                f"{escape(a.get('usename') or '-')} {escape(a.get('state') or '-')} "
                f"{pretty_age(int(a.get('xact_s') or a.get('state_s') or 0))}: "
                f"`{escape(query) or '-'}`"
            )
    locks = diag.get("locks")
    if locks:
        lines.append(f"• Locks: {escape(locks)}")
    lines.append(f"• Log errors (last hour): {escape(diag.get('log') or 'not read')}")
    lines.append(f"• Disk: {escape(diag.get('disk') or 'not read')}")
    taken = diag.get("taken_at")
    if isinstance(taken, datetime):
        lines.append(f"_taken {taken.astimezone(tz).strftime('%H:%M:%S %Z')}_")
    text = f"Diagnostics for {ref} on {diag['server']}: PostgreSQL {pg}"
    return Reply(text=text, blocks=blocks.text_sections("\n".join(lines)), ephemeral=False)


def restart_reply(ref: str, result: Mapping[str, Any], actor: str) -> Reply:
    ok = bool(result.get("answering"))
    icon = ":white_check_mark:" if ok else ":warning:"
    body = (
        f"{icon} {mention(actor)} restarted PostgreSQL on `{escape(result.get('server'))}` "
        f"for {escape(ref)}: {escape(result.get('message') or '')}"
    )
    detail = f"`{escape(result.get('command') or '')}` exit {result.get('exit_code')}"
    if result.get("duration_ms") is not None:
        detail += f", {int(result['duration_ms']) / 1000:.1f}s"
    return Reply(
        text=f"Restart for {ref}: {result.get('message') or ''}",
        blocks=[blocks.section(body), blocks.context(detail)],
        ephemeral=False,
    )


def acked_note(actor: str) -> Reply:
    return Reply(
        text=f"Acknowledged by {actor}; paging stopped.",
        blocks=[blocks.section(f":eyes: Acknowledged by {mention(actor)}; paging stopped.")],
        ephemeral=False,
    )


def refused_reply(ref: str, action: str, reason: str) -> Reply:
    """A button whose precondition fails says why instead of acting."""
    return Reply(
        text=f"{action} not run for {ref}: {reason}",
        blocks=[
            blocks.section(
                f":no_entry_sign: *{escape(action)}* not run for {escape(ref)}: {escape(reason)}"
            )
        ],
    )


def credit_buttons(res: Resolution, registry: Registry) -> list[ButtonElement]:
    """An Apply button (admins, behind a confirm dialog) for each proposed credit with an amount,
    when the router has `credit apply`. The button names the incident and the customer only: the
    amount is the one core recorded at resolve time, so a button cannot carry another."""
    if registry.get("credit apply") is None:
        return []
    out = []
    for c in res.credits:
        if c.credit_cents is None:
            continue
        # Parsed and built by the registry (a bad name never makes a button); labelled here.
        made = registry.button(f"credit apply {res.incident.id} {c.customer}")
        amount = f"${c.credit_cents / 100:.2f}"
        out.append(
            blocks.danger_button(
                f"Apply {amount} to {c.customer}",
                str(made.action_id),
                str(made.value),
                title="Apply the SLA credit?",
                question=f"Credit *{escape(c.customer)}* {amount} in Stripe for "
                f"{escape(res.incident.ref)}? It comes off their next invoice.",
                confirm="Apply",
            )
        )
    return out


def resolution_reply(res: Resolution, actor: str, buttons: Sequence[ButtonElement]) -> Reply:
    """The resolve note: cause, downtime, proposed SLA credits with their Apply buttons
    (``buttons``: ``credit_buttons`` on the router's registry)."""
    inc = res.incident
    lines = [
        f":white_check_mark: {mention(actor)} resolved *{escape(inc.ref)}* "
        f"after {pretty_age(_age(inc))}. Cause: {escape(inc.cause or '')}"
    ]
    if res.children:
        lines.append("Resolved with it: " + ", ".join(f"inc-{c}" for c in res.children))
    if res.downtime_s:
        lines.append("*Downtime*")
        for name, secs in sorted(res.downtime_s.items()):
            lines.append(f"• {escape(name)}: {pretty_age(secs)}")
    if res.credits:
        how = (
            "an admin presses Apply to credit it in Stripe" if buttons else "apply them in billing"
        )
        lines.append(f"*Proposed SLA credits* (over 1 h down; {how})")
        for c in res.credits:
            amount = f"${c.credit_cents / 100:.2f}" if c.credit_cents is not None else "no amount"
            lines.append(f"• {escape(c.customer)}: *{amount}*, {escape(c.reason)}")
    elif res.downtime_s:
        lines.append("_No SLA credit: nobody was down over an hour._")
    text = f"{inc.ref} resolved: {inc.cause}"
    if res.credits:
        text += f"; {len(res.credits)} SLA credit(s) proposed"
    out: list[Block] = list(blocks.text_sections("\n".join(lines)))
    if buttons:  # one Apply per customer: rows of 25, each button its own action_id
        out += blocks.action_rows(buttons, block_id=f"credits-{inc.id}")
    return Reply(
        text=text,
        blocks=out,
        ephemeral=False,
        overflow=f"`/db log {inc.ref}` has every downtime and credit",
    )


def _age(inc: Incident) -> int:
    end = inc.resolved_at or inc.opened_at
    return int((end - inc.opened_at).total_seconds())


def list_reply(
    incidents: Sequence[Incident], now: datetime, buttons: Sequence[ButtonElement]
) -> Reply:
    if not incidents:
        return Reply(
            text="No open incidents.",
            blocks=[blocks.section(":large_green_circle: No open incidents.")],
        )
    lines = [f"*{len(incidents)} open incident{'' if len(incidents) == 1 else 's'}*"]
    for inc in incidents:
        where = ", ".join([*([inc.server] if inc.server else []), *inc.customers[:5]])
        owner = f", owner {mention(inc.owner)}" if inc.owner else ""
        age = pretty_age(int((now - inc.opened_at).total_seconds()))
        lines.append(
            f"{SEVERITY_ICON.get(inc.severity, '•')} *{inc.severity}* `{inc.ref}` "
            f"{escape(inc.title)} [{escape(where) or '-'}] {inc.status} for {age}{owner}"
        )
    out: list[Block] = list(blocks.text_sections("\n".join(lines)))
    unacked = sum(1 for inc in incidents if inc.status == "open")
    if unacked > len(buttons):
        out.append(blocks.context("Ack the others with `/db incident ack <id>`."))
    if buttons:  # an Ack per incident, each its own action_id (bot.views.blocks.numbered)
        out.append(blocks.actions(buttons, block_id="incident-list"))
    return Reply(
        text=f"{len(incidents)} open incidents",
        blocks=out,
        overflow="`/db log inc-<id>` shows one incident",
    )


def oncall_reply(now: OnCallNow, tz: ZoneInfo) -> Reply:
    def who(user: str | None, source: str) -> str:
        return f"{mention(user)} _({escape(source)})_" if user else ":warning: *nobody*"

    pairs = [
        ("Primary", who(now.primary, now.primary_from)),
        ("Secondary", who(now.secondary, now.secondary_from)),
        ("Escalation channel", escape(now.escalation_channel or "-")),
        (
            "Next handoff",
            now.next_handoff.astimezone(tz).strftime("%a %Y-%m-%d %H:%M %Z")
            if now.next_handoff
            else "no rotation",
        ),
    ]
    text = f"On call: primary {now.primary or 'nobody'}, secondary {now.secondary or 'nobody'}"
    out: list[Block] = [blocks.section("*On call now*"), blocks.fields(pairs)]
    if not now.primary:
        out.append(blocks.context(":warning: Nobody is on call: pages have nowhere to go."))
    return Reply(text=text, blocks=out)
