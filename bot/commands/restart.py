"""`/db restart <server|customer>` (operator): restart a server's PostgreSQL that does not answer.

Whether to restart is core.restarts' one policy, the same the incident card's Restart uses:
a cluster that answers is never restarted, even with the named customer's database down (the
refusal says why it is down and what to do instead).

parse -> core.restarts -> render. A customer stands for its server, and the reply says that
every customer on it restarted too. With an outage incident open on the server, the restart is
recorded on it, its result posted in the incident's thread and its card updated, as the card's
own Restart button does. Refusals (the cluster answers, a restart already running) are errors
the operator alone sees; a restart's result goes to the channel.

``SPECS`` go on the router through bot/commands/catalog.py.
"""

from __future__ import annotations

from typing import Any

from bot.commands.cards import mention, restart_reply
from bot.commands.incidents import refresh_card
from bot.commands.roles import Role
from bot.commands.router import Arg, Call, Spec
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core.restarts import Restarted
from storage.spool import RECORD_LATER


def _took(result: dict[str, Any]) -> str:
    ms = result.get("duration_ms")
    return f"{int(ms) / 1000:.1f}s" if ms is not None else "?"


def restarted_reply(done: Restarted, actor: str, *, in_thread: bool) -> Reply:
    """What happened: the command's result, the re-check after it and the time it took."""
    r, target = done.result, done.target
    server = escape(target.server)
    ok = bool(r.get("answering"))
    icon = ":white_check_mark:" if ok else ":warning:"
    lines = [f"{icon} {mention(actor)} restarted PostgreSQL on `{server}`: {escape(r['message'])}"]
    if target.customer is not None:
        lines.append(
            f"{escape(target.customer)} is on {server}; restarting {server}'s PostgreSQL "
            f"restarted every customer on it: {escape(target.scope)}."
        )
    lines.append(f"Why: {escape(done.reason)}.")
    if not done.recorded:
        lines.append(f":warning: Restarted; the event log is down: {RECORD_LATER}.")
    if done.incident is not None:
        where = "; the result is in its thread" if in_thread else ""
        lines.append(
            f"Recorded on *{escape(done.incident.ref)}* (now {escape(done.incident.status)})"
            f"{where}."
        )
    if not ok:
        lines.append(
            f"SOP-201 next: the PostgreSQL log and the disk (`/db log {server}` has what ran)"
            + (
                f"; open an incident: `/db incident open {server} P0 {escape('<summary>')}`."
                if done.incident is None
                else "."
            )
        )
    command = f"`{escape(r.get('command') or '')}` exit {r.get('exit_code')}"
    if r.get("error"):
        command += f" ({escape(r['error'])})"
    offline = r.get("offline") or []
    recheck = (
        f"re-check: PostgreSQL {escape(r.get('postgres'))}, "
        f"{r.get('databases_online')}/{r.get('databases_total')} databases online"
        + (f" (not: {escape(', '.join(offline))})" if offline else "")
    )
    text = (
        f"Restarted {target.server}'s PostgreSQL: {r['message']} "
        f"(exit {r.get('exit_code')}, {_took(r)})"
    ) + ("" if done.recorded else f"; {RECORD_LATER}")
    return Reply(
        text=text,
        blocks=[
            *blocks.text_sections("\n".join(lines)),
            blocks.context(command, recheck, f"took {_took(r)}"),
        ],
        ephemeral=False,
    )


def _preflight(call: Call) -> str:
    """Typed `/db restart X`: the look before its confirmation (refuses at once if healthy)."""
    target, reason = call.rt.restarts.check(call.arg("target"), call.actor)
    named = f"{target.customer} is on {target.server}; " if target.customer else ""
    return f"{named}{reason}. Restarting {target.server}'s PostgreSQL restarts {target.scope}"


def _restart(call: Call) -> Reply:
    desk = call.rt.desk
    # The incident card's Restart decides through the same policy (core.restarts).
    done = call.rt.restarts.restart(call.arg("target"), call.actor)
    inc = done.incident
    in_thread = False
    if inc is not None and inc.card_ref is not None:
        # As the card's Restart does: the result in the incident's thread, the card updated.
        ref = desk.post(restart_reply(inc.ref, done.result, call.actor), thread=inc.card_ref)
        in_thread = ref is not None and desk.slack
        refresh_card(desk, call, inc.id, note=str(done.result.get("message") or ""))
    return restarted_reply(done, call.actor, in_thread=in_thread)


SPEC = Spec(
    "restart",
    "restart a server's PostgreSQL when it does not answer (a customer: its server), then re-check",
    _restart,
    (Arg("target", "server", metavar="server|customer"),),
    role=Role.OPERATOR,
    button="Restart",
    destructive=True,
    public=True,
    preflight=_preflight,
)
SPECS: list[Spec] = [SPEC]
