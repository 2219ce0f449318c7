"""backup_perms, backup_age and backup_verified, through the server's runner."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.backups import backup_verified_check, parse_time
from core.fleet import Server
from core.health.thresholds import BadThreshold, Check, Verdict, _unknown, optional_seconds
from core.remote import CommandResult
from core.units import pretty_age

_STAMP_DIR_RE = re.compile(r"^\d{8}T\d{6}Z$")


@dataclass(frozen=True)
class BackupSeen:
    stamp: str
    finished_at: datetime | None
    ok: bool


def backups_by_customer(
    statuses: Mapping[str, dict[str, Any]], root: str
) -> dict[str, list[BackupSeen]]:
    root = root.rstrip("/")
    out: dict[str, list[BackupSeen]] = {}
    for path, data in statuses.items():
        if not path.endswith("/status"):
            continue
        parts = path[len(root) + 1 :].split("/") if path.startswith(root + "/") else []
        if len(parts) != 3 or not _STAMP_DIR_RE.match(parts[1]):
            continue
        if data.get("source") == "pitr":
            continue  # a point-in-time restore's dump, not a backup taken: not backup_age's
        customer, stamp = parts[0], parts[1]
        finished = parse_time(data.get("finished_at"))
        out.setdefault(customer, []).append(BackupSeen(stamp, finished, data.get("ok") is True))
    for seen in out.values():
        seen.sort(key=lambda b: b.stamp, reverse=True)
    return out


# find walks from the path it reads: run as another user (runuser), it cannot otherwise save a
# working directory (the SSH user's home) to return to, and gives up.
_PERMS_SCRIPT = r"""cd -- "$1" &&
  exec find -- "$PWD" \( -type d -o -type f \) -perm /077 -printf '%m %p\n'"""


def backup_perms_argv(server: Server) -> list[str]:
    """One ``find`` over the backup path, itself included: each directory and file its group or
    others may read, write or enter, as ``<octal mode> <path>``."""
    return ["bash", "-c", _PERMS_SCRIPT, "dbops-backup-perms", server.backup_path]


# Paths named in backup_perms' detail before "+N more".
BACKUP_PERMS_SHOWN = 3


def check_backup_perms(found: CommandResult, path: str) -> Check:
    """``backup_perms``: warn while the backup path or anything in it is open to its group or
    others (the dumps are customers' data: the server's OS user alone reads them). ``value`` is
    how many paths are open; the backups dbops writes are closed on their customer's next run."""
    name = "backup_perms"
    opened = []
    for line in found.stdout.splitlines():
        mode, _, where = line.partition(" ")
        if where and mode.isdigit():
            opened.append(f"{where} ({mode})")
    if not opened:
        if not found.ok:
            why = found.stderr.strip().splitlines()[-1:] or [f"find exited {found.exit_code}"]
            return Check(name, "unknown", None, 1, None, f"cannot read {path}: {why[0][:160]}")
        return Check(name, "ok", 0, 1, None, f"nothing in {path} is open to group or others")
    shown = ", ".join(opened[:BACKUP_PERMS_SHOWN])
    more = f" +{len(opened) - BACKUP_PERMS_SHOWN} more" if len(opened) > BACKUP_PERMS_SHOWN else ""
    unread = "" if found.ok else "; some of it could not be read"
    detail = (
        f"{len(opened)} open to group or others: {shown}{more}{unread}; "
        f"close them with chmod -R go-rwx {path}"
    )
    return Check(name, "warn", len(opened), 1, None, detail)


def check_backup_age(
    seen: Sequence[BackupSeen], warn: object, crit: object, now: datetime
) -> tuple[Check, datetime | None]:
    """Age of the newest complete, successful backup; a newer failed one is at least a warning."""
    name = "backup_age"
    try:
        w, c = optional_seconds(warn, name), optional_seconds(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc), None
    sw = int(w) if w is not None else None
    sc = int(c) if c is not None else None
    good = next((b for b in seen if b.ok and b.finished_at is not None), None)
    if good is None or good.finished_at is None:
        failed = f" ({len(seen)} failed)" if seen else ""
        return Check(name, "crit", None, sw, sc, f"no complete backup found{failed}"), None
    age = max(0, int((now - good.finished_at).total_seconds()))
    verdict: Verdict = (
        "crit" if c is not None and age >= c else "warn" if w is not None and age >= w else "ok"
    )
    detail = f"newest backup {good.stamp}, {pretty_age(age)} old"
    newer_failed = [b for b in seen if b.stamp > good.stamp and not b.ok]
    if newer_failed:
        detail += f"; the newer backup {newer_failed[0].stamp} FAILED"
        verdict = "warn" if verdict == "ok" else verdict
    return Check(name, verdict, age, sw, sc, detail), good.finished_at


def check_backup_verified(
    files: Mapping[str, Mapping[str, Any]], root: str, customer: str, now: datetime
) -> Check:
    """``backup_verified``: the newest restore test among a customer's backups, read by
    :func:`core.backups.backup_verified_check`."""
    return Check(**backup_verified_check(files, root, customer, now))
