"""`/db restore <customer> [backup]` (admin): a form asking for the backup and the customer's
name typed out, then the restore (core/backups.py: a new database, verified, swapped in).

    /db restore acme            -> Slack: a modal (newest restore-tested backup preselected, the
                                   others to pick from, the warnings, a box for the name);
                                   shell: the same facts and the line to type
    modal submitted             -> the name checked at once (a mismatch keeps the modal open),
                                   then `restore acme <backup> --confirm acme` runs in the
                                   background through the router: role check again, events
    /db restore acme B --confirm acme   (shell, or typed in Slack: the name typed is the guard)

A restore to a moment (point-in-time recovery, core/pitr.py), the same way:

    /db restore acme --to T     -> Slack: a modal with the plan (the target, the recovery
                                   window, the nearest base backup, the WAL to replay, the disk
                                   needed against free) and a box for the name; shell: the same
                                   lines and the line to type (T in UTC). A target outside the
                                   window or a disk too small: an error saying what can be
                                   restored instead; nothing is changed.
    modal submitted             -> `restore acme --to T --confirm acme`, as above
    /db restore acme --to T --confirm acme

T is ISO 8601 with an offset or ``Z``; without one it is read in TIMEZONE.

The result goes to the channel the command came from, saying what state was reached: restored
(and, with the event log down, that its record is written when the log is back), or rolled
back (the customer's database as before, untouched or swapped back), or not.

``SPECS`` go on the router through bot/commands/catalog.py (with ``KINDS``, the backup, the
moment and the typed name); the modals' submits are bot/slack/listeners/views.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from slack_sdk.models.blocks import (
    Block,
    InputBlock,
    MarkdownTextObject,
    Option,
    PlainTextInputElement,
    PlainTextObject,
    SectionBlock,
    StaticSelectElement,
)
from slack_sdk.models.views import View

from bot.commands.cards import mention
from bot.commands.roles import Role
from bot.commands.router import Arg, Call, Kind, Spec, UsageError
from bot.views import blocks
from bot.views.blocks import Reply, escape
from bot.views.render import local_time
from core.backups import BackupInfo, RestoreFailed, RestorePreview, RestoreResult, parse_stamp
from core.errors import DbopsError
from core.pitr import Refused, RestorePlan, is_time_of_day, parse_target
from core.units import pretty_age, pretty_bytes
from storage.spool import RECORD_LATER

log = logging.getLogger("dbops.restore")

FORM_ID = "db_restore"  # the modal's callback_id
BACKUP_BLOCK, BACKUP_ACTION = "backup", "backup"
NAME_BLOCK, NAME_ACTION = "confirm", "typed"
OPTIONS_MAX = 100  # Slack's limit for a static select
OPTION_TEXT_MAX = 75
TO_FORM_ID = "db_restore_to"  # the point-in-time modal's callback_id
TO_MAX = 64  # longer than any ISO 8601 moment


def _backup(value: str) -> str:
    if is_time_of_day(value):
        # `--to 2026-11-22 09:30`: the words split at the space, and the time of day landed
        # where a backup's name goes.
        raise DbopsError(
            f"{value[:20]!r} looks like the time of day of a `--to`.",
            hint="Write the moment as one word, e.g. `--to 2026-11-22T09:30` "
            "(or with its offset: `--to 2026-11-22T09:30-05:00`).",
        )
    stamp = value.upper()
    parse_stamp(stamp)
    return stamp


def _target_time(value: str) -> str:
    """``--to``: a moment in ISO 8601. Checked here to be one (the zone it is read in when it
    names none is the settings' TIMEZONE, which the handler has); kept as typed."""
    value = value.strip()
    if not value or len(value) > TO_MAX or not value.isprintable():
        raise DbopsError(
            "`--to` takes a moment in ISO 8601.", hint="E.g. `--to 2026-11-22T14:30:00Z`."
        )
    parse_target(value, "UTC")
    return value


def _typed(value: str) -> str:
    """The name typed to confirm: kept as typed (core compares it exactly), printable, short."""
    value = value.strip()
    if not value or len(value) > 100 or not value.isprintable():
        raise DbopsError("Type the customer's name exactly, as plain text, to confirm.")
    return value


KINDS: Mapping[str, Kind] = {"backup": _backup, "typed": _typed, "target_time": _target_time}


# --- what the admin sees before typing the name ------------------------------------------------


def _verdict(b: BackupInfo) -> str:
    if b.verification is None:
        return "not restore-tested"
    return "restore test ok" if b.verified else "restore test FAILED"


def _choice(b: BackupInfo, now: datetime) -> str:
    size = pretty_bytes(b.size_bytes) if b.size_bytes is not None else "size ?"
    return f"{b.stamp} · {pretty_age(b.age_s(now))} old · {size} · {_verdict(b)}"


def _facts(p: RestorePreview) -> str:
    b = p.backup
    size = pretty_bytes(b.size_bytes) if b.size_bytes is not None else "size unknown"
    lines = [
        f"*{escape(p.customer)}* (database `{escape(p.database)}` on *{escape(p.server)}*)",
        f"From backup `{escape(b.stamp)}`: {pretty_age(p.age_s)} old, {size}, {_verdict(b)}.",
        "The backup is restored into a new database and checked (row counts) first; then the "
        "customer's connections are ended and the names swapped. The current database is kept, "
        "renamed with the time, closed to connections.",
    ]
    lines += [f":warning: {escape(w)}" for w in p.warnings]
    return "\n".join(lines)


def restore_view(p: RestorePreview, now: datetime) -> dict[str, Any]:
    """The modal: the facts, the backup to restore (newest restore-tested preselected), and the
    customer's name to type. The bot adds where to answer to ``private_metadata`` when it opens."""
    options = [
        Option(value=b.stamp, text=PlainTextObject(text=_choice(b, now)[:OPTION_TEXT_MAX]))
        for b in p.choices[:OPTIONS_MAX]
    ]
    chosen = next((o for o in options if o.value == p.backup.stamp), None)
    if chosen is None:  # the preview's backup is always a choice; be safe if not
        chosen = Option(
            value=p.backup.stamp, text=PlainTextObject(text=_choice(p.backup, now)[:75])
        )
        options = [chosen, *options][:OPTIONS_MAX]
    view = View(
        type="modal",
        callback_id=FORM_ID,
        title=PlainTextObject(text="Restore a database"),
        submit=PlainTextObject(text="Restore"),
        close=PlainTextObject(text="Cancel"),
        private_metadata=json.dumps({"customer": p.customer}),
        blocks=[
            SectionBlock(text=MarkdownTextObject(text=blocks.clip(_facts(p), 3000))),
            InputBlock(
                block_id=BACKUP_BLOCK,
                label=PlainTextObject(text="Backup"),
                element=StaticSelectElement(
                    action_id=BACKUP_ACTION, options=options, initial_option=chosen
                ),
            ),
            InputBlock(
                block_id=NAME_BLOCK,
                label=PlainTextObject(text=f"Type {p.customer} to confirm"),
                element=PlainTextInputElement(
                    action_id=NAME_ACTION,
                    placeholder=PlainTextObject(text=p.customer),
                    max_length=100,
                ),
                hint=PlainTextObject(text="The customer's name, exactly as it is spelled."),
            ),
        ],
    )
    return view.to_dict()


def _preview_reply(p: RestorePreview) -> Reply:
    now = datetime.now(UTC)
    line = f"/db restore {p.customer} {p.backup.stamp} --confirm {p.customer}"
    others = [b for b in p.choices if b.stamp != p.backup.stamp][:5]
    more = "\n".join(f"• `{escape(_choice(b, now))}`" for b in others)
    body = _facts(p) + (f"\nOther backups:\n{more}" if more else "")
    return Reply(
        text=f"Restore {p.customer} from {p.backup.stamp}? Type: {line}",
        blocks=[
            blocks.header(f"Restore {p.customer}?"),
            *blocks.text_sections(body),
            blocks.section(f"To go ahead, type the customer's name in the command:\n`{line}`"),
        ],
        view=restore_view(p, now),
    )


# --- a restore to a moment (`--to`): the plan shown before the name is typed ---------------------


def _utc(ts: datetime) -> str:
    """A moment as `--to` takes it back: ISO 8601 in UTC, ``Z``."""
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _moment(ts: datetime, tz: ZoneInfo) -> str:
    """A moment for people: local time (TIMEZONE), then UTC as the command takes it."""
    return f"{local_time(ts, tz, '%Y-%m-%d %H:%M:%S %Z')} ({_utc(ts)})"


def confirm_line(customer: str, target: datetime) -> str:
    """The line that restores ``customer`` to ``target`` once the name is typed."""
    return f"/db restore {customer} --to {_utc(target)} --confirm {customer}"


def _plan_facts(customer: str, plan: RestorePlan, tz: ZoneInfo) -> str:
    lines = [
        f"*{escape(customer)}* (database `{escape(plan.database)}` on *{escape(plan.server)}*) "
        f"back to how it was at *{escape(_moment(plan.target, tz))}*:",
        *(f"• {escape(line)}" for line in plan.lines()),
        "The server's base backup is restored into a scratch instance (its own directory and "
        "port, removed afterwards) and its WAL replayed up to that moment; the database is "
        f"dumped from it as {escape(customer)}'s own role, restored into a new database and "
        "checked (row counts); then the customer's connections are ended, the names swapped "
        "and pgBouncer, where there is one, reloaded. The current database is kept, renamed "
        "with the time, closed to connections.",
    ]
    return "\n".join(lines)


def restore_to_view(customer: str, plan: RestorePlan, tz: ZoneInfo) -> dict[str, Any]:
    """The point-in-time modal: the plan, and the customer's name to type. The customer and
    the moment (UTC) ride in ``private_metadata``; the bot adds where to answer when it opens."""
    view = View(
        type="modal",
        callback_id=TO_FORM_ID,
        title=PlainTextObject(text="Restore to a moment"),
        submit=PlainTextObject(text="Restore"),
        close=PlainTextObject(text="Cancel"),
        private_metadata=json.dumps({"customer": customer, "to": _utc(plan.target)}),
        blocks=[
            SectionBlock(
                text=MarkdownTextObject(text=blocks.clip(_plan_facts(customer, plan, tz), 3000))
            ),
            InputBlock(
                block_id=NAME_BLOCK,
                label=PlainTextObject(text=f"Type {customer} to confirm"),
                element=PlainTextInputElement(
                    action_id=NAME_ACTION,
                    placeholder=PlainTextObject(text=customer),
                    max_length=100,
                ),
                hint=PlainTextObject(text="The customer's name, exactly as it is spelled."),
            ),
        ],
    )
    return view.to_dict()


def _plan_reply(customer: str, plan: RestorePlan, tz: ZoneInfo) -> Reply:
    line = confirm_line(customer, plan.target)
    return Reply(
        text=f"Restore {customer} to {_utc(plan.target)}? Type: {line}",
        blocks=[
            blocks.header(f"Restore {customer} to a moment?"),
            *blocks.text_sections(_plan_facts(customer, plan, tz)),
            blocks.section(f"To go ahead, type the customer's name in the command:\n`{line}`"),
        ],
        view=restore_to_view(customer, plan, tz),
    )


def _refused(exc: Refused, customer: str, tz: ZoneInfo) -> DbopsError:
    """A refused restore to a moment: why (core's words), and what can be restored instead."""
    hints = []
    w = exc.window
    if w is not None:
        hints.append(
            f"{customer} can be restored to any moment from {_moment(w.earliest, tz)} to now "
            f"(WAL archived up to {_moment(w.latest, tz)})."
        )
    if exc.hint and (w is None or _utc(w.earliest) not in exc.hint):  # not the window again
        hints.append(exc.hint)
    return DbopsError(
        f"No restore of {customer} to that moment: {exc.message}", hint=" ".join(hints) or None
    )


def _done_reply(r: RestoreResult, actor: str, tz: ZoneInfo | None = None) -> Reply:
    who = mention(actor)
    reload = "; pgBouncer reloaded" if r.pgbouncer_reloaded else ""
    if r.target is not None:  # a restore to a moment: its dump was taken from a scratch instance
        when = _moment(r.target, tz) if tz is not None else _utc(r.target)
        source = (
            f"to *{escape(when)}* (recovered from the base backup and WAL in a scratch instance, "
            f"dumped as {escape(r.customer)}'s own role)"
        )
        said = f"to {_utc(r.target)}"
    else:
        source, said = f"from backup `{escape(r.backup)}`", f"from {r.backup}"
    later = "" if r.recorded else f" Restored; {RECORD_LATER}."
    log_line = f"`/db log {escape(r.customer)}` has each" + (
        "." if r.recorded else " once the event log is back."
    )
    out: list[Block] = [
        blocks.section(
            f":rewind: {who} restored *{escape(r.customer)}* on *{escape(r.server)}* "
            f"{source} in {r.duration_s:.1f} s: "
            f"{r.tables} tables, {r.rows:,} rows, counts checked against the dump{reload}."
        ),
    ]
    if not r.recorded:
        out.append(blocks.section(f":warning: The event log is down: {RECORD_LATER}."))
    out.append(
        blocks.context(
            f"The database it replaced is kept as `{escape(r.kept_as)}` (no connections). "
            f"Steps: {escape(' → '.join(r.steps))}. {log_line}"
        )
    )
    return Reply(
        text=f"Restored {r.customer} {said}: {r.tables} tables, {r.rows:,} rows.{later}",
        blocks=out,
        ephemeral=False,
    )


def _restore(call: Call) -> Reply:
    name = call.arg("customer")
    backup = call.command.args.get("backup")
    to = call.command.args.get("to")
    if to is not None:
        if backup is not None:
            raise UsageError(
                f"Give a backup or `--to <time>`, not both ({backup} is a backup, {to} a moment).",
                usage=call.command.spec.usage,
                hint="A backup restores that nightly dump; `--to` restores the database as it "
                "was at a moment, from the server's base backups and archived WAL.",
            )
        return _restore_to(call, name, to)
    backups = call.rt.backups
    if call.command.spec.needs_form(call.command):
        return _preview_reply(backups.restore_preview(name, backup))
    try:
        result = backups.restore(name, backup, call.arg("confirm"), call.actor)
    except RestoreFailed as exc:
        raise _stopped(exc, name) from None
    return _done_reply(result, call.actor)


def _restore_to(call: Call, name: str, to: str) -> Reply:
    """`/db restore <customer> --to <time>`: the plan (a modal, or the shell's lines) until the
    name is typed, then the restore. A refusal (outside the window, too little disk) changes
    nothing and says what can be restored instead."""
    target = parse_target(to, call.rt.settings.timezone)
    backups = call.rt.backups
    try:
        if call.command.spec.needs_form(call.command):
            try:
                plan = backups.restore_to_time_plan(name, target)
            except Refused as exc:
                payload = {"target": _utc(target), "reason": exc.message[:300], "step": "plan"}
                call.router.events.append("restore.refused", name, payload, actor=call.actor)
                raise
            return _plan_reply(name, plan, call.tz)
        result = backups.restore_to_time(name, target, call.arg("confirm"), call.actor)
    except Refused as exc:
        raise _refused(exc, name, call.tz) from None
    except RestoreFailed as exc:
        raise _stopped(exc, name) from None
    return _done_reply(result, call.actor, call.tz)


def _stopped(exc: RestoreFailed, name: str) -> DbopsError:
    """What state a failed restore reached first (rolled back, or not), then why it stopped."""
    state = exc.state.replace("database is as before", "database is as before and serving")
    state = state.replace("the customer's", f"{name}'s", 1)
    return DbopsError(
        f"The restore of {name} stopped at {exc.step}. {_sentence(state)}. "
        f"{_sentence(exc.message)}",
        hint=f"`/db log {name}` has each step"
        + ("." if exc.recorded else " once the event log is back."),
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


SPECS: list[Spec] = [
    Spec(
        "restore",
        "restore a customer's database from a backup, or as it was at a moment (`--to`: ISO "
        "8601 with an offset or Z, else in TIMEZONE); asks for the name typed out",
        _restore,
        (
            Arg("customer", "customer"),
            Arg("backup", "backup", optional=True),
            Arg("to", "target_time", optional=True, flag=True, metavar="time"),
            Arg("confirm", "typed", optional=True, flag=True, metavar="customer"),
        ),
        role=Role.ADMIN,
        button="Restore…",
        form="confirm",
    ),
]


# --- after the form is submitted ---------------------------------------------------------------


def progress_view(
    customer: str, backup: str, channel: str | None, *, to: str | None = None
) -> dict[str, Any]:
    """What the form shows once submitted, while the restore runs (``to``: a restore to that
    moment, ``backup`` unused)."""
    where = f"<#{channel}>" if channel and channel.isalnum() else "the channel"
    source = f"to `{escape(to)}` (a few minutes)" if to else f"from `{escape(backup)}`"
    return View(
        type="modal",
        title=PlainTextObject(text="Restoring"),
        close=PlainTextObject(text="Close"),
        blocks=[
            SectionBlock(
                text=MarkdownTextObject(
                    text=f":hourglass_flowing_sand: Restoring *{escape(customer)}* {source}. "
                    f"The result is posted in {where}; you can close this."
                )
            )
        ],
    ).to_dict()
