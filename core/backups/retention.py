"""Retention: which backups to keep (daily and weekly), and removing the rest."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from core.backups.common import GLOBALS, INCOMPLETE_GRACE, parse_stamp
from core.backups.listing import BackupInfo
from core.fleet import Server
from core.names import validate_name
from core.remote import Runner

# --- retention ----------------------------------------------------------------------------------


def plan_retention(
    backups: Sequence[BackupInfo], keep_daily: int, keep_weekly: int, now: datetime
) -> tuple[list[BackupInfo], list[BackupInfo]]:
    """(kept, to delete), counting complete backups only (restic's --keep-daily/--keep-weekly).

    Daily: the newest complete backup of each of the last ``keep_daily`` UTC days that have
    one; weekly: the same for ISO weeks. However long backups have been failing, the last
    complete ones stay. A failed or unfinished backup goes once a complete one is newer than it
    and it is older than INCOMPLETE_GRACE (a younger one may still be running).
    """
    complete = sorted((b for b in backups if b.complete), key=lambda b: b.stamp, reverse=True)
    keep: dict[str, BackupInfo] = {}

    def by(bucket: Callable[[BackupInfo], object], count: int) -> None:
        seen: set[object] = set()
        for b in complete:
            key = bucket(b)
            if key in seen:
                continue
            if len(seen) >= count:
                break
            seen.add(key)
            keep[b.stamp] = b

    by(lambda b: b.taken_at.date(), keep_daily)
    by(lambda b: tuple(b.taken_at.isocalendar())[:2], keep_weekly)
    if complete and not keep:
        keep[complete[0].stamp] = complete[0]
    newest = complete[0].stamp if complete else None
    delete = []
    for b in backups:
        if b.complete:
            if b.stamp not in keep:
                delete.append(b)
        elif newest is not None and b.stamp < newest and now - b.taken_at > INCOMPLETE_GRACE:
            delete.append(b)
    kept = [b for b in sorted(backups, key=lambda b: b.stamp, reverse=True) if b not in delete]
    return kept, sorted(delete, key=lambda b: b.stamp, reverse=True)


def _remove_backup(runner: Runner, server: Server, customer: str, stamp: str) -> None:
    root = server.backup_path.rstrip("/")
    if customer != GLOBALS:
        validate_name(customer)
    parse_stamp(stamp)
    runner.run(["rm", "-rf", "--", f"{root}/{customer}/{stamp}"]).check()
