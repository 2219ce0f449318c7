"""Talking to PostgreSQL and the filesystem on a customer's server, through its runner."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from core.backups.common import DUMP_TIMEOUT_S, SQL_TIMEOUT_S, _json, stamp_of
from core.errors import DbopsError
from core.fleet import Server
from core.names import validate_name
from core.remote import CommandResult, Runner
from storage.events import scrub_text

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


def _error_line(stderr: str) -> str:
    """The line that says what went wrong (pg_restore's "error:" line rather than a DETAIL
    line, which can quote a customer's data)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    picked = next((ln for ln in lines if "error:" in ln.lower() or "ERROR:" in ln), None)
    return (picked or (lines[-1] if lines else ""))[:200]
