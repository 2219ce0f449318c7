"""Writing a backup: the free-space check, pg_dump of a customer database, pg_dumpall's globals."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from core.backups.client import client_for
from core.backups.common import (
    GLOBALS,
    HEADROOM_FRACTION,
    HEADROOM_MAX_BYTES,
    ROWCOUNTS,
    STATUS,
    _json,
    utcnow,
)
from core.backups.server import (
    _DUMP_SCRIPT,
    _GLOBALS_SCRIPT,
    _Failed,
    _figures,
    _run_into_new_dir,
    admin_conninfo,
    put_files,
    sql_json,
    write_json_last,
)
from core.errors import DbopsError
from core.fleet import Server
from core.names import validate_name
from core.remote import Runner
from storage.events import scrub_text

# --- writing a backup ---------------------------------------------------------------------------


def _error_text(exc: BaseException) -> str:
    """What a failure says, fit for an event and a status file (passwords masked)."""
    if isinstance(exc, DbopsError):
        return exc.message
    return f"{type(exc).__name__}: {' '.join(scrub_text(str(exc)).split())[:200]}"


def _record_failure(
    runner: Runner, dest: str, remove: str, status: dict[str, Any], error: Exception
) -> None:
    """Best effort (the server, the connection or the event log may be what failed): drop the
    partial file, write the failed status so health shows a failed backup, not a missing one.
    Nothing raised here may hide the failure being recorded."""
    failed = {**status, "finished_at": utcnow().isoformat(), "ok": False}
    failed["error"] = _error_text(error)
    with contextlib.suppress(Exception):
        runner.run(["rm", "-f", "--", remove, f"{remove}.sha256", f"{dest}/{ROWCOUNTS}"])
    try:
        write_json_last(runner, f"{dest}/{STATUS}", failed)
    except Exception:
        # No status either (a disk full to the last byte): leave no empty directory behind to
        # read as a backup still running. Not a directory with anything left in it.
        with contextlib.suppress(Exception):
            runner.run(["rm", "-f", "--", f"{dest}/{STATUS}.tmp"])
            runner.run(["rmdir", "--", dest])


@dataclass(frozen=True)
class SpaceCheck:
    """The free-space check before a dump (see HEADROOM_FRACTION); its figures go into the
    backup's event."""

    server: str
    path: str
    database_bytes: int
    total_bytes: int
    free_bytes: int

    @property
    def need_bytes(self) -> int:
        headroom = min(int(self.total_bytes * HEADROOM_FRACTION), HEADROOM_MAX_BYTES)
        return self.database_bytes + headroom

    @property
    def ok(self) -> bool:
        return self.free_bytes >= self.need_bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "database_bytes": self.database_bytes,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "need_bytes": self.need_bytes,
            "ok": self.ok,
        }


class NotEnoughSpace(DbopsError):
    """A dump refused before it started: it could fill the disk PostgreSQL needs."""

    def __init__(self, space: SpaceCheck) -> None:
        super().__init__(
            f"not enough free space on {space.server}:{space.path}: need "
            f"~{_bytes(space.need_bytes)}, have {_bytes(space.free_bytes)}.",
            hint="Free space there or move the backup path; the database's earlier backups "
            "are kept.",
        )
        self.space = space


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# df of the nearest directory that exists: a backup path not made yet (a new server's first
# night; the dump makes it) is on its parent's filesystem.
_DF_SCRIPT = r"""p=$1
while [ ! -e "$p" ] && [ "$p" != / ] && [ -n "$p" ]; do p=$(dirname -- "$p"); done
exec df -Pk -- "${p:-/}"
"""


def read_free_space(runner: Runner, server: Server, path: str) -> tuple[int, int]:
    """(total, available) bytes of the filesystem holding ``path`` (or that will hold it: its
    nearest existing parent's), from one ``df -Pk``."""
    result = runner.run(["bash", "-c", _DF_SCRIPT, "dbops-df", path]).check()
    lines = result.stdout.splitlines()
    fields = lines[-1].split() if len(lines) > 1 else []
    if len(fields) < 4 or not (fields[1].isdigit() and fields[3].isdigit()):
        raise DbopsError(f"cannot read the free space of {server.name}:{path} from df.")
    return int(fields[1]) * 1024, int(fields[3]) * 1024


def check_space(runner: Runner, server: Server, database: str) -> SpaceCheck:
    """How much a dump of ``database`` needs against what the backup path has free.

    A database that does not exist counts as empty: pg_dump then fails with its own message."""
    size = sql_json(
        runner,
        server,
        sql.SQL(
            "SELECT pg_catalog.to_json(pg_catalog.pg_database_size(datname))"
            " FROM pg_catalog.pg_database WHERE datname = {}"
        ).format(sql.Literal(database)),
    )
    path = server.backup_path.rstrip("/") or "/"
    total, free = read_free_space(runner, server, path)
    return SpaceCheck(server.name, path, int(size or 0), total, free)


