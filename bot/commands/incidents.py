"""`/db incident open|list|ack|resolve|restart` and `/db oncall [set primary|secondary @user]`.

The incident desk (core.incidents.Incidents with its pager) is the runtime's, ``call.rt.desk``
(bot/runtime.py), shared with the alert webhook and the scheduler. With SLACK_BOT_TOKEN set it
posts the card to OPS_CHANNEL, the diagnostics and results in the card's thread, and updates the
card in place; without it (the shell) those posts go nowhere and the command's own reply carries
the card.

``SPECS`` go on the router through bot/commands/catalog.py (with ``KINDS``: a severity and a
Slack user).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from slack_sdk.models.blocks import ButtonElement

from bot.commands.cards import (
    acked_note,
    card_reply,
    credit_buttons,
    diagnostics_reply,
    list_reply,
    oncall_reply,
    refused_reply,
    resolution_reply,
    restart_reply,
)
from bot.commands.roles import Role
from bot.commands.router import Arg, Call, Kind, Registry, Rt, Spec
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core import oncall
from core.errors import DbopsError
from core.health import ServerHealth
from core.health.diagnostics import diagnose
from core.incident_report import duration, incident_report, timeline_lines
from core.incident_report import render_text as render_incident_report
from core.incidents import Incident, parse_incident_id, parse_severity
from core.notify import MessageRef
from core.report import health_view
from core.restarts import Decision, Refused, decide, seen_from_health

if TYPE_CHECKING:
    from bot.desk import Desk

log = logging.getLogger("dbops.incidents.slack")

HEALTH_DEADLINE_S = 3.0  # the card's state and the diagnostics: a quick look, not a sweep


# --- argument kinds --------------------------------------------------------------------------


def _severity(value: str) -> str:
    return str(parse_severity(value))


KINDS: Mapping[str, Kind] = {"severity": _severity, "slack_user": oncall.parse_user}


# --- health, the card and the diagnostics ----------------------------------------------------


def _restart_view(inc: Incident, health: ServerHealth) -> Decision:
    """The card's Restart as core.restarts decides it for the incident's customers."""
    return decide(seen_from_health(health), inc.customers)


def _buttons(
    card: dict[str, Any], registry: Registry, restore: Mapping[str, Any] | None = None
) -> list[ButtonElement]:
    out = []
    for b in card["buttons"]:
        if b["action"] == "ack" and b["enabled"]:
            out.append(registry.button(f"incident ack {card['id']}"))
        elif b["action"] == "restart":  # a failed precondition is explained when pressed
            out.append(registry.button(f"incident restart {card['id']}"))
        elif b["action"] == "restore" and b["enabled"] and restore and registry.get("restore"):
            # Opens the restore form with this backup chosen; the admin types the name there.
            line = f"restore {card['customers'][0]} {restore['name']}"
            out.append(registry.button(line, label=b["label"]))
    return out


def restore_hint(rt: Rt, inc: Incident) -> dict[str, Any] | None:
    """For the card's Restore button: the newest restore-tested backup of a one-customer
    incident ({"name", "age_s"}), or why there is none ({"reason"}). None: no button (several
    customers, or the incident is over)."""
    if len(inc.customers) != 1 or not inc.active:
        return None
    try:
        newest = rt.backups.newest_verified(inc.customers[0])
    except DbopsError as exc:
        return {"reason": f"could not read the backups: {exc.message[:100]}"}
    if newest is None:
        return {"reason": "no restore-tested backup yet"}
    return {"name": newest.stamp, "age_s": newest.age_s(datetime.now(UTC))}


def _card(
    desk: Desk,
    registry: Registry,
    inc: Incident,
    health: dict[str, Any] | None,
    *,
    restore: Mapping[str, Any] | None = None,
    note: str = "",
    restart: Decision | None = None,
) -> Reply:
    restore = restore if registry.get("restore") is not None else None
    card = desk.incidents.card(inc.id, restore=restore, restart=restart)
    return card_reply(card, _buttons(card, registry, restore), note=note)


def refresh_card(desk: Desk, call: Call, inc_id: int, *, note: str = "") -> Reply:
    """Re-render the card from the incident and a fresh look at its server; update it in place."""
    inc = desk.incidents.get(inc_id)
    health, restart = None, None
    if inc.server is not None and inc.active:
        try:
            seen = call.ops.server_health(inc.server, deadline_s=HEALTH_DEADLINE_S)
            health, restart = health_view(seen, inc.customers), _restart_view(inc, seen)
        except DbopsError:
            health = None
    hint = restore_hint(call.rt, inc)
    reply = _card(desk, call.router.registry, inc, health, restore=hint, note=note, restart=restart)
    if inc.card_ref is not None:
        desk.update(inc.card_ref, reply)
    return reply


# --- handlers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Announced:
    card: Reply
    diagnostics: Reply | None
    ref: MessageRef | None  # where the card landed; None when it could not be posted


def announce(rt: Rt, incident_id: int, *, registry: Registry | None = None) -> Announced:
    """Post the incident's card in OPS_CHANNEL and the diagnostics in its thread, and record
    where the card is so later changes update it. `/db incident open` calls this; so may
    whatever else opens incidents (the alert webhook, the health sweep). ``registry``: the
    one the buttons come from (the command's router's; by default the runtime's)."""
    desk, ops, tz = rt.desk, rt.ops, rt.tz
    registry = registry or rt.registry
    inc = desk.incidents.get(incident_id)
    health: ServerHealth | None = None
    if inc.server is not None:
        try:
            health = ops.server_health(inc.server, deadline_s=HEALTH_DEADLINE_S)
        except DbopsError as exc:
            log.warning("no health for %s at open: %s", inc.ref, exc.message)
    view = health_view(health, inc.customers) if health is not None else None
    restart = _restart_view(inc, health) if health is not None else None
    card = _card(desk, registry, inc, view, restore=restore_hint(rt, inc), restart=restart)
    diag = (
        diagnostics_reply(inc.ref, diagnose(ops.fleet, inc.server, health, HEALTH_DEADLINE_S), tz)
        if health is not None and inc.server is not None
        else None
    )
    ref = desk.post(card)
    if ref is not None:
        desk.incidents.set_card(inc.id, ref)
        if diag is not None:
            desk.post(diag, thread=ref)
    return Announced(card, diag, ref)


def _open(call: Call) -> Reply:
    desk = call.rt.desk
    inc = desk.incidents.open_for(
        call.arg("target"), call.arg("severity"), call.arg("summary"), actor=call.actor
    )
    said = announce(call.rt, inc.id, registry=call.router.registry)
    if desk.slack:
        where = (
            f"Card posted in {escape(desk.channel)}." if said.ref else "Could not post the card."
        )
        return Reply(
            text=f"Opened {inc.ref} ({inc.severity}): {inc.title}",
            blocks=[
                blocks.section(f":rotating_light: Opened *{inc.ref}* ({inc.severity}). {where}")
            ],
        )
    # No Slack (the shell): the card and the diagnostics are the reply.
    diag = said.diagnostics.blocks if said.diagnostics else ()
    return Reply(text=said.card.text, blocks=[*said.card.blocks, *diag])


def _list(call: Call) -> Reply:
    desk = call.rt.desk
    found = desk.incidents.list_incidents(active=True, limit=40)
    registry = call.router.registry
    buttons = [  # one Ack per open incident, each saying which (its value: the command)
        registry.button(f"incident ack {i.id}", label=f"Ack {i.ref}")
        for i in found
        if i.status == "open"
    ][:5]
    return list_reply(found, datetime.now(UTC), buttons)


def _incident_id(call: Call) -> int:
    return parse_incident_id(call.arg("incident"))


def _ack(call: Call) -> Reply:
    desk = call.rt.desk
    inc = desk.incidents.ack(_incident_id(call), actor=call.actor)
    refresh_card(desk, call, inc.id)
    if inc.card_ref is not None:
        desk.post(acked_note(call.actor), thread=inc.card_ref)
    return Reply(
        text=f"You acknowledged {inc.ref}; paging has stopped.",
        blocks=[blocks.section(f":eyes: You acknowledged *{inc.ref}*; paging has stopped.")],
    )


def _restart(call: Call) -> Reply:
    desk = call.rt.desk
    inc = desk.incidents.get(_incident_id(call))
    if inc.server is None or not inc.active:
        why = "it names no server" if inc.server is None else "it is resolved"
        return refused_reply(inc.ref, "Restart", why)
    try:  # core.restarts decides, as for `/db restart`; one restart per server runs at a time
        result = call.rt.restarts.restart_incident(inc.id, call.actor).result
    except Refused as no:
        hint = f" {no.hint}" if no.hint else ""
        return refused_reply(inc.ref, "Restart", f"{no.message.rstrip('.')}.{hint}")
    said = restart_reply(inc.ref, result, call.actor)
    fresh = desk.incidents.get(inc.id)
    if fresh.card_ref is not None:
        desk.post(said, thread=fresh.card_ref)
    refresh_card(desk, call, inc.id, note=str(result.get("message") or ""))
    return said


def _restart_look(call: Call) -> str:
    """Typed `/db incident restart N`: the look before its confirmation, by the same policy
    as the press (a refusal answers at once)."""
    inc, target, reason = call.rt.restarts.check_incident(_incident_id(call), call.actor)
    return f"{inc.ref}: {reason}. Restarting {target.server}'s PostgreSQL restarts {target.scope}"


def _resolve(call: Call) -> Reply:
    desk = call.rt.desk
    res = desk.incidents.resolve(_incident_id(call), call.arg("cause"), actor=call.actor)
    said = resolution_reply(res, call.actor, credit_buttons(res, call.router.registry))
    if res.incident.card_ref is not None:
        desk.post(said, thread=res.incident.card_ref)
        refresh_card(desk, call, res.incident.id)
    return said


def _oncall(call: Call) -> Reply:
    now = oncall.current(call.ops.engine, call.ops.fleet, tz=call.tz)
    return oncall_reply(now, call.tz)


def _oncall_set(call: Call) -> Reply:
    ops = call.ops
    oncall.set_oncall(
        ops.engine,
        ops.events,
        ops.fleet,
        call.arg("role"),
        call.arg("user"),
        actor=call.actor,
        tz=call.tz,
    )
    now = oncall.current(ops.engine, ops.fleet, tz=call.tz)
    reply = oncall_reply(now, call.tz)
    head = blocks.section(f"<@{call.arg('user')}> is now {escape(call.arg('role'))} on call.")
    return Reply(text=reply.text, blocks=[head, *reply.blocks])


def _email(call: Call) -> Reply:
    """SOP-201's customer email, rendered for a check before anyone presses Send."""
    desk = call.rt.desk
    inc = desk.incidents.get(_incident_id(call))
    which = call.arg("which")
    emails = desk.incidents.email_preview(inc.id, which)
    if not emails:
        raise DbopsError(f"none of {inc.ref}'s customers has an email address on record.")
    body = "\n".join(f"```{escape(e.preview())}```" for e in emails)
    send = call.router.registry.button(f"incident email-send {inc.id} {which}")
    return Reply(
        text=f"Preview: the {which} email for {inc.ref} ({len(emails)} recipient(s))",
        blocks=[
            blocks.section(f"*The {escape(which)} email for {inc.ref}*: check it, then Send."),
            *blocks.text_sections(body),
            blocks.actions([send]),
        ],
    )


def _email_send(call: Call) -> Reply:
    desk = call.rt.desk
    inc = desk.incidents.get(_incident_id(call))
    smtp_url = call.rt.smtp_url
    if not smtp_url:
        raise DbopsError(
            "SMTP_URL is not set, so no email can be sent.",
            hint="Set it (smtp://user:pass@host:587) and restart `dbops serve`.",
        )
    sent = desk.incidents.email_send(inc.id, call.arg("which"), smtp_url, actor=call.actor)
    to = ", ".join(escape(addr) for e in sent for addr in e.get("to", []))
    return Reply(
        text=f"Sent the {call.arg('which')} email for {inc.ref} to {len(sent)} customer(s).",
        blocks=[
            blocks.section(
                f":email: Sent the {escape(call.arg('which'))} email for "
                f"*{inc.ref}* to {to or 'the customers'}."
            )
        ],
    )


def _report(call: Call) -> Reply:
    report = incident_report(call.ops.events, f"inc-{_incident_id(call)}")
    text = render_incident_report(report, call.tz)
    credits = ", ".join(
        f"{c['customer']} {c['amount_cents'] / 100:.2f} {str(c['currency']).upper()} "
        f"(`{c['stripe_txn']}`)"
        for c in report.credits
        if isinstance(c["amount_cents"], int)
    )
    timeline = "\n".join(timeline_lines(report, call.tz))
    return Reply(
        text=text,
        blocks=[
            blocks.header(f"{report.ref}: {report.title or 'incident report'}"),
            blocks.fields(
                [
                    ("Time to ack", duration(report.time_to_ack_s)),
                    ("Time to resolve", duration(report.time_to_resolve_s)),
                    ("Customers affected", escape(", ".join(report.customers)) or "none"),
                    (
                        "Restarts / restores",
                        f"{report.count('restarted')} / {report.count('restored')}",
                    ),
                    ("Emails sent", str(len(report.emails))),
                    ("SLA credits", escape(credits) or "none"),
                ]
            ),
            blocks.section(f"```{escape(timeline)}```"),
            blocks.context("From the event log alone: `dbops events export --incident` for audit."),
        ],
    )


INCIDENT = Arg("incident", "subject", metavar="id")
EMAIL = Arg("which", "word", metavar="investigating|update|resolved")
SPECS: list[Spec] = [
    Spec(
        "incident open",
        "open an incident: card in the ops channel, diagnostics in its thread, page on-call",
        _open,
        (
            Arg("target", "server", metavar="customer|server"),
            Arg("severity", "severity", metavar="P0-P3"),
            Arg("summary", "text", rest=True),
        ),
        role=Role.OPERATOR,
    ),
    Spec("incident list", "the open incidents, most severe first", _list),
    Spec(
        "incident ack",
        "acknowledge an incident: paging stops, you own it",
        _ack,
        (INCIDENT,),
        role=Role.OPERATOR,
        button="Ack",
    ),
    Spec(
        "incident restart",
        "restart the incident's PostgreSQL (when it does not answer), then re-check",
        _restart,
        (INCIDENT,),
        role=Role.OPERATOR,
        button="Restart",
        destructive=True,
        preflight=_restart_look,
    ),
    Spec(
        "incident resolve",
        "resolve with the root cause; downtime and SLA credits go in the thread",
        _resolve,
        (INCIDENT, Arg("cause", "text", rest=True)),
        role=Role.OPERATOR,
    ),
    Spec(
        "incident email",
        "preview SOP-201's customer email (investigating, update, resolved) with a Send button",
        _email,
        (INCIDENT, EMAIL),
        role=Role.OPERATOR,
    ),
    Spec(
        "incident email-send",
        "send the customer email shown by `incident email`",
        _email_send,
        (INCIDENT, EMAIL),
        role=Role.OPERATOR,
        button="Send",
        destructive=True,
    ),
    Spec(
        "incident report",
        "the incident from the event log: timeline, time to ack and resolve, emails, credits",
        _report,
        (INCIDENT,),
    ),
    Spec("oncall", "who is primary and secondary on call now", _oncall),
    Spec(
        "oncall set",
        "put someone on call until changed",
        _oncall_set,
        (
            Arg("role", "word", metavar="primary|secondary"),
            Arg("user", "slack_user", metavar="@user"),
        ),
        role=Role.ADMIN,
    ),
]
