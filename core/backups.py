"""Backups of customer databases, restore tests, and restores (SOP-201 step 8).

The format, owned here (core.health and core.sandbox read it), one directory per backup::

    <backup_path>/<customer>/<20261122T080000Z>/
        <db>.dump            pg_dump -Fc
        <db>.dump.sha256     sha256sum format
        rowcounts.json       {"schema.table": rows}, counted from the dump itself
        status               {"customer","database","started_at","finished_at","size_bytes",
                              "sha256","ok"[,"error"]}, written LAST (temp file + mv)
        verified             the newest restore test of this backup (same temp + mv)
    <backup_path>/_globals/<stamp>/globals.sql (+ .sha256, status): roles and tablespaces

As Debian's pg_backupcluster does it, a directory without ``status`` is a backup in progress or
one that died; ``"ok": false`` is a backup that failed (its partial dump removed). Only complete
backups count for retention, ``backup_age`` and restores.

Row counts come from the dump (its COPY blocks), not from a second query after pg_dump: on a
busy database the two would see different rows and every restore test would cry wolf.

Everything runs on the customer's server through its runner (SSH or local), as argument lists;
SQL goes to ``psql`` on standard input, which the runner never records. The admin connection is
the server's ``admin_dsn`` with any password stripped (the server's ~/.pgpass or peer auth
supplies it), so no password reaches a command line, an event or an error message.

A restore builds a new database from the backup, checks its row counts, then swaps the names in
one transaction with the customer's sessions ended: a failure at any step, including between
the two renames, leaves the customer's database as it was. The old one is kept, renamed with a
UTC timestamp and closed to connections.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import secrets
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import Engine

from core.alerts import HEALTH_SEVERITY, Alert, dedupe_key
from core.customers import Customer, get_customer, list_customers
from core.errors import DbopsError, NotFound, Unreachable
from core.fleet import Fleet, Server
from core.names import validate_name
from core.remote import CommandResult, FleetAccess, Runner, RunnerPool
from core.units import pretty_age
from storage.db import run_inline, run_with_deadline, runs_inline
from storage.events import EventLog, EventLogUnavailable, is_outage, scrub_text
from storage.models_billing import LockBusy, acquire_lock, op_lock, release_lock
from storage.spool import RECORD_LATER, caught_up, flush_spool, record, spool_for

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
GLOBALS = "_globals"  # not a valid customer name, so it never collides with one
STATUS, VERIFIED, ROWCOUNTS = "status", "verified", "rowcounts.json"
DUMP_TIMEOUT_S = 3600.0
RESTORE_TIMEOUT_S = 7200.0
SQL_TIMEOUT_S = 120.0
# A failed or unfinished backup older than the newest complete one is removed by retention, but
# never one younger than this: it may still be running.
INCOMPLETE_GRACE = timedelta(hours=6)
# No restore test for this long: backup_verified warns.
VERIFY_WARN_AGE = timedelta(days=8)
LOCK_LEASE = timedelta(hours=3)
# How long taking or releasing a backup's lock may wait for dbops' database: a black-holed
# database would otherwise hold the nightly run's threads until the route comes back. As long as
# an event append may take (storage.events.APPEND_DEADLINE_S).
LOCK_DEADLINE_S = 5.0
SESSIONS_END_S = 10
# Free space a dump needs on the backup path's filesystem before it starts: the database's size
# (pg_database_size: a custom-format dump is compressed and leaves indexes out, so it is nearly
# always smaller; the size is a ceiling, not a guess), plus headroom for PostgreSQL, which often
# shares the disk: 10% of the filesystem, but never more than 1 GiB (on a 2 TB disk 10% would
# refuse dumps with 150 GB free).
HEADROOM_FRACTION = 0.10
HEADROOM_MAX_BYTES = 1 << 30
# An infrastructure failure (SSH, the event log) in the nightly run is retried once, this long
# after the first pass over every customer has finished: long enough for an event database
# restart or an SSH blip to pass.
RETRY_AFTER_S = 120.0

log = logging.getLogger(__name__)

State = Literal["ok", "failed", "incomplete"]
Verdict = Literal["ok", "warn", "crit", "unknown"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def stamp_of(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime(STAMP_FORMAT)


def parse_stamp(stamp: str) -> datetime:
    try:
        return datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise DbopsError(
            f"{stamp[:40]!r} is not a backup name.",
            hint="Backups are named by their UTC time, like 20261122T080000Z; "
            "`/db backups <customer>` lists them.",
        ) from None


def parse_time(value: object) -> datetime | None:
    """An ISO-8601 time from a status file, as an aware datetime (UTC when it names no zone)."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# --- talking to PostgreSQL on the server ------------------------------------------------------


# Every session dbops opens on a server pins its search_path (a startup option, so it outranks
# whatever the database or the role sets): a customer owns its database and may put its own
# schema first, where functions, operators, aggregates and types named like pg_catalog's would
# otherwise run as whoever calls them (DESIGN.md, "Trust boundaries"). pg_temp last: no
# temporary object shadows anything either. The queries themselves name pg_catalog too.
PINNED_SEARCH_PATH = "-c search_path=pg_catalog,pg_temp"


def pin_search_path(options: object = None) -> str:
    """libpq ``options`` with the pinned search_path after whatever ``options`` already held
    (the last ``-c`` of a setting wins)."""
    return f"{options} {PINNED_SEARCH_PATH}" if options else PINNED_SEARCH_PATH


def admin_conninfo(server: Server, dbname: str | None = None) -> str:
    """The server's admin connection (``admin_dsn``, else ``dsn``) as seen from the server itself,
    without any password, optionally for another database, its search_path pinned."""
    params = conninfo_to_dict(server.admin_dsn or server.dsn)
    params.pop("password", None)
    if dbname is not None:
        params["dbname"] = dbname
    params["options"] = pin_search_path(params.get("options"))
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def tenant_conninfo(server: Server, role: str, dbname: str) -> str:
    """A session as the customer's own role, into ``dbname``, the way the admin connection
    reaches the server (search_path pinned). Whatever a customer's database evaluates while
    dbops loads or counts it (CHECK constraints, triggers, defaults, index expressions, its
    functions) runs in such a session: with the customer's privileges and no way back to
    anyone else's, since the session never was anyone else's (a superuser session that SET
    ROLE to the customer could be RESET by the customer's code). The server lets the admin's
    OS user log in as customer roles from the server itself (README, "Tenants")."""
    return make_conninfo(admin_conninfo(server, dbname), user=validate_name(role, "role"))


def _bin(server: Server, program: str) -> str:
    return f"{server.pg_bin.rstrip('/')}/{program}"


