"""Restore tests: a backup restored into a scratch database and its row counts compared."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from core.backups.client import client_for
from core.backups.common import RESTORE_TIMEOUT_S, VERIFIED, Verdict, utcnow
from core.backups.listing import BackupInfo, Verification
from core.backups.server import (
    ROWCOUNTS_SQL,
    _error_line,
    _ident,
    admin_conninfo,
    compare_counts,
    psql_argv,
    run_sql,
    script_error,
    sql_json,
    tenant_conninfo,
    write_json_last,
)
from core.fleet import Server
from core.names import validate_name
from core.remote import Runner

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
    client = client_for(runner, server)  # reads what pg_dump wrote, into this server
    argv = client.restore_argv(tenant_conninfo(server, role, into), dump)
    result = runner.run(argv, timeout=RESTORE_TIMEOUT_S)
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
admin=$1; target=$2; name=$3; dump=$4; bin=$5; counts_sql=$6; owner=$7; via_sql=$8
"$bin/createdb" --maintenance-db="$admin" -T template0 -O "$owner" -- "$name" || exit 20
trap '"$bin/dropdb" --maintenance-db="$admin" --if-exists -- "$name" >/dev/null' EXIT
printf 'REVOKE ALL ON DATABASE :"db" FROM PUBLIC;\n' |
  "$bin/psql" -X -q -v ON_ERROR_STOP=1 -v db="$name" -d "$admin" -f - || exit 20
if [ "$via_sql" = 1 ]; then  # see core.backups.client.Client.restores_via_sql
  "$bin/pg_restore" --no-owner -f - "$dump" | sed '1,60{/^SET transaction_timeout = 0;$/d;}' |
    "$bin/psql" -X -q -v ON_ERROR_STOP=1 --single-transaction -d "$target" -f - >/dev/null ||
    exit 21
else
  "$bin/pg_restore" --exit-on-error --single-transaction --no-owner -d "$target" "$dump" || exit 21
fi
"$bin/psql" -X -q -A -t -v ON_ERROR_STOP=1 -d "$target" -c "$counts_sql" || exit 22
"""
_SCRATCH_STAGES = {20: "creating the scratch database", 21: "pg_restore", 22: "counting rows"}


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
    client = client_for(runner, server)  # pg_restore as new as the pg_dump that wrote it
    argv = [
        "bash", "-c", _SCRATCH_SCRIPT, "dbops-restore-test", admin_conninfo(server),
        tenant_conninfo(server, role, scratch), scratch, info.dump, client.bin.rstrip("/"),
        ROWCOUNTS_SQL, validate_name(role, "role"), "1" if client.restores_via_sql else "0",
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
