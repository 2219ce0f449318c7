"""Reading backups off a server, and the ``backup_verified`` check core.health shows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from core.backups.common import (
    GLOBALS,
    STATUS,
    VERIFIED,
    VERIFY_WARN_AGE,
    State,
    Verdict,
    parse_stamp,
    parse_time,
)
from core.backups.server import script_error
from core.errors import DbopsError
from core.fleet import Server
from core.names import validate_name
from core.remote import Runner
from core.units import pretty_age

# --- reading backups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """One restore test of one backup (the ``verified`` file)."""

    ok: bool
    verdict: Verdict
    verified_at: datetime | None
    detail: str
    tables: int = 0
    rows: int = 0
    mismatches: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "verified_at": self.verified_at.isoformat() if self.verified_at else None,
            "detail": self.detail,
            "tables": self.tables,
            "rows": self.rows,
            "mismatches": list(self.mismatches),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verification:
        verdict = data.get("verdict")
        ok = data.get("ok") is True
        return cls(
            ok=ok,
            verdict=verdict if verdict in ("ok", "warn", "crit") else ("ok" if ok else "crit"),
            verified_at=parse_time(data.get("verified_at")),
            detail=str(data.get("detail") or ""),
            tables=int(data.get("tables") or 0),
            rows=int(data.get("rows") or 0),
            mismatches=tuple(str(m) for m in data.get("mismatches") or ()),
        )


@dataclass(frozen=True)
class BackupInfo:
    customer: str
    server: str
    stamp: str
    path: str
    state: State
    database: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    error: str | None = None
    verification: Verification | None = None

    @property
    def taken_at(self) -> datetime:
        return parse_stamp(self.stamp)

    @property
    def complete(self) -> bool:
        return self.state == "ok"

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.ok

    @property
    def dump(self) -> str:
        return f"{self.path}/{self.database or self.customer}.dump"

    def age_s(self, now: datetime) -> int:
        return max(0, int((now - (self.finished_at or self.taken_at)).total_seconds()))

    def as_json(self, now: datetime | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "customer": self.customer,
            "server": self.server,
            "backup": self.stamp,
            "path": self.path,
            "state": self.state,
            "database": self.database,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "error": self.error,
            "verification": self.verification.as_json() if self.verification else None,
        }
        if now is not None:
            out["age_s"] = self.age_s(now)
        return out


def backup_files_argv(server: Server, customers: Sequence[str]) -> list[str]:
    """Every line of every backup's ``status`` and ``verified`` file of these customers, as
    'path:line' (one command: over SSH each command is a round trip)."""
    root = server.backup_path.rstrip("/")
    dirs = [f"{root}/{validate_name(c) if c != GLOBALS else c}" for c in customers]
    return ["grep", "-r", "-H", "--include=status", "--include=verified", "", "--", *dirs]


def parse_backup_files(text: str, root: str) -> dict[str, dict[str, Any]]:
    """The JSON of each ``<root>/<customer>/<stamp>/status`` and ``.../verified`` found by
    :func:`backup_files_argv`, keyed by path; a file being written or damaged is left out."""
    prefix = root.rstrip("/") + "/"
    chunks: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        for name in (STATUS, VERIFIED):
            path, sep, content = line.partition(f"/{name}:")
            if sep and "/" in path[len(prefix) :]:
                chunks.setdefault(f"{path}/{name}", []).append(content)
                break
    out: dict[str, dict[str, Any]] = {}
    for path, lines in chunks.items():
        try:
            data = json.loads("\n".join(lines))
        except ValueError:
            continue
        if isinstance(data, dict):
            out[path] = data
    return out


def backups_from_files(
    files: Mapping[str, Mapping[str, Any]],
    root: str,
    server: str,
    customer: str,
    dirs: Iterable[str] = (),
) -> list[BackupInfo]:
    """The customer's backups, newest first, from parsed status/verified files plus the stamp
    directories listed (those without a status file are incomplete)."""
    base = f"{root.rstrip('/')}/{customer}"
    found: dict[str, dict[str, Mapping[str, Any]]] = {}
    for stamp in dirs:
        if _is_stamp(stamp):
            found.setdefault(stamp, {})
    for path, data in files.items():
        if not path.startswith(base + "/"):
            continue
        parts = path[len(base) + 1 :].split("/")
        if len(parts) == 2 and _is_stamp(parts[0]) and parts[1] in (STATUS, VERIFIED):
            found.setdefault(parts[0], {})[parts[1]] = data
    out = []
    for stamp, entry in found.items():
        status, verified = entry.get(STATUS), entry.get(VERIFIED)
        state: State = "incomplete"
        if status is not None:
            state = "ok" if status.get("ok") is True else "failed"
        size = status.get("size_bytes") if status else None
        out.append(
            BackupInfo(
                customer=customer,
                server=server,
                stamp=stamp,
                path=f"{base}/{stamp}",
                state=state,
                database=str(status["database"]) if status and status.get("database") else None,
                started_at=parse_time(status.get("started_at")) if status else None,
                finished_at=parse_time(status.get("finished_at")) if status else None,
                size_bytes=int(size) if isinstance(size, int) else None,
                sha256=str(status["sha256"]) if status and status.get("sha256") else None,
                error=str(status["error"])[:300] if status and status.get("error") else None,
                verification=Verification.from_json(verified) if verified else None,
            )
        )
    out.sort(key=lambda b: b.stamp, reverse=True)
    return out


def _is_stamp(text: str) -> bool:
    try:
        parse_stamp(text)
    except DbopsError:
        return False
    return len(text) == 16


_LIST_SCRIPT = r"""root=$1
[ -d "$root" ] || exit 0
for d in "$root"/*/; do
  if [ -d "$d" ]; then d=${d%/}; echo "dir ${d##*/}"; fi