def psql_argv(server: Server, dbname: str | None = None, role: str | None = None) -> list[str]:
    """psql as the admin, or as the customer's ``role`` (into ``dbname``, which it then needs)."""
    if role is not None:
        if dbname is None:
            raise ValueError("a session as a customer's role is into one of its databases")
        conninfo = tenant_conninfo(server, role, dbname)
    else:
        conninfo = admin_conninfo(server, dbname)
    # Terse errors and no context: psql would otherwise echo the failing statement's text.
    return [
        _bin(server, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-v", "VERBOSITY=terse", "-v", "SHOW_CONTEXT=never",
        "-d", conninfo, "-f", "-",
    ]  # fmt: skip


def run_sql(
    runner: Runner,
    server: Server,
    statements: str | sql.Composable | Sequence[str | sql.Composable],
    *,
    dbname: str | None = None,
    role: str | None = None,
    timeout: float = SQL_TIMEOUT_S,
) -> str:
    """Run SQL with psql on the server (on standard input); its output, or a DbopsError.

    As the admin, or as the customer's ``role`` in its database ``dbname``: anything that can
    run a customer's code (reading its tables, ANALYZE) is run as the customer.
    """
    items = [statements] if isinstance(statements, str | sql.Composable) else list(statements)
    text = "\n".join(
        (s.as_string(None) if isinstance(s, sql.Composable) else s).rstrip().rstrip(";") + ";"
        for s in items
    )
    argv = psql_argv(server, dbname, role)
    result = runner.run(argv, stdin=text.encode("utf-8"), timeout=timeout)
    return result.check().stdout


def sql_json(runner: Runner, server: Server, query: str | sql.Composable, **kw: Any) -> Any:
    out = run_sql(runner, server, query, **kw).strip()
    return json.loads(out) if out else None


def write_remote_file(runner: Runner, path: str, data: bytes) -> None:
    # dd writes its stdin to a path given as one argument: no shell redirection is needed, and
    # the data (which may be a SCRAM secret) is never part of a recorded command line.
    runner.run(["dd", f"of={path}", "status=none"], stdin=data).check()


# The scripts below are constants: every value reaches them as a positional argument ("$1"...),
# quoted by the runner, never pasted into the script. Batching a step into one script matters
# over SSH, where each command is a round trip and a process start on the server.

# Backups hold the customers' data: readable by the server's OS user (``run_as``, else the SSH
# user: who runs pg_dump and reads the dumps back for restore tests and restores) and nobody
# else. Every script that writes under the backup path starts with this umask, so what it makes
# is 0700/0600 whoever runs it; tar is told not to keep the modes in the archive (root would).
_PRIVATE = "umask 077"

_PUT_FILES_SCRIPT = (
    _PRIVATE + ' && tar -x -m --no-same-owner --no-same-permissions -f - -C "$1"'
    ' && mv -f -- "$1/$2.tmp" "$1/$2"'
)


def _tar(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_files(runner: Runner, directory: str, files: Mapping[str, bytes], last: str) -> None:
    """Write ``files`` into ``directory`` in one command, then ``last`` (sent as ``last.tmp``)
    renamed into place, so a reader never sees ``last`` before the others or half written."""
    if f"{last}.tmp" not in files:
        raise ValueError("the file written last must be among the files, named <last>.tmp")
    argv = ["bash", "-c", _PUT_FILES_SCRIPT, "put-files", directory, last]
    result = runner.run(argv, stdin=_tar(files))
    if not result.ok:
        # tar ends with "Exiting with failure status ...": the line before it says why (a
        # full disk: "Cannot write: No space left on device").
        said = [ln for ln in result.stderr.splitlines() if "Exiting with failure" not in ln]
        result = replace(result, stderr="\n".join(said))
        raise script_error(result, f"writing {last} in {directory}")


def write_json_last(runner: Runner, path: str, data: Any) -> None:
    """Write JSON next to its final name and rename it into place: readers never see half."""
    directory, _, name = path.rpartition("/")
    put_files(runner, directory, {f"{name}.tmp": _json(data).encode()}, name)


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(validate_name(name, "database"))


# Counted in the restored database the way pg_dump writes tables: ordinary tables only (ONLY,
# so a parent does not count its children), extension members left out (their data is not in
# a dump), names as format('%I.%I') which quotes as pg_dump's COPY header does. Run as the
# customer, inside its database: every function, operator and type is pg_catalog's by name,
# whatever the session's search_path (which is pinned too).
ROWCOUNTS_SQL = """
SELECT COALESCE(pg_catalog.json_object_agg(k, n), '{}'::pg_catalog.json) FROM (
  SELECT pg_catalog.format('%I.%I', ns.nspname, c.relname) AS k,
         ((pg_catalog.xpath('/row/n/text()', pg_catalog.query_to_xml(pg_catalog.format(
            'SELECT pg_catalog.count(*) AS n FROM ONLY %I.%I', ns.nspname, c.relname),
            false, true, '')))[1])::pg_catalog.text::pg_catalog.int8 AS n
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace ns ON ns.oid OPERATOR(pg_catalog.=) c.relnamespace
  WHERE c.relkind OPERATOR(pg_catalog.=) 'r'
    AND ns.nspname OPERATOR(pg_catalog.<>) 'pg_catalog'
    AND ns.nspname OPERATOR(pg_catalog.<>) 'information_schema'
    AND ns.nspname OPERATOR(pg_catalog.!~~) 'pg_toast%'
    AND ns.nspname OPERATOR(pg_catalog.!~~) 'pg_temp%'
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid
                          OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                      AND d.objid OPERATOR(pg_catalog.=) c.oid
                      AND d.deptype OPERATOR(pg_catalog.=) 'e')
) t
"""

# Rows per table from the dump's own COPY blocks: one line per row (COPY text format escapes
# newlines), so this is exact, and it is the snapshot pg_dump saw.
_COUNT_COPY_ROWS = r"""awk '
  /^COPY / { t = substr($0, 6); sub(/ \(.*\) FROM stdin;$/, "", t);
             sub(/ FROM stdin;$/, "", t); n = 0; inside = 1; next }
  inside && $0 == "\\." { print "rows " n " " t; inside = 0; next }
  inside { n++ }
'"""

# Before a backup is written: the backup path and the customer's (or _globals') directory made
# (0700, by the umask), and whatever an older dbops left open in them closed: directories 0700,
# files 0600. Only what this user owns is changed (the backup path itself only when it is ours
# and not a shared sticky directory such as /tmp), and never at the cost of the backup (a file a
# restore test renames away mid-walk, another owner's directory): whatever stays open, the
# backup_perms check in core.health reports. find runs from the directory it walks: it needs a
# working directory it can read, and over SSH with runuser that is still the SSH user's home.
_CLOSE_OPEN = r"""parent=${dest%/*}; root=${parent%/*}
mkdir -p -- "$parent"
if [ -O "$root" ] && [ ! -k "$root" ]; then chmod go-rwx -- "$root" || true; fi
(cd -- "$parent" && find . -user "$(id -u)" \( -type d -o -type f \) -perm /077 \
  -exec chmod go-rwx -- {} +) || true
"""

# A new backup directory (exit 17 when the stamp is taken), the dump, its sha256 file, and the
# figures on stdout: "sha256 <hex>", "size <bytes>", then "rows <n> <schema.table>" per table.
_DUMP_SCRIPT = (
    r"""set -eu -o pipefail
"""
    + _PRIVATE
    + r"""
dest=$1; dump=$2; name=$3; pg_dump=$4; pg_restore=$5; conninfo=$6
"""
    + _CLOSE_OPEN
    + r"""if [ -e "$dest" ]; then exit 17; fi
mkdir -- "$dest"
"$pg_dump" -Fc -d "$conninfo" -f "$dump"
sum=$(sha256sum -- "$dump" | cut -d' ' -f1)
printf '%s  %s\n' "$sum" "$name" > "$dump.sha256"
echo "sha256 $sum"
echo "size $(stat -c %s -- "$dump")"
"$pg_restore" -f - --data-only "$dump" | """
    + _COUNT_COPY_ROWS
)

_GLOBALS_SCRIPT = (
    r"""set -eu -o pipefail
"""
    + _PRIVATE
    + r"""
dest=$1; out=$2; pg_dumpall=$3; conninfo=$4
"""
    + _CLOSE_OPEN
    + r"""if [ -e "$dest" ]; then exit 17; fi
mkdir -- "$dest"
"$pg_dumpall" --globals-only -d "$conninfo" -f "$out"
sum=$(sha256sum -- "$out" | cut -d' ' -f1)
printf '%s  globals.sql\n' "$sum" > "$out.sha256"
echo "sha256 $sum"
echo "size $(stat -c %s -- "$out")"
"""
)

DIR_TAKEN = 17


def _figures(stdout: str) -> tuple[str, int, dict[str, int]]:
    digest, size = "", -1
    counts: dict[str, int] = {}
    for line in stdout.splitlines():
        key, _, rest = line.partition(" ")
        if key == "sha256":
            digest = rest.strip()
        elif key == "size" and rest.strip().isdigit():
            size = int(rest)
        elif key == "rows":
            n, _, table = rest.partition(" ")
            if n.isdigit():
                counts[table] = counts.get(table, 0) + int(n)
    if len(digest) != 64 or size < 0:
        raise DbopsError("the backup finished without reporting its sha256 and size.")
    return digest, size, counts


def _run_into_new_dir(
    runner: Runner,
    parent: str,
    started: datetime,
    argv_for: Callable[[str], list[str]],
    what: str,
) -> tuple[str, datetime, str]:
    """Run a script that makes ``<parent>/<stamp>`` first; a stamp already taken (two backups
    in one second) moves on a second. Returns (directory, its time, the script's stdout)."""
    for _ in range(5):
        dest = f"{parent}/{stamp_of(started)}"
        try:
            result = runner.run(argv_for(dest), timeout=DUMP_TIMEOUT_S)
        except Exception as exc:
            # The connection went, or the command ran and its record failed: the directory
            # may exist with a partial dump in it, which the caller removes.
            raise _Failed(dest, exc) from exc
        if result.exit_code != DIR_TAKEN:
            if not result.ok:
                raise _Failed(dest, script_error(result, what))
            return dest, started, result.stdout
        started += timedelta(seconds=1)
    raise DbopsError(f"cannot make a new backup directory under {parent}: all taken.")


class _Failed(Exception):
    """A script failed after making its directory: the caller records that, then raises."""

    def __init__(self, dest: str, error: Exception) -> None:
        super().__init__(dest)
        self.dest = dest
        self.error = error


def script_error(result: CommandResult, what: str) -> DbopsError:
    """A failed script as a message that names the step, not "bash" (its stderr's telling line,
    passwords masked)."""
    detail = " ".join(scrub_text(_error_line(result.stderr) or _error_line(result.stdout)).split())
    message = f"{what} failed on {result.server} (exit {result.exit_code})"
    return DbopsError(f"{message}: {detail[:200]}" if detail else f"{message}.")


def compare_counts(expected: Mapping[str, int], found: Mapping[str, int]) -> list[str]:
    """What differs, table by table; empty when the restore holds exactly the dumped rows."""
    out = []
    for table in sorted(set(expected) | set(found)):
        want, got = expected.get(table), found.get(table)
        if want is None:
            if got:
                out.append(f"{table}: {got} rows not in the dump")
        elif got is None:
            out.append(f"{table}: missing ({want} rows expected)")
        elif int(want) != int(got):
            out.append(f"{table}: {got} rows, {want} expected")
    return out


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
) -> dict[str, Any]:
    """Back up one customer database on its server; returns the status plus ``path``,
    ``tables`` and ``rows``.

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

    def argv(dest: str) -> list[str]:
        return [
            "bash", "-c", _DUMP_SCRIPT, "dbops-backup", dest, f"{dest}/{name}", name,
            _bin(server, "pg_dump"), _bin(server, "pg_restore"), admin_conninfo(server, database),
        ]  # fmt: skip

    status: dict[str, Any] = {"customer": customer, "database": database}
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

    def argv(dest: str) -> list[str]:
        return [
            "bash", "-c", _GLOBALS_SCRIPT, "dbops-globals", dest, f"{dest}/globals.sql",
            _bin(server, "pg_dumpall"), admin_conninfo(server),
        ]  # fmt: skip

    status: dict[str, Any] = {"server": server.name}
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


# --- restore tests --------------------------------------------------------------------------------


_INSPECT_SCRIPT = r"""dump=$1; dir=$2
echo "found $(sha256sum -- "$dump" 2>&1 | cut -d' ' -f1)"
echo "recorded $(cut -d' ' -f1 -- "$dump.sha256" 2>/dev/null)"
echo "counts $(tr -d '\n' < "$dir/rowcounts.json" 2>/dev/null)"
"""


@dataclass(frozen=True)
class _Inspection:
    problem: str | None  # why the dump cannot be trusted, or None
    counts: dict[str, int] | None  # the row counts of dump time, when recorded


def _inspect(runner: Runner, info: BackupInfo) -> _Inspection:
    """The dump's sha256 against the one recorded, and the recorded row counts (one command)."""
    argv = ["bash", "-c", _INSPECT_SCRIPT, "dbops-inspect", info.dump, info.path]
    result = runner.run(argv)
    if not result.ok:
        raise script_error(result, f"reading backup {info.stamp}")
    lines = dict(line.partition(" ")[::2] for line in result.stdout.splitlines())
    found, side = lines.get("found", "").strip(), lines.get("recorded", "").strip()
    counts: dict[str, int] | None = None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        raw = json.loads(lines.get("counts") or "null")
        counts = {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else None
    recorded = {r for r in (info.sha256, side) if r}
    if len(found) != 64:
        return _Inspection(
            f"the dump {info.dump} cannot be read: {found[:160] or 'missing'}", counts
        )
    if not recorded:
        return _Inspection("no sha256 was recorded for the dump", counts)
    if any(found != r for r in recorded):
        want = sorted(recorded)[0]
        return _Inspection(
            "sha256 mismatch: the dump is not the file that was written "
            f"(expected {want[:12]}..., found {found[:12]}...)",
            counts,
        )
    return _Inspection(None, counts)


def _create_database(
    runner: Runner, server: Server, name: str, *, owner: str | None = None, like: str | None = None
) -> None:
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(_ident(name))]
    if owner is not None:
        parts.append(sql.SQL("OWNER {}").format(sql.Identifier(validate_name(owner, "role"))))
    if like is not None:
        row = sql_json(
            runner,
            server,
            sql.SQL(
                "SELECT pg_catalog.json_build_object('enc', pg_catalog.pg_encoding_to_char("
                "encoding), 'collate', datcollate, 'ctype', datctype) FROM pg_catalog.pg_database"
                " WHERE datname = {}"
            ).format(sql.Literal(like)),
        )
        if row:
            parts.append(
                sql.SQL("ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                    sql.Literal(row["enc"]), sql.Literal(row["collate"]), sql.Literal(row["ctype"])
                )
            )
    create = sql.SQL(" ").join(parts)
    revoke = sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(_ident(name))
    run_sql(runner, server, [create, revoke])


def _drop_database(runner: Runner, server: Server, name: str) -> None:
    run_sql(runner, server, sql.SQL("DROP DATABASE IF EXISTS {}").format(_ident(name)))


def _pg_restore(runner: Runner, server: Server, dump: str, into: str, role: str) -> str | None:
    """Restore ``dump`` into the database ``into`` (owned by ``role``), as the customer's
    ``role``: whatever the load evaluates (CHECK constraints, defaults, triggers, generated
    columns, index expressions) runs with the customer's privileges, and everything restored is
    the customer's (``--no-owner``). The reason it failed, or None."""
    result = runner.run(
        [
            _bin(server, "pg_restore"), "--exit-on-error", "--single-transaction", "--no-owner",
            "-d", tenant_conninfo(server, role, into), dump,
        ],
        timeout=RESTORE_TIMEOUT_S,
    )  # fmt: skip
    if result.ok:
        return None
    return f"pg_restore failed (exit {result.exit_code}): {_error_line(result.stderr)}"


def _restored_counts(runner: Runner, server: Server, database: str, role: str) -> dict[str, int]:
    """Rows per table of a restored database, counted as the customer's ``role``."""
    data = sql_json(
        runner, server, ROWCOUNTS_SQL, dbname=database, role=role, timeout=RESTORE_TIMEOUT_S
    )
    return {str(k): int(v) for k, v in (data or {}).items()}


# VACUUM (ANALYZE) of each table the customer owns in its restored database, as the customer:
# ANALYZE evaluates index expressions and statistics, the customer's code. Table by table
# (psql's \gexec), since a database-wide VACUUM by its owner warns of every shared catalog.
_ANALYZE_OWN_TABLES = r"""SELECT pg_catalog.format('VACUUM (ANALYZE) %I.%I', n.nspname, c.relname)
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,m}'::pg_catalog."char"[])
   AND c.relowner OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r
                                           WHERE r.rolname OPERATOR(pg_catalog.=) current_user)
   AND c.relpersistence OPERATOR(pg_catalog.<>) 't'
 ORDER BY 1
\gexec
"""


def _analyze_as_owner(runner: Runner, server: Server, database: str, role: str) -> None:
    argv = psql_argv(server, database, role)
    result = runner.run(argv, stdin=_ANALYZE_OWN_TABLES.encode(), timeout=RESTORE_TIMEOUT_S)
    result.check()


# The scratch database of a restore test, in one command: created by the admin for the
# customer's role and closed to PUBLIC (other customers on the server must not see this one's
# data), restored and counted as the customer (``target`` is a session as its role: see
# _pg_restore), and dropped on exit whatever happened. Exit 20/21/22 say which stage failed.
_SCRATCH_SCRIPT = r"""set -u -o pipefail
admin=$1; target=$2; name=$3; dump=$4; bin=$5; counts_sql=$6; owner=$7
"$bin/createdb" --maintenance-db="$admin" -T template0 -O "$owner" -- "$name" || exit 20
trap '"$bin/dropdb" --maintenance-db="$admin" --if-exists -- "$name" >/dev/null' EXIT
printf 'REVOKE ALL ON DATABASE :"db" FROM PUBLIC;\n' |
  "$bin/psql" -X -q -v ON_ERROR_STOP=1 -v db="$name" -d "$admin" -f - || exit 20
"$bin/pg_restore" --exit-on-error --single-transaction --no-owner -d "$target" "$dump" || exit 21
"$bin/psql" -X -q -A -t -v ON_ERROR_STOP=1 -d "$target" -c "$counts_sql" || exit 22
"""
_SCRATCH_STAGES = {20: "creating the scratch database", 21: "pg_restore", 22: "counting rows"}


def _error_line(stderr: str) -> str:
    """The line that says what went wrong (pg_restore's "error:" line rather than a DETAIL
    line, which can quote a customer's data)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    picked = next((ln for ln in lines if "error:" in ln.lower() or "ERROR:" in ln), None)
    return (picked or (lines[-1] if lines else ""))[:200]


def verify_backup(
    runner: Runner,
    server: Server,
    info: BackupInfo,
    *,
    role: str,
    now: Callable[[], datetime] = utcnow,
) -> Verification:
    """Restore test: the dump's sha256, pg_restore into a scratch database on the same server
    as the customer's ``role``, row counts (as that role) against those of dump time, scratch
    dropped. Writes ``verified`` beside ``status`` and returns the result; a bad backup is a
    crit result, never an exception."""

    def result(verdict: Verdict, detail: str, **extra: Any) -> Verification:
        return Verification(verdict == "ok", verdict, now(), detail, **extra)

    if not info.complete:
        return result("crit", f"backup {info.stamp} is {info.state}: nothing to restore")
    seen = _inspect(runner, info)
    if seen.problem is not None:
        outcome = result("crit", seen.problem)
    else:
        outcome = _scratch_restore(runner, server, info, role, seen.counts, result)
    write_json_last(
        runner,
        f"{info.path}/{VERIFIED}",
        {**outcome.as_json(), "customer": info.customer, "backup": info.stamp},
    )
    return outcome


def _scratch_restore(
    runner: Runner,
    server: Server,
    info: BackupInfo,
    role: str,
    expected: Mapping[str, int] | None,
    result: Callable[..., Verification],
) -> Verification:
    scratch = f"dbops_verify_{secrets.token_hex(5)}"
    argv = [
        "bash", "-c", _SCRATCH_SCRIPT, "dbops-restore-test", admin_conninfo(server),
        tenant_conninfo(server, role, scratch), scratch, info.dump, server.pg_bin.rstrip("/"),
        ROWCOUNTS_SQL, validate_name(role, "role"),
    ]  # fmt: skip
    ran = runner.run(argv, timeout=RESTORE_TIMEOUT_S)
    if not ran.ok:
        stage = _SCRATCH_STAGES.get(ran.exit_code, f"exit {ran.exit_code}")
        verb = "failed" if ran.exit_code == 21 else f"could not run ({stage})"
        prefix = "pg_restore failed" if ran.exit_code == 21 else f"restore test {verb}"
        return result("crit", f"{prefix}: {_error_line(ran.stderr)}")
    try:
        raw = json.loads(ran.stdout.strip() or "{}")
        found = {str(k): int(v) for k, v in raw.items()}
    except (ValueError, AttributeError):
        return result("crit", "restore test could not read the row counts of the restore")
    rows = sum(found.values())
    if expected is None:
        return result(
            "warn", "restored, but no row counts were recorded at dump time", tables=len(found)
        )
    mismatches = compare_counts(expected, found)
    if mismatches:
        return result(
            "crit",
            "row counts differ after restore: " + "; ".join(mismatches[:5]),
            tables=len(found),
            rows=rows,
            mismatches=tuple(mismatches),
        )
    return result("ok", "restored; row counts match", tables=len(found), rows=rows)


# --- the service ----------------------------------------------------------------------------------


def is_infrastructure(exc: BaseException) -> bool:
    """A failure of what a backup goes through (SSH, the event log, dbops' own database), not
    of the backup itself: worth one retry later in the run. A missing database, a failed
    pg_dump or a full disk is not: it would fail the same way again."""
    if isinstance(exc, NotEnoughSpace):
        return False
    return isinstance(exc, Unreachable | EventLogUnavailable) or is_outage(exc)


@dataclass(frozen=True)
class BackupOutcome:
    customer: str
    server: str
    ok: bool
    backup: str | None = None
    size_bytes: int | None = None
    duration_s: float = 0.0
    error: str | None = None
    pruned: tuple[str, ...] = ()
    # A failure is "crit"; ``infrastructure`` when SSH or the event log failed, not the backup
    # (what the nightly run retries once); ``attempts`` counts that retry.
    verdict: Verdict = "ok"
    infrastructure: bool = False
    attempts: int = 1
    space: Mapping[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "ok": self.ok,
            "verdict": self.verdict,
            "backup": self.backup,
            "size_bytes": self.size_bytes,
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
            "infrastructure": self.infrastructure,
            "attempts": self.attempts,
            "pruned": list(self.pruned),
            "space": dict(self.space) if self.space is not None else None,
        }


@dataclass(frozen=True)
class BackupRun:
    started_at: datetime
    wall_s: float
    parallel: bool
    outcomes: list[BackupOutcome]
    globals: list[BackupOutcome]
    # Events the log could not take by the end of the run (kind, subject): kept in the spool
    # (storage.spool), stored when the log is back, by its recovery, the next run or the next
    # flush_unrecorded(). Everything the spool of this log holds, the run's or not.
    unrecorded: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failed(self) -> list[BackupOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def retried(self) -> list[BackupOutcome]:
        return [o for o in [*self.outcomes, *self.globals] if o.attempts > 1]

    def as_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(),
            "wall_s": round(self.wall_s, 3),
            "parallel": self.parallel,
            "total": len(self.outcomes),
            "ok": self.ok,
            "failed": [o.as_json() for o in self.failed],
            "retried": [o.customer for o in self.retried],
            "unrecorded": [list(u) for u in self.unrecorded],
            "outcomes": [o.as_json() for o in self.outcomes],
            "globals": [g.as_json() for g in self.globals],
        }


@dataclass(frozen=True)
class VerifyOutcome:
    customer: str
    server: str
    backup: str | None
    verification: Verification

    def alert(self) -> Alert:
        """For the incident desk: firing when the test failed, resolved when it passed."""
        v = self.verification
        where = f"{self.customer}'s backup {self.backup or '(none)'}"
        return Alert(
            status="firing" if v.verdict == "crit" else "resolved",
            kind="check",
            dedupe_key=dedupe_key(
                "check", server=self.server, customer=self.customer, check="backup_verified"
            ),
            severity=HEALTH_SEVERITY.get("backup_verified", "P2"),
            title=f"backup_verified critical on {self.customer}: {v.detail}"[:200],
            source="health",
            alertname="backup_verified",
            server=self.server,
            customer=self.customer,
            detail=f"{where}: {v.detail}"[:500],
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "backup": self.backup,
            **self.verification.as_json(),
        }


@dataclass(frozen=True)
class RestorePreview:
    """What the restore modal shows: the backup proposed, its age, and the others to pick."""

    customer: str
    server: str
    database: str
    backup: BackupInfo
    age_s: int
    choices: list[BackupInfo]
    warnings: list[str]
    db_size_bytes: int | None = None
    free_bytes: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "database": self.database,
            "backup": self.backup.as_json(),
            "age_s": self.age_s,
            "verified": self.backup.verified,
            "choices": [
                {
                    "backup": b.stamp,
                    "verified": b.verified,
                    "finished_at": b.finished_at.isoformat() if b.finished_at else None,
                    "size_bytes": b.size_bytes,
                }
                for b in self.choices
            ],
            "warnings": self.warnings,
            "db_size_bytes": self.db_size_bytes,
            "free_bytes": self.free_bytes,
        }


# The steps of a restore, in order, each a ``restore.step`` event between ``restore.started``
# and ``restore.done`` (pgbouncer_reloaded only where the server has pgBouncer).
RESTORE_STEPS = (
    "checked",
    "created",
    "restored",
    "verified",
    "analyzed",
    "settings_copied",
    "connections_ended",
    "swapped",
    "pgbouncer_reloaded",
)


@dataclass(frozen=True)
class RestoreResult:
    customer: str
    server: str
    database: str
    backup: str
    kept_as: str
    tables: int
    rows: int
    duration_s: float
    steps: list[str]
    pgbouncer_reloaded: bool
    # False: the event log was down for some of the restore's events; they are spooled.
    recorded: bool = True

    @property
    def state(self) -> str:
        """What the restore reached, in words."""
        return "restored" if self.recorded else f"restored; {RECORD_LATER}"

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "database": self.database,
            "backup": self.backup,
            "kept_as": self.kept_as,
            "tables": self.tables,
            "rows": self.rows,
            "duration_s": round(self.duration_s, 3),
            "steps": self.steps,
            "pgbouncer_reloaded": self.pgbouncer_reloaded,
            "recorded": self.recorded,
        }


class RestoreFailed(DbopsError):
    """A restore stopped; ``step`` says where, ``original`` what became of the customer's
    database (``untouched`` or ``swapped back``: rolled back either way, or a sentence saying
    it is in an unknown state), ``recorded`` whether the log has every event of it yet."""

    def __init__(self, message: str, *, step: str, original: str, recorded: bool = True) -> None:
        super().__init__(message)
        self.step = step
        self.original = original
        self.recorded = recorded

    @property
    def rolled_back(self) -> bool:
        return self.original in ("untouched", "swapped back")

    @property
    def state(self) -> str:
        """What the restore reached, in words."""
        if self.original == "untouched":
            said = "rolled back: the customer's database is as before (it was never swapped)"
        elif self.original == "swapped back":
            said = "rolled back: the restored copy was swapped out again; the customer's "
            said += "database is as before"
        else:
            said = f"NOT rolled back: the customer's database is {self.original}"
        return said if self.recorded else f"{said}; {RECORD_LATER}"


def _short_name(base: str, suffix: str) -> str:
    """``base_suffix`` within PostgreSQL's 63 bytes, base cut first."""
    return validate_name(f"{base[: 63 - len(suffix) - 1]}_{suffix}", "database")


class Backups(FleetAccess):
    """Backups, restore tests and restores for the fleet; one per process is enough.

    ``failpoints`` is a test seam: names of steps at which to fail on purpose (see the
    ``_failpoint`` calls) so tests can show that a failure there leaves everything as it was.
    """

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        runners: RunnerPool | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        on_alert: Callable[[Alert], object] | None = None,
    ) -> None:
        self.engine = engine
        self.events = events
        self._init_fleet_access(fleet, runners)
        self.clock = clock
        self.on_alert = on_alert
        self.failpoints: set[str] = set()
        self.retry_after_s = RETRY_AFTER_S
        self.lock_deadline_s = LOCK_DEADLINE_S
        self.sleep: Callable[[float], object] = time.sleep  # a test seam, as clock is
        # Backup locks (name, owner) whose release failed (dbops' database down): released
        # once it answers, not left to their lease.
        self._kept_locks: list[tuple[str, str]] = []
        self._kept_locks_lock = threading.Lock()

    # -- events, best effort ---------------------------------------------------------------------

    def _note(self, kind: str, subject: str | None, payload: Mapping[str, Any], actor: str) -> bool:
        """Append an event (True), or, when the log is down, keep it in the log's spool
        (storage.spool.record: on disk in production) to be stored when it is back (False): a
        backup that was taken stays taken whatever the log does, and its record survives the
        process. An event the log refuses for its own sake is logged, not kept (False).

        Each event carries a source_id and the time it happened, given before the first try,
        so one stored by an append that timed out, or by a flush that died before forgetting
        it, is not stored twice, nor with the time of the flush."""
        return record(
            self.events,
            kind,
            subject,
            payload,
            actor=actor,
            source_id=f"backups:{uuid.uuid4().hex}",
        )

    def _record(self, kind: str, subject: str, payload: dict[str, Any]) -> None:
        # The records of the commands this class's own runners run: never the reason a command
        # that ran is reported as failed.
        self._note(kind, subject, payload, "dbops")

    def flush_unrecorded(self) -> list[tuple[str, str | None]]:
        """Store what the spool of this event log holds (events kept while the log was down,
        this object's or any other's, this process's or one that died), oldest first; returns
        (kind, subject) of those still kept (the log is still down), oldest first."""
        flush_spool(self.events)
        return self._still_kept()

    def _still_kept(self) -> list[tuple[str, str | None]]:
        return [(e.kind, e.subject) for e in spool_for(self.events.engine).pending()]

    def _release_kept_locks(self) -> None:
        """Release the backup locks a failed release left behind (best effort: those that
        still cannot be released are kept for the next try)."""
        with self._kept_locks_lock:
            kept, self._kept_locks = self._kept_locks, []
        for i, (name, owner) in enumerate(kept):
            try:
                self._in_time(functools.partial(release_lock, self.engine, name, owner))
            except Exception:
                with self._kept_locks_lock:
                    self._kept_locks[:0] = kept[i:]
                return

    def _in_time(self, work: Callable[[], None]) -> None:
        """``work`` against dbops' database, given up after ``lock_deadline_s``
        (storage.db.DeadlineExceeded, an outage by ``is_infrastructure``)."""
        run = run_inline if runs_inline(self.engine) else run_with_deadline
        run(lambda _attempt: work(), self.lock_deadline_s)

    @contextlib.contextmanager
    def _backup_lock(self, customer: str, actor: str) -> Iterator[None]:
        """The lock ``backup:<customer>`` around one backup, each way given ``lock_deadline_s``.
        A release that fails (dbops' database down or silent at that moment) does not fail the
        backup, which has happened; the lock is kept and released when the database answers
        (``_release_kept_locks``: before the nightly run's retry pass and at its end), not left
        to refuse every backup of that customer for its lease (LOCK_LEASE). So is an acquire
        that failed: its INSERT may have committed before the connection went."""
        name, owner = f"backup:{customer}", f"backup:{customer}:{uuid.uuid4().hex}"
        try:
            self._in_time(
                lambda: acquire_lock(self.engine, name, owner, lease=LOCK_LEASE, holder=actor)
            )
        except LockBusy as exc:
            since = f" since {exc.since:%H:%M} UTC" if exc.since else ""
            raise DbopsError(
                f"a backup of {customer} is already running"
                f" (by {exc.holder or 'another process'}{since}).",
                hint="Wait for it to finish; `/db log` shows its progress.",
            ) from None
        except Exception:
            with self._kept_locks_lock:
                self._kept_locks.append((name, owner))
            raise
        try:
            yield
        finally:
            try:
                self._in_time(lambda: release_lock(self.engine, name, owner))
            except Exception as exc:
                log.warning(
                    "the lock of a backup of %s was not released (%s); released when dbops'"
                    " database answers again",
                    customer,
                    type(exc).__name__,
                )
                with self._kept_locks_lock:
                    self._kept_locks.append((name, owner))

    def _failpoint(self, name: str) -> None:
        if name in self.failpoints:
            raise DbopsError(f"failpoint {name} (a test stopped here on purpose).")

    def _where(self, customer: str) -> tuple[Customer, Server, Runner]:
        c = get_customer(self.engine, customer)
        server = self.fleet.server(c.server)
        return c, server, self.runners.get(server.name)

    def _locked(self, name: str, actor: str, what: str) -> _Held:
        return _Held(self.engine, name, actor, what)

    # -- listing and taking ----------------------------------------------------------------------

    def list_backups(self, customer: str) -> list[BackupInfo]:
        """The customer's backups on its server, newest first (complete, failed and unfinished)."""
        c, server, runner = self._where(customer)
        return read_backups(runner, server, c.name)

    def take_backup(self, customer: str, actor: str, *, prune: bool = False) -> BackupInfo:
        """Back up one customer now (``/db backup acme``). Retention is the nightly run's job
        (``prune`` applies it here too): a backup taken by hand before a risky change must not
        make the night's disappear, nor the other way round, before the policy says so."""
        c, server, runner = self._where(customer)
        self._release_kept_locks()
        outcome = self._backup_one(c, server, runner, actor, prune=prune)
        if not outcome.ok:
            raise DbopsError(f"the backup of {c.name} failed: {outcome.error}")
        found = [b for b in read_backups(runner, server, c.name) if b.stamp == outcome.backup]
        if not found:
            raise NotFound(f"the new backup {outcome.backup} of {c.name} is not on {server.name}.")
        return found[0]

    def _backup_one(
        self,
        c: Customer,
        server: Server,
        runner: Runner,
        actor: str,
        *,
        prune: bool,
        attempt: int = 1,
    ) -> BackupOutcome:
        """One customer's backup; any failure (of any kind) is recorded and returned, not
        raised, so a run goes on to the next customer."""
        started = time.monotonic()
        try:
            with self._backup_lock(c.name, actor):
                status = write_backup(runner, server, c.name, c.database, now=self.clock())
                pruned = self._prune(runner, server, c.name, actor) if prune else []
        except Exception as exc:
            return self._failed(c.name, server.name, c.database, exc, started, actor, attempt)
        took = time.monotonic() - started
        stamp = status["path"].rsplit("/", 1)[-1]
        self._note(
            "backup.taken",
            c.name,
            {
                "server": server.name,
                "database": c.database,
                "backup": stamp,
                "size_bytes": status["size_bytes"],
                "sha256": status["sha256"],
                "tables": status["tables"],
                "rows": status["rows"],
                "duration_ms": int(took * 1000),
                "pruned": pruned,
                "attempt": attempt,
                "space": status["space"],
            },
            actor,
        )
        return BackupOutcome(
            c.name,
            server.name,
            True,
            stamp,
            status["size_bytes"],
            took,
            pruned=tuple(pruned),
            attempts=attempt,
            space=status["space"],
        )

    def _failed(
        self,
        customer: str,
        server: str,
        database: str | None,
        exc: Exception,
        started: float,
        actor: str,
        attempt: int,
    ) -> BackupOutcome:
        infra = is_infrastructure(exc)
        if not isinstance(exc, DbopsError) and not infra:
            log.error("backup of %s on %s failed", customer, server, exc_info=exc)
        space = exc.space.as_json() if isinstance(exc, NotEnoughSpace) else None
        error = _error_text(exc)
        payload: dict[str, Any] = {"server": server, "error": error, "attempt": attempt}
        if database is not None:
            payload["database"] = database
        payload.update(infrastructure=infra, space=space)
        if customer == GLOBALS:
            self._note("backup.globals_failed", server, payload, actor)
        else:
            self._note("backup.failed", customer, payload, actor)
        return BackupOutcome(
            customer,
            server,
            False,
            duration_s=time.monotonic() - started,
            error=error,
            verdict="crit",
            infrastructure=infra,
            attempts=attempt,
            space=space,
        )

    def _prune(self, runner: Runner, server: Server, customer: str, actor: str) -> list[str]:
        policy = self.fleet.backups
        _, delete = plan_retention(
            read_backups(runner, server, customer),
            policy.keep_daily,
            policy.keep_weekly,
            self.clock(),
        )
        for b in delete:
            _remove_backup(runner, server, customer, b.stamp)
        return [b.stamp for b in delete]

    def backup_globals(self, server_name: str, actor: str, *, attempt: int = 1) -> BackupOutcome:
        started = time.monotonic()
        try:
            server = self.fleet.server(server_name)
            runner = self.runners.get(server.name)
            status = write_globals(runner, server, now=self.clock())
            pruned = self._prune(runner, server, GLOBALS, actor)
        except Exception as exc:
            return self._failed(GLOBALS, server_name, None, exc, started, actor, attempt)
        stamp = status["path"].rsplit("/", 1)[-1]
        took = time.monotonic() - started
        self._note(
            "backup.globals",
            server.name,
            {"backup": stamp, "size_bytes": status["size_bytes"], "pruned": pruned},
            actor,
        )
        return BackupOutcome(
            GLOBALS,
            server.name,
            True,
            stamp,
            status["size_bytes"],
            took,
            pruned=tuple(pruned),
            attempts=attempt,
        )

    def backup_all(self, *, parallel: bool = True, actor: str = "scheduler") -> BackupRun:
        """The nightly run: every active customer's database, plus globals, on every server.

        Servers run side by side (``parallel``), each server's databases one after another so a
        server's disk and CPU serve one pg_dump at a time. Customers are independent: a failure
        of any kind is recorded (``backup.failed``) and the run goes on to the next customer;
        the result lists the failures.

        The retry: a failure of the infrastructure rather than of the backup (SSH, the event
        log, the database dbops keeps its state in: ``is_infrastructure``) is retried once,
        in the same run, after the first pass over every server has finished and then
        ``retry_after_s`` (RETRY_AFTER_S) more seconds have passed; the second pass runs the
        same way (servers side by side), globals too. Events the log could not take are kept
        in its spool (storage.spool, on disk in production: they outlive the process) and
        stored once it is back (before the retry pass, at the end of the run, by the log's
        recovery, or by the next run); those still kept at the end are listed in
        ``BackupRun.unrecorded``. Backup locks whose release failed are released at the same
        moments (``_backup_lock``).
        """
        started_at, t0 = self.clock(), time.monotonic()
        self._release_kept_locks()
        self.flush_unrecorded()
        customers = [c for c in list_customers(self.engine) if c.status == "active"]
        by_server: dict[str, list[Customer]] = {s.name: [] for s in self.fleet.servers}
        for c in customers:
            by_server.setdefault(c.server, []).append(c)

        servers = {s.name for s in self.fleet.servers}
        first = self._pass(by_server, servers, parallel, actor, attempt=1)
        again = {
            name: [c for c in mine if first[c.name].infrastructure]
            for name, mine in by_server.items()
        }
        globals_again = {
            name for name in by_server if (g := first.get(f"{GLOBALS}@{name}")) and g.infrastructure
        }
        if any(again.values()) or globals_again:
            self.sleep(self.retry_after_s)
            self._release_kept_locks()
            self.flush_unrecorded()
            first.update(self._pass(again, globals_again, parallel, actor, attempt=2))

        outcomes = [first[c.name] for mine in by_server.values() for c in mine]
        glob = [first[f"{GLOBALS}@{name}"] for name in by_server if name in servers]
        self._release_kept_locks()
        unrecorded = self.flush_unrecorded()
        run = BackupRun(started_at, time.monotonic() - t0, parallel, outcomes, glob)
        self._note(
            "backup.run",
            "backups",
            {
                "parallel": parallel,
                "total": len(outcomes),
                "ok": run.ok,
                "failed": [o.customer for o in run.failed],
                "retried": [o.customer for o in run.retried],
                "globals_failed": [g.server for g in glob if not g.ok],
                "unrecorded": len(unrecorded),
                "wall_ms": int(run.wall_s * 1000),
            },
            actor,
        )
        run.unrecorded.extend(self._still_kept())  # the run's own record among them, if kept
        return run

    def _pass(
        self,
        by_server: Mapping[str, Sequence[Customer]],
        with_globals: set[str],
        parallel: bool,
        actor: str,
        *,
        attempt: int,
    ) -> dict[str, BackupOutcome]:
        """One pass of the nightly run: outcomes by customer name (``_globals@<server>``)."""

        def one_server(name: str) -> dict[str, BackupOutcome]:
            out: dict[str, BackupOutcome] = {}
            mine = by_server.get(name, [])
            started = time.monotonic()
            try:
                server = self.fleet.server(name)
                runner = self.runners.get(name)
            except Exception as exc:
                for c in mine:
                    out[c.name] = self._failed(
                        c.name, name, c.database, exc, started, actor, attempt
                    )
                if name in with_globals:
                    out[f"{GLOBALS}@{name}"] = self._failed(
                        GLOBALS, name, None, exc, started, actor, attempt
                    )
                return out
            for c in mine:
                out[c.name] = self._backup_one(
                    c, server, runner, actor, prune=True, attempt=attempt
                )
            if name in with_globals:
                out[f"{GLOBALS}@{name}"] = self.backup_globals(name, actor, attempt=attempt)
            return out

        names = [n for n in by_server if by_server[n] or n in with_globals]
        if parallel and len(names) > 1:
            with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="backup") as pool:
                results = list(pool.map(one_server, names))
        else:
            results = [one_server(n) for n in names]
        return {k: v for r in results for k, v in r.items()}

    # -- restore tests ---------------------------------------------------------------------------

    def verify(
        self, customer: str, backup: str | None = None, *, actor: str = "scheduler"
    ) -> VerifyOutcome:
        """Restore-test one backup (the newest complete one by default)."""
        c, server, runner = self._where(customer)
        backups = read_backups(runner, server, c.name)
        info = self._pick(c.name, backups, backup, prefer_verified=False)
        verification = verify_backup(runner, server, info, role=c.role, now=self.clock)
        outcome = VerifyOutcome(c.name, server.name, info.stamp, verification)
        self._report_verify(outcome, actor)
        return outcome

    def _report_verify(self, outcome: VerifyOutcome, actor: str) -> None:
        v = outcome.verification
        self.events.append(
            "backup.verified" if v.verdict != "crit" else "backup.verify_failed",
            outcome.customer,
            {"server": outcome.server, "backup": outcome.backup, **v.as_json()},
            actor=actor,
        )
        if self.on_alert is not None:
            self.on_alert(outcome.alert())

    def verify_all(self, *, parallel: bool = True, actor: str = "scheduler") -> list[VerifyOutcome]:
        """The scheduled restore test: each active customer's newest complete backup, servers
        side by side, one restore at a time per server. A customer with no complete backup
        gets a crit result (there is nothing that could be restored)."""
        customers = [c for c in list_customers(self.engine) if c.status == "active"]
        by_server: dict[str, list[Customer]] = {}
        for c in customers:
            by_server.setdefault(c.server, []).append(c)

        def one(c: Customer) -> VerifyOutcome:
            try:
                return self.verify(c.name, actor=actor)
            except DbopsError as exc:
                v = Verification(False, "crit", self.clock(), exc.message[:300])
                outcome = VerifyOutcome(c.name, c.server, None, v)
                self._report_verify(outcome, actor)
                return outcome

        def server_run(name: str) -> list[VerifyOutcome]:
            return [one(c) for c in by_server[name]]

        if parallel and len(by_server) > 1:
            with ThreadPoolExecutor(
                max_workers=len(by_server), thread_name_prefix="verify"
            ) as pool:
                results = list(pool.map(server_run, list(by_server)))
        else:
            results = [server_run(n) for n in by_server]
        return [o for outs in results for o in outs]

    # -- restore ---------------------------------------------------------------------------------

    @staticmethod
    def _pick(
        customer: str, backups: Sequence[BackupInfo], stamp: str | None, *, prefer_verified: bool
    ) -> BackupInfo:
        complete = [b for b in backups if b.complete]
        if stamp is not None:
            parse_stamp(stamp)
            for b in backups:
                if b.stamp == stamp:
                    if not b.complete:
                        raise DbopsError(
                            f"backup {stamp} of {customer} is {b.state}; it cannot be restored.",
                            hint="Pick a complete one from `/db backups " + customer + "`.",
                        )
                    return b
            raise NotFound(
                f"no backup {stamp} of {customer}.",
                hint=f"`/db backups {customer}` lists them.",
            )
        if not complete:
            raise NotFound(
                f"{customer} has no complete backup.",
                hint=f"Take one with `/db backup {customer}`.",
            )
        if prefer_verified:
            for b in complete:
                if b.verified:
                    return b
        return complete[0]

    def restore_preview(self, customer: str, backup: str | None = None) -> RestorePreview:
        """For the restore modal: the newest restore-tested backup (or ``backup``), its age, the
        complete backups to choose from, and what the admin should know before typing the name."""
        c, server, runner = self._where(customer)
        backups = read_backups(runner, server, c.name)
        chosen = self._pick(c.name, backups, backup, prefer_verified=True)
        now = self.clock()
        warnings = []
        if not chosen.verified:
            if chosen.verification is not None:
                warnings.append(
                    f"backup {chosen.stamp} FAILED its restore test: {chosen.verification.detail}"
                )
            else:
                warnings.append(f"backup {chosen.stamp} has not been restore-tested yet.")
        newer = [b for b in backups if b.complete and b.stamp > chosen.stamp]
        if newer:
            warnings.append(
                f"{len(newer)} newer backup(s) exist; the newest is {newer[0].stamp}"
                + (" (not restore-tested)" if not newer[0].verified else "")
            )
        size = free = None
        try:
            size = self._db_size(runner, server, c.database)
            free = self._free_bytes(runner, server)
        except DbopsError as exc:
            warnings.append(f"could not check disk space: {exc.message[:150]}")
        if size is not None and free is not None and free < size * 2:
            warnings.append(
                f"{server.name} has {free // 2**20} MB free; the restore keeps the current "
                f"database ({size // 2**20} MB) beside the restored one."
            )
        return RestorePreview(
            c.name,
            server.name,
            c.database,
            chosen,
            chosen.age_s(now),
            [b for b in backups if b.complete][:100],
            warnings,
            size,
            free,
        )

    @staticmethod
    def _db_size(runner: Runner, server: Server, database: str) -> int | None:
        out = sql_json(
            runner,
            server,
            sql.SQL(
                "SELECT pg_catalog.to_json(pg_catalog.pg_database_size(datname))"
                " FROM pg_catalog.pg_database WHERE datname = {}"
            ).format(sql.Literal(database)),
        )
        return int(out) if out is not None else None

    @staticmethod
    def _free_bytes(runner: Runner, server: Server) -> int | None:
        out = runner.run(["df", "-P", "-B1", "--", server.data_path]).check().stdout.splitlines()
        fields = out[-1].split() if len(out) > 1 else []
        return int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else None

    def restore(
        self, customer: str, backup: str | None, typed_name: str, actor: str
    ) -> RestoreResult:
        """Restore ``customer`` from ``backup`` (the modal's choice; None: the preview's default).

        ``typed_name`` must be the customer's name exactly. Each step is an event
        ``restore.step`` (``RESTORE_STEPS``); a failure of any kind is ``restore.failed`` and a
        RestoreFailed saying whether the customer's database was untouched or swapped back. The
        old database is kept, renamed ``<db>_pre_<UTC time>``, with connections off.

        The events are written best-effort (storage.spool): an event log that is down never
        stops a restore half-way; what it could not take is stored when it is back, and
        ``recorded`` on the result or the error says so.
        """
        validate_name(customer)
        if typed_name.strip() != customer:
            record(
                self.events,
                "restore.refused",
                customer,
                {"reason": "typed name does not match", "backup": backup},
                actor=actor,
            )
            raise DbopsError(
                f"the name typed does not match {customer!r}; nothing was restored.",
                hint="Type the customer's name exactly to confirm.",
            )
        c, server, runner = self._where(customer)
        with self._locked(f"restore:{c.name}", actor, f"a restore of {c.name}"):
            return self._restore(c, server, runner, backup, actor)

    def _restore(
        self, c: Customer, server: Server, runner: Runner, backup: str | None, actor: str
    ) -> RestoreResult:
        t0 = time.monotonic()
        now = self.clock()
        info = self._pick(
            c.name, read_backups(runner, server, c.name), backup, prefer_verified=True
        )
        suffix = now.strftime("%Y%m%d_%H%M%S")
        db = validate_name(c.database, "database")
        names = _SwapNames(
            db=db,
            new=_short_name(db, f"restore_{suffix}"),
            old=_short_name(db, f"pre_{suffix}"),
            failed=_short_name(db, f"failed_{suffix}"),
        )
        new, old = names.new, names.old
        ctx = {"server": server.name, "database": db, "backup": info.stamp}
        steps: list[str] = []
        kept: list[str] = []  # events of this restore the log could not take yet (spooled)

        def note(kind: str, **payload: Any) -> None:
            if not record(self.events, kind, c.name, {**ctx, **payload}, actor=actor):
                kept.append(kind)

        def step(name: str, **payload: Any) -> None:
            steps.append(name)
            note("restore.step", step=name, **payload)

        current = "check"
        swapped = False
        allow_before = True
        try:
            note("restore.started", new_database=new, keep_as=old)
            allow_before = self._allows_connections(runner, server, db)
            seen = _inspect(runner, info)
            if seen.problem is not None:
                raise DbopsError(seen.problem)
            expected = seen.counts
            if expected is None:
                raise DbopsError(f"backup {info.stamp} has no row counts to verify a restore by.")
            step("checked", sha256=info.sha256)
            current = "create"
            _create_database(runner, server, new, owner=c.role, like=db)
            step("created", new_database=new)
            current = "pg_restore"
            failed = _pg_restore(runner, server, info.dump, new, c.role)
            if failed is not None:
                raise DbopsError(failed)
            self._failpoint("restore.after_pg_restore")
            step("restored")
            current = "verify"
            found = _restored_counts(runner, server, new, c.role)
            mismatches = compare_counts(expected, found)
            if mismatches:
                raise DbopsError("row counts differ after restore: " + "; ".join(mismatches[:5]))
            step("verified", tables=len(found), rows=sum(found.values()))
            current = "analyze"
            # pg_restore leaves no planner statistics and no vacuum on record: without this the
            # customer's first queries are planned blind and last_vacuum reads unknown.
            _analyze_as_owner(runner, server, new, c.role)
            step("analyzed")
            current = "settings"
            self._copy_database_settings(runner, server, db, new)
            step("settings_copied")
            current = "end_connections"
            self._end_connections(runner, server, db)
            step("connections_ended")
            current = "swap"
            self._swap(runner, server, db, old, new)
            swapped = True
            step("swapped", kept_as=old)
            current = "pgbouncer"
            self._failpoint("restore.after_swap")
            reloaded = self._reload_pgbouncer(runner, server)
            if reloaded:
                step("pgbouncer_reloaded")
            current = "check_after"
            run_sql(runner, server, "SELECT 1", dbname=db)
        except BaseException as exc:
            # Whatever stopped it (an SSH error, a bug, an interrupt): put the customer's
            # database back first, then say so.
            original = self._settle(runner, server, names, allow_before, swapped)
            if isinstance(exc, DbopsError):
                error = exc.message
            else:
                error = f"an unexpected error ({type(exc).__name__})."
                log.error("restore of %s failed at %s", c.name, current, exc_info=exc)
            note("restore.failed", step=current, error=error[:300], original=original)
            if not isinstance(exc, Exception):
                raise
            raise RestoreFailed(
                f"the restore of {c.name} from {info.stamp} failed at {current}: "
                f"{error[:250]} The customer's database is {original}.",
                step=current,
                original=original,
                recorded=not kept or caught_up(self.events),
            ) from (None if isinstance(exc, DbopsError) else exc)
        took = time.monotonic() - t0
        result = RestoreResult(
            c.name,
            server.name,
            db,
            info.stamp,
            old,
            len(found),
            sum(found.values()),
            took,
            steps,
            reloaded,
        )
        done = result.as_json()
        del done["recorded"]  # known only once this event is written or kept
        note("restore.done", **done)
        return replace(result, recorded=not kept or caught_up(self.events))

    def _copy_database_settings(self, runner: Runner, server: Server, db: str, new: str) -> None:
        """CONNECT grants, connection limit and per-database settings of ``db`` onto ``new``:
        they belong to the database object, which a restore does not carry over."""
        script = sql.SQL(
            """
DO $dbops$
DECLARE r record; acl aclitem[];
BEGIN
  SELECT datacl INTO acl FROM pg_catalog.pg_database WHERE datname = {old_l};
  IF acl IS NOT NULL THEN
    EXECUTE pg_catalog.format('REVOKE ALL ON DATABASE %I FROM PUBLIC', {new_l});
    FOR r IN SELECT a.grantee, a.privilege_type, a.is_grantable
             FROM pg_catalog.aclexplode(acl) a LOOP
      EXECUTE pg_catalog.format('GRANT %s ON DATABASE %I TO %s%s', r.privilege_type, {new_l},
        CASE WHEN r.grantee = 0 THEN 'PUBLIC'
             ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(r.grantee)) END,
        CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
  ELSE
    EXECUTE pg_catalog.format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC', {new_l});
  END IF;
  EXECUTE pg_catalog.format('ALTER DATABASE %I CONNECTION LIMIT %s', {new_l},
    (SELECT datconnlimit FROM pg_catalog.pg_database WHERE datname = {old_l}));
  FOR r IN SELECT s.setrole, pg_catalog.split_part(c, '=', 1) AS name,
                  pg_catalog.substr(c, pg_catalog.strpos(c, '=') + 1) AS value
           FROM pg_catalog.pg_db_role_setting s
           JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase,
                pg_catalog.unnest(s.setconfig) AS c
           WHERE d.datname = {old_l} LOOP
    IF r.setrole = 0 THEN
      EXECUTE pg_catalog.format('ALTER DATABASE %I SET %I = %L', {new_l}, r.name, r.value);
    ELSE
      EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I SET %I = %L',
        pg_catalog.pg_get_userbyid(r.setrole), {new_l}, r.name, r.value);
    END IF;
  END LOOP;
END
$dbops$
"""
        ).format(old_l=sql.Literal(db), new_l=sql.Literal(new))
        run_sql(runner, server, script)

    @staticmethod
    def _end_connections(runner: Runner, server: Server, db: str) -> None:
        """Close ``db`` to new sessions and end the ones it has (waiting until they are gone)."""
        close = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(_ident(db))
        # Committed first (psql runs each statement in its own transaction): from then on no
        # session can arrive, so the loop below only has to wait for the ones it ended.
        script = sql.SQL(
            """
DO $dbops$
DECLARE remaining int;
BEGIN
  FOR i IN 1..{tries} LOOP
    -- pg_stat_activity is a snapshot held for the transaction: take a fresh one each time.
    PERFORM pg_catalog.pg_stat_clear_snapshot();
    PERFORM pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
      WHERE datname = {db_l} AND pid <> pg_catalog.pg_backend_pid();
    PERFORM pg_catalog.pg_stat_clear_snapshot();
    SELECT pg_catalog.count(*) INTO remaining FROM pg_catalog.pg_stat_activity
      WHERE datname = {db_l} AND pid <> pg_catalog.pg_backend_pid();
    IF remaining = 0 THEN RETURN; END IF;
    PERFORM pg_catalog.pg_sleep(0.02);
  END LOOP;
  RAISE EXCEPTION 'sessions on % did not end within {secs} s', {db_l};
END
$dbops$
"""
        ).format(
            db_l=sql.Literal(db),
            tries=sql.SQL(str(SESSIONS_END_S * 50)),
            secs=sql.SQL(str(SESSIONS_END_S)),
        )
        run_sql(runner, server, [close, script])

    def _swap(self, runner: Runner, server: Server, db: str, old: str, new: str) -> None:
        """Both renames in one transaction: either both happen or neither does."""
        statements: list[str | sql.Composable] = [
            "BEGIN",
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(db), _ident(old)),
        ]
        if "restore.between_renames" in self.failpoints:
            # An error after the first rename, inside the transaction: what a crash, a lost
            # connection or a conflicting session there would do.
            statements.append("SELECT dbops_failpoint_between_renames()")
        statements += [
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(new), _ident(db)),
            "COMMIT",
        ]
        run_sql(runner, server, statements)

    @staticmethod
    def _allows_connections(runner: Runner, server: Server, db: str) -> bool:
        found = sql_json(
            runner,
            server,
            sql.SQL(
                "SELECT pg_catalog.to_json(datallowconn) FROM pg_catalog.pg_database"
                " WHERE datname = {}"
            ).format(sql.Literal(db)),
        )
        if found is None:
            raise NotFound(f"there is no database {db} on {server.name} to restore over.")
        return bool(found)

    def _settle(
        self, runner: Runner, server: Server, n: _SwapNames, allow_before: bool, swapped: bool
    ) -> str:
        """After a failure: put the customer's database back as it was; say what was done."""
        db, old, new = n.db, n.old, n.new
        try:
            names = set(
                sql_json(
                    runner,
                    server,
                    sql.SQL(
                        "SELECT COALESCE(pg_catalog.json_agg(datname), '[]')"
                        " FROM pg_catalog.pg_database WHERE datname IN ({}, {}, {})"
                    ).format(sql.Literal(db), sql.Literal(old), sql.Literal(new)),
                )
                or []
            )
            if old in names and db in names:
                # The swap committed (whatever was reported): swap back.
                failed = n.failed
                self._end_connections(runner, server, db)
                run_sql(
                    runner,
                    server,
                    [
                        "BEGIN",
                        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                            _ident(db), _ident(failed)
                        ),
                        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(old), _ident(db)),
                        "COMMIT",
                    ],
                )
                new, outcome = failed, "swapped back"
            else:
                outcome = "untouched"
            if allow_before and db in names:
                run_sql(
                    runner,
                    server,
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(_ident(db)),
                )
            if new in names or outcome == "swapped back":
                _drop_database(runner, server, new)
            if swapped or outcome == "swapped back":
                self._reload_pgbouncer(runner, server)
            return outcome
        except Exception as exc:
            if isinstance(exc, DbopsError):
                error = exc.message
            else:
                error = f"an unexpected error ({type(exc).__name__})"
                log.error("putting %s back on %s failed", db, server.name, exc_info=exc)
            record(
                self.events,
                "restore.rollback_failed",
                db,
                {"server": server.name, "error": error[:300], "new": new, "old": old},
                actor="dbops",
            )
            return (
                f"in an UNKNOWN state (putting it back failed: {error[:150]}); "
                f"check {server.name} by hand for {db}, {old} and {new}"
            )

    @staticmethod
    def _reload_pgbouncer(runner: Runner, server: Server) -> bool:
        if not server.pgbouncer_ini:
            return False
        runner.run(server.argv(server.pgbouncer_reload_command)).check()
        return True