def write_backup(
    runner: Runner,
    server: Server,
    customer: str,
    database: str | None = None,
    *,
    now: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Back up one customer database on its server; returns the status plus ``path``,
    ``tables`` and ``rows``. ``extra``: more fields for the status file (a point-in-time
    restore's dump says ``"source": "pitr"`` and its target).

    First the free-space check (``check_space``): too little raises NotEnoughSpace before
    anything is written. Then pg_dump -Fc, its sha256, the row counts read back from the dump,
    then ``status`` last. A failure after the directory exists (of any kind, a lost connection
    too) leaves ``status`` with ``"ok": false`` and the error (the partial dump removed), then
    raises: health's backup_age shows it as a failed backup.
    """
    validate_name(customer)
    database = validate_name(database or customer, "database")
    # Before anything is written: a refusal leaves no directory and no partial dump.
    space = check_space(runner, server, database)
    if not space.ok:
        raise NotEnoughSpace(space)
    started = (now or utcnow()).astimezone(UTC).replace(microsecond=0)
    parent = f"{server.backup_path.rstrip('/')}/{customer}"
    name = f"{database}.dump"

    # pg_dump at least as new as the server (core.backups.client); the record says which.
    client = client_for(runner, server)

    def argv(dest: str) -> list[str]:
        return [
            "bash", "-c", _DUMP_SCRIPT, "dbops-backup", dest, f"{dest}/{name}", name,
            client.program("pg_dump"), client.program("pg_restore"),
            admin_conninfo(server, database),
        ]  # fmt: skip

    status: dict[str, Any] = {
        **(extra or {}),
        "customer": customer,
        "database": database,
        "client": client.label,
        "server_version": client.server_version,
    }
    try:
        dest, started, out = _run_into_new_dir(runner, parent, started, argv, "the backup")
    except _Failed as failed:
        status["started_at"] = started.isoformat()
        _record_failure(runner, failed.dest, f"{failed.dest}/{name}", status, failed.error)
        raise failed.error from None
    status["started_at"] = started.isoformat()
    try:
        digest, size, counts = _figures(out)
        done = {
            **status,
            "finished_at": max(utcnow(), started).isoformat(),
            "size_bytes": size,
            "sha256": digest,
            "ok": True,
        }
        files = {ROWCOUNTS: _json(counts).encode(), f"{STATUS}.tmp": _json(done).encode()}
        put_files(runner, dest, files, STATUS)
    except Exception as exc:
        # The dump may be whole, but without its figures and status it is no backup (a disk
        # that filled after pg_dump, a lost connection): recorded as failed, the dump removed.
        _record_failure(runner, dest, f"{dest}/{name}", status, exc)
        raise
    return {
        **done,
        "path": dest,
        "tables": len(counts),
        "rows": sum(counts.values()),
        "space": space.as_json(),
    }


def write_globals(runner: Runner, server: Server, *, now: datetime | None = None) -> dict[str, Any]:
    """pg_dumpall --globals-only (roles, tablespaces) into ``<backup_path>/_globals/<stamp>``.

    The file keeps the roles' SCRAM secrets, which a rebuilt server needs; pg_dumpall writes it
    itself (never through a log or a pipe of ours), readable by its owner only. The free-space
    check comes first, as for a database: the file is small, but the headroom is PostgreSQL's.
    """
    path = server.backup_path.rstrip("/") or "/"
    space = SpaceCheck(server.name, path, 0, *read_free_space(runner, server, path))
    if not space.ok:
        raise NotEnoughSpace(space)
    started = (now or utcnow()).astimezone(UTC).replace(microsecond=0)
    parent = f"{server.backup_path.rstrip('/')}/{GLOBALS}"

    client = client_for(runner, server)

    def argv(dest: str) -> list[str]:
        return [
            "bash", "-c", _GLOBALS_SCRIPT, "dbops-globals", dest, f"{dest}/globals.sql",
            client.program("pg_dumpall"), admin_conninfo(server),
        ]  # fmt: skip

    status: dict[str, Any] = {
        "server": server.name,
        "client": client.label.replace("pg_dump", "pg_dumpall"),
        "server_version": client.server_version,
    }
    try:
        dest, started, out = _run_into_new_dir(runner, parent, started, argv, "the globals dump")
    except _Failed as failed:
        status["started_at"] = started.isoformat()
        _record_failure(runner, failed.dest, f"{failed.dest}/globals.sql", status, failed.error)
        raise failed.error from None
    status["started_at"] = started.isoformat()
    try:
        digest, size, _ = _figures(out)
        done = {**status, "finished_at": utcnow().isoformat(), "size_bytes": size}
        done.update(sha256=digest, ok=True)
        put_files(runner, dest, {f"{STATUS}.tmp": _json(done).encode()}, STATUS)
    except Exception as exc:
        _record_failure(runner, dest, f"{dest}/globals.sql", status, exc)
        raise
    return {**done, "path": dest, "space": space.as_json()}
