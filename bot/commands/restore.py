"""`/db restore <customer> [backup]` (admin): a form asking for the backup and the customer's
name typed out, then the restore (core/backups.py: a new database, verified, swapped in).

    /db restore acme            -> Slack: a modal (newest restore-tested backup preselected, the
                                   others to pick from, the warnings, a box for the name);
                                   shell: the same facts and the line to type
    modal submitted             -> the name checked at once (a mismatch keeps the modal open),
                                   then `restore acme <backup> --confirm acme` runs in the
                                   background through the router: role check again, events
    /db restore acme B --confirm acme   (shell, or typed in Slack: the name typed is the guard)

The result goes to the channel the command came from, saying what state was reached: restored
(and, with the event log down, that its record is written when the log is back), or rolled
back (the customer's database as before, untouched or swapped back), or not.

``SPECS`` go on the router through bot/commands/catalog.py (with ``KINDS``, the backup and the
typed name); the modal's submit is bot/slack/listeners/views.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

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
from bot.commands.router import Arg, Call, Kind, Spec
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core.backups import BackupInfo, RestoreFailed, RestorePreview, RestoreResult, parse_stamp
from core.errors import DbopsError
from core.units import pretty_age, pretty_bytes
from storage.spool import RECORD_LATER

log = logging.getLogger("dbops.restore")

FORM_ID = "db_restore"  # the modal's callback_id
BACKUP_BLOCK, BACKUP_ACTION = "backup", "backup"
NAME_BLOCK, NAME_ACTION = "confirm", "typed"
OPTIONS_MAX = 100  # Slack's limit for a static select
OPTION_TEXT_MAX = 75


def _backup(value: str) -> str:
    stamp = value.upper()
    parse_stamp(stamp)
    return stamp


def _typed(value: str) -> str:
    """The name typed to confirm: kept as typed (core compares it exactly), printable, short."""
    value = value.strip()
    if not value or len(value) > 100 or not value.isprintable():
        raise DbopsError("Type the customer's name exactly, as plain text, to confirm.")
    return value


KINDS: Mapping[str, Kind] = {"backup": _backup, "typed": _typed}


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


def _done_reply(r: RestoreResult, actor: str) -> Reply:
    who = mention(actor)
    reload = "; pgBouncer reloaded" if r.pgbouncer_reloaded else ""
    later = "" if r.recorded else f" Restored; {RECORD_LATER}."
    log_line = f"`/db log {escape(r.customer)}` has each" + (
        "." if r.recorded else " once the event log is back."
    )
    out: list[Block] = [
        blocks.section(
            f":rewind: {who} restored *{escape(r.customer)}* on *{escape(r.server)}* "
            f"from backup `{escape(r.backup)}` in {r.duration_s:.1f} s: "
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
        text=f"Restored {r.customer} from {r.backup}: {r.tables} tables, {r.rows:,} rows.{later}",
        blocks=out,
        ephemeral=False,
    )


def _restore(call: Call) -> Reply:
    name = call.arg("customer")
    backup = call.command.args.get("backup")
    backups = call.rt.backups
    if call.command.spec.needs_form(call.command):
        return _preview_reply(backups.restore_preview(name, backup))
    try:
        result = backups.restore(name, backup, call.arg("confirm"), call.actor)
    except RestoreFailed as exc:
        # What state it reached first (rolled back, or not), then why it stopped.
        state = exc.state.replace("database is as before", "database is as before and serving")
        state = state.replace("the customer's", f"{name}'s", 1)
        raise DbopsError(
            f"The restore of {name} stopped at {exc.step}. {_sentence(state)}. "
            f"{_sentence(exc.message)}",
            hint=f"`/db log {name}` has each step"
            + ("." if exc.recorded else " once the event log is back."),
        ) from None
    return _done_reply(result, call.actor)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


SPECS: list[Spec] = [
    Spec(
        "restore",
        "restore a customer's database from a backup (asks for the name typed out)",
        _restore,
        (
            Arg("customer", "customer"),
            Arg("backup", "backup", optional=True),
            Arg("confirm", "typed", optional=True, flag=True, metavar="customer"),
        ),
        role=Role.ADMIN,
        button="Restore…",
        form="confirm",
    ),
]


# --- after the form is submitted ---------------------------------------------------------------


def progress_view(customer: str, backup: str, channel: str | None) -> dict[str, Any]:
    """What the form shows once submitted, while the restore runs."""
    where = f"<#{channel}>" if channel and channel.isalnum() else "the channel"
    return View(
        type="modal",
        title=PlainTextObject(text="Restoring"),
        close=PlainTextObject(text="Close"),
        blocks=[
            SectionBlock(
                text=MarkdownTextObject(
                    text=f":hourglass_flowing_sand: Restoring *{escape(customer)}* from "
                    f"`{escape(backup)}`. The result is posted in {where}; you can close this."
                )
            )
        ],
    ).to_dict()