done
grep -r -H --include=status --include=verified '' -- "$root" || [ $? -eq 1 ]
"""


def read_backups(runner: Runner, server: Server, customer: str) -> list[BackupInfo]:
    """The backups of one customer (or ``_globals``) on its server, newest first (one command:
    the stamp directories, then every status and verified file)."""
    root = server.backup_path.rstrip("/")
    if customer != GLOBALS:
        validate_name(customer)
    argv = ["bash", "-c", _LIST_SCRIPT, "dbops-list", f"{root}/{customer}"]
    result = runner.run(argv)
    if not result.ok:
        raise script_error(result, f"listing the backups of {customer}")
    out = result.stdout
    dirs = [line[4:] for line in out.splitlines() if line.startswith("dir ")]
    files = parse_backup_files(out, root)
    return backups_from_files(files, root, server.name, customer, dirs)


# --- backup_verified, for core.health -----------------------------------------------------------


def backup_verified_check(
    files: Mapping[str, Mapping[str, Any]],
    root: str,
    customer: str,
    now: datetime,
    *,
    warn_age: timedelta = VERIFY_WARN_AGE,
) -> dict[str, Any]:
    """The ``backup_verified`` check, as ``{name, verdict, value, warn, crit, detail}``.

    Reads the newest restore test among the customer's backups (``files`` from
    :func:`parse_backup_files`): crit when it failed, warn when it is older than ``warn_age``,
    ok otherwise; unknown while none has run. ``value`` is the test's age in seconds.
    """
    name, warn_s = "backup_verified", int(warn_age.total_seconds())
    backups = backups_from_files(files, root, "", customer)
    tested = [b for b in backups if b.verification is not None]
    if not tested:
        if not any(b.complete for b in backups):
            return _check(name, "unknown", None, warn_s, "no complete backup to test yet")
        # Unknown, not warn: a new customer's first backup waits for the next scheduled test.
        return _check(name, "unknown", None, warn_s, "no restore test has run on its backups yet")
    newest = tested[0]
    v = newest.verification
    assert v is not None
    age = int((now - v.verified_at).total_seconds()) if v.verified_at else None
    when = f"{pretty_age(age)} ago" if age is not None else "at an unknown time"
    if not v.ok:
        return _check(
            name, "crit", age, warn_s, f"restore test of {newest.stamp} FAILED {when}: {v.detail}"
        )
    detail = f"backup {newest.stamp} restored {when}: {v.tables} tables, {v.rows} rows match"
    if age is None or age >= warn_s:
        return _check(name, "warn", age, warn_s, detail + "; no restore test since")
    return _check(name, "ok", age, warn_s, detail)


def _check(
    name: str, verdict: Verdict, value: int | None, warn: int, detail: str
) -> dict[str, Any]:
    return {
        "name": name,
        "verdict": verdict,
        "value": value,
        "warn": warn,
        "crit": None,
        "detail": detail,
    }
