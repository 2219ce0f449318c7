"""pgbouncer: the admin console's SHOW DATABASES and SHOW POOLS against the customer databases."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from core.errors import Unreachable
from core.fleet import Server
from core.health.queries import APP_NAME, Limits, pg_error_text
from core.health.thresholds import (
    VERDICT_RANK,
    BadThreshold,
    Check,
    Verdict,
    _unknown,
    optional_seconds,
)
from core.units import pretty_age

# --- pgBouncer -------------------------------------------------------------------------------

# Names shown in a detail before "+N more".
PGBOUNCER_NAMES_SHOWN = 5


@dataclass(frozen=True)
class PgBouncerStats:
    """What pgBouncer's admin console said: SHOW DATABASES by name, SHOW POOLS rows."""

    databases: dict[str, dict[str, Any]]
    pools: list[dict[str, Any]]


def pgbouncer_conninfo(server: Server, limits: Limits) -> str:
    """The monitoring DSN pointed at pgBouncer's admin console (``dbname=pgbouncer``).

    No ``options``: pgBouncer refuses startup parameters it does not know, and its console has
    no statements that could run away.
    """
    params: dict[str, Any] = {
        k: v for k, v in pg_conninfo.conninfo_to_dict(server.dsn).items() if k != "options"
    }
    params.update(
        port=server.pgbouncer_port,
        dbname="pgbouncer",
        application_name=APP_NAME,
        connect_timeout=limits.connect_timeout_s,
    )
    return pg_conninfo.make_conninfo("", **params)


def _console_rows(conn: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    # No parameters: the simple query protocol, the only one the console speaks.
    cur = conn.execute(command)
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def fetch_pgbouncer(server: Server, limits: Limits) -> PgBouncerStats:
    """One console connection (autocommit: the console takes no BEGIN), two SHOW commands."""
    try:
        with psycopg.connect(pgbouncer_conninfo(server, limits), autocommit=True) as conn:
            databases = _console_rows(conn, "SHOW DATABASES")
            pools = _console_rows(conn, "SHOW POOLS")
    except psycopg.Error as exc:
        text = pg_error_text(exc).replace("is PostgreSQL running?", "is pgBouncer running?")
        raise Unreachable(text) from None
    return PgBouncerStats({str(d["name"]): d for d in databases}, pools)


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:PGBOUNCER_NAMES_SHOWN])
    more = len(items) - PGBOUNCER_NAMES_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def check_pgbouncer(
    stats: PgBouncerStats | None,
    databases: Sequence[str],
    waiting_limits: tuple[object, object],
    maxwait_limits: tuple[object, object],
    error: str = "",
) -> Check:
    """pgBouncer in front of a server's customer ``databases``.

    crit: the console does not answer; a customer database not registered in [databases] (or
    DISABLEd); value: the most clients one database has waiting for a server connection
    (check_postgres's pgb_pool_cl_waiting, ``waiting_limits``), the longest wait
    (pgb_pool_maxwait, ``maxwait_limits``) raising the verdict too. A PAUSEd one warns.
    """
    name = "pgbouncer"
    try:
        ww, wc = (_count(v, "pgb_pool_cl_waiting") for v in waiting_limits)
        mw, mc = (optional_seconds(v, "pgb_pool_maxwait") for v in maxwait_limits)
    except BadThreshold as exc:
        return _unknown(name, exc)
    if stats is None:
        return Check(name, "crit", None, ww, wc, f"pgBouncer not answering: {error}")
    verdict: Verdict = "ok"
    problems: list[str] = []

    def worse(v: Verdict) -> None:
        nonlocal verdict
        if VERDICT_RANK[v] > VERDICT_RANK[verdict]:
            verdict = v

    expected = sorted(set(databases))
    missing = [d for d in expected if d not in stats.databases]
    if missing:
        worse("crit")
        problems.append(f"not registered: {_names(missing)}")
    flags: tuple[tuple[str, Verdict], ...] = (("disabled", "crit"), ("paused", "warn"))
    for flag, level in flags:
        hit = [d for d in expected if d in stats.databases and _int(stats.databases[d].get(flag))]
        if hit:
            worse(level)
            problems.append(f"{flag}: {_names(hit)}")

    waiting: dict[str, int] = {}
    longest: dict[str, float] = {}
    for pool in stats.pools:
        db = str(pool.get("database"))
        if db == "pgbouncer":  # the console itself, where this check sits
            continue
        waiting[db] = waiting.get(db, 0) + _int(pool.get("cl_waiting"))
        wait_s = _int(pool.get("maxwait")) + _int(pool.get("maxwait_us")) / 1_000_000
        longest[db] = max(longest.get(db, 0.0), wait_s)
    slow = []
    for db in sorted(waiting, key=lambda d: (-waiting[d], -longest[d], d)):
        n, s = waiting[db], longest[db]
        if not n:
            continue
        if (wc is not None and n >= wc) or (mc is not None and s >= mc):
            worse("crit")
        elif (ww is not None and n >= ww) or (mw is not None and s >= mw):
            worse("warn")
        slow.append(f"{db}: {n} waiting, longest {pretty_age(int(s))}")
    most = max(waiting.values(), default=0)
    if slow:
        problems.append("clients waiting for a server connection: " + _names(slow))
    if problems:
        return Check(name, verdict, most, ww, wc, "; ".join(problems))
    registered = len(expected)
    return Check(
        name,
        "ok",
        most,
        ww,
        wc,
        f"{registered} customer database{'' if registered == 1 else 's'} registered, "
        "no client waiting",
    )


def _count(value: object, check: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)):
        raise BadThreshold(f"{check}: {value!r} is not a number of clients")
    return int(str(value))


def _int(value: object) -> int:
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0