@dataclass(frozen=True)
class _SwapNames:
    db: str  # the customer's database
    new: str  # restored into, then renamed to db
    old: str  # what db becomes: kept
    failed: str  # what a restored database is renamed to when swapped back


class _Held:
    """A context manager around op_lock that turns LockBusy into a DbopsError people can read."""

    def __init__(self, engine: Engine, name: str, actor: str, what: str) -> None:
        self._cm = op_lock(
            engine, name, f"{name}:{uuid.uuid4().hex}", lease=LOCK_LEASE, holder=actor
        )
        self._what = what

    def __enter__(self) -> None:
        try:
            self._cm.__enter__()
        except LockBusy as exc:
            since = f" since {exc.since:%H:%M} UTC" if exc.since else ""
            raise DbopsError(
                f"{self._what} is already running (by {exc.holder or 'another process'}{since}).",
                hint="Wait for it to finish; `/db log` shows its progress.",
            ) from None

    def __exit__(self, *exc: object) -> None:
        # Best effort: what ran under the lock has happened, and dbops' database being down
        # now must not turn it into a failure; an unreleased lock ends with its lease.
        try:
            self._cm.__exit__(None, None, None)
        except Exception as error:
            log.warning(
                "%s: its lock was not released (%s); it ends with its lease (%s)",
                self._what,
                type(error).__name__,
                LOCK_LEASE,
            )


__all__ = [
    "GLOBALS",
    "BackupInfo",
    "BackupOutcome",
    "BackupRun",
    "Backups",
    "RestoreFailed",
    "RestorePreview",
    "RestoreResult",
    "Verification",
    "VerifyOutcome",
    "backup_files_argv",
    "backup_verified_check",
    "backups_from_files",
    "parse_backup_files",
    "plan_retention",
    "read_backups",
    "verify_backup",
    "write_backup",
    "write_globals",
]
