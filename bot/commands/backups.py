"""`/db backups <customer>` and `/db backup <customer>` (operator).

``SPECS`` go on the router through bot/commands/catalog.py. Restores are
bot/commands/restore.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from slack_sdk.models.blocks import ButtonElement

from bot.commands.roles import Role
from bot.commands.router import Arg, Call, Spec
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core.backups import BackupInfo
from core.units import pretty_age, pretty_bytes

SHOWN = 15


def _line(b: BackupInfo, now: datetime) -> str:
    size = pretty_bytes(b.size_bytes) if b.size_bytes is not None else "?"
    if b.verification is None:
        tested = "not restore-tested yet"
    else:
        tested = "restore test ok" if b.verified else "restore test FAILED"
    state = {"ok": ":white_check_mark:", "failed": ":x:"}.get(str(b.state), ":hourglass:")
    return (
        f"{state} `{escape(b.stamp)}` {pretty_age(b.age_s(now))} ago, {size}, "
        f"{escape(str(b.state))}, {tested}"
    )


def _list(call: Call) -> Reply:
    name = call.arg("customer")
    found = call.rt.backups.list_backups(name)
    return backups_reply(
        name, found, datetime.now(UTC), call.router.registry.button(f"backup {name}")
    )


def backups_reply(
    name: str, found: Sequence[BackupInfo], now: datetime, backup_now: ButtonElement
) -> Reply:
    """`/db backups <customer>`: the newest SHOWN, how many older, and a Back up now button."""
    if not found:
        return Reply(
            text=f"{name} has no backups yet.",
            blocks=[
                blocks.section(f"*{escape(name)}* has no backups yet."),
                blocks.actions([backup_now]),
            ],
        )
    lines = "\n".join(_line(b, now) for b in found[:SHOWN])
    more = f"\n…and {len(found) - SHOWN} older" if len(found) > SHOWN else ""
    complete = sum(1 for b in found if b.complete)
    return Reply(
        text=f"{name}: {len(found)} backups, {complete} complete, newest {found[0].stamp}",
        blocks=[
            blocks.section(f"*Backups of {escape(name)}* on {escape(found[0].server)}"),
            *blocks.text_sections(lines + more),
            blocks.actions([backup_now]),
        ],
    )


def _take(call: Call) -> Reply:
    name = call.arg("customer")
    info = call.rt.backups.take_backup(name, call.actor)
    size = pretty_bytes(info.size_bytes) if info.size_bytes is not None else "?"
    return Reply(
        text=f"Backed up {name}: {info.stamp}, {size}.",
        blocks=[
            blocks.section(
                f":floppy_disk: Backed up *{escape(name)}*: `{escape(info.stamp)}`"
                f", {size}, sha256 recorded."
            )
        ],
    )


SPECS: list[Spec] = [
    Spec(
        "backups",
        "a customer's backups: age, size, restore-test result",
        _list,
        (Arg("customer", "customer"),),
        shared=True,
    ),
    Spec(
        "backup",
        "take a backup of a customer's database now",
        _take,
        (Arg("customer", "customer"),),
        role=Role.OPERATOR,
        button="Back up now",
    ),
]
