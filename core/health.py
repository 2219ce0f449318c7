"""Health checks of the fleet: check_postgres's actions, read the way check_postgres reads them.

Each check is a ``Check`` (name, verdict, value, warn, crit, detail), verdict one of ok, warn,
crit, unknown. Where a check matches a check_postgres action it takes that action's name, SQL
and comparison, so our verdict and ``check_postgres --action=X`` agree on the same cluster with
the same thresholds (tests/test_health_oracle.py holds us to it). Thresholds come from
``fleet.threshold(name)``; a threshold we cannot read makes that one check ``unknown``.

How a sweep talks to a server, and why:

* One connection per cluster, with the monitoring DSN, for every cluster-wide view. Its queries
  go in one pipeline (one round trip), locks first: in autocommit a pipeline is one implicit
  transaction, and the lock count must see only the lock its own statement takes, as
  check_postgres's does.
* One short connection per customer database for ``connection`` (connect_timeout small),
  which then asks for ``last_vacuum``'s figures: one more query, no other connection.
* Every connection says application_name=dbops-health and carries statement_timeout and
  lock_timeout as startup options, so no health query can hang on a lock or run away. Our own
  probes are left out of backends, activity, locks and the log.
* Every connection pins search_path to pg_catalog, pg_temp (a startup option too, which
  outranks a database's or a role's own) and every query names pg_catalog's objects: a
  customer's functions, operators and types never run as the monitoring role. Inside a customer
  database the probe reads that database's own tables only; everything server-wide is read
  once, by the cluster connection.
* Disk, the log, backups and their permissions through the server's runner (``df``,
  ``tail -c``, ``grep -r``, ``find -perm /077``), one SSH connection opened first and then
  shared by the four commands; argument lists only.
* pgBouncer, where the server has it (``pgbouncer_ini``): one connection to its admin console
  (the monitoring DSN, ``pgbouncer_port``, ``dbname=pgbouncer``) for SHOW DATABASES and SHOW
  POOLS, in the simple query protocol the console speaks. A server without it has no
  ``pgbouncer`` check at all rather than a verdict about nothing.
* Every piece runs in its own daemon thread and a sweep waits on them only until its deadline:
  a server that hangs is marked ``crit`` by the waiter, nobody joins the stuck thread.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

import psycopg
from psycopg import conninfo as pg_conninfo

from core.backups import (
    backup_files_argv,
    backup_verified_check,
    parse_backup_files,
    parse_time,
    pin_search_path,
)
from core.customers import Customer
from core.errors import DbopsError, Unreachable
from core.fleet import Fleet, Server
from core.remote import CommandResult, Runner
from core.units import pretty_age, pretty_bytes

Verdict = Literal["ok", "warn", "crit", "unknown"]
Number = int | str | None

APP_NAME = "dbops-health"
VERDICT_RANK: dict[str, int] = {"ok": 0, "unknown": 0, "warn": 1, "crit": 2}

# The checks a report shows, and their order, are the table CHECKS (after the check functions).

# Below this many block reads since the statistics reset a hit ratio says nothing: a database
# that was just created or restored reads everything from disk once.
HITRATIO_MIN_BLOCKS = 10_000
# How much of the end of the PostgreSQL log a sweep reads.
LOG_TAIL_BYTES = 2 * 1024 * 1024
# What the logfile check counts as an error, as check_postgres and SOP-101 mean it; WARNING
# lines are counted apart, and LOG and the rest never count.
LOG_ERROR_LEVELS = ("ERROR", "FATAL", "PANIC")
# Lines at LOG level an operator should read: quoted in the check's detail, never counted as
# errors (a busy healthy server logs "checkpoints are occurring too frequently" all day).
LOG_LINES_THAT_MATTER = (
    "checkpoints are occurring too frequently",
    "was terminated by signal",
    "terminating any other active server processes",
    "all server processes terminated",
    "database system was interrupted",
    "database system was not properly shut down",
    "archive command failed",
    "out of memory",
    "could not write",
    "could not fsync",
)
# Probes per server at a time: enough that a typical server's databases are probed in one wave
# (each probe is 4-5 round trips), few enough to leave max_connections alone.
PROBES_PER_SERVER = 16


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    value: Number = None
    warn: Number = None
    crit: Number = None
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict,
            "value": self.value,
            "warn": self.warn,
            "crit": self.crit,
            "detail": self.detail,
        }


def worst(verdicts: Iterable[str]) -> Verdict:
    """The most severe verdict; ``unknown`` never outranks ``ok`` (it is shown, not summed)."""
    best: Verdict = "ok"
    for v in verdicts:
        if v in ("warn", "crit") and VERDICT_RANK[v] > VERDICT_RANK[best]:
            best = "warn" if v == "warn" else "crit"
    return best


# --- thresholds, read as check_postgres reads them ------------------------------------------


class BadThreshold(DbopsError):
    pass


_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(\w*)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+\.?\d?)\s*([bkmgtepz])?\w*$", re.I)
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_SIZE_UNITS = {c: 1024**i for i, c in enumerate("bkmgtpez")}
_SIZE_UNITS["b"] = 1


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def parse_seconds(value: object, check: str = "threshold") -> float:
    """check_postgres's size_in_seconds: '10', '10s', '5 minutes', '1.5h'; numbers are seconds."""
    if isinstance(value, bool):
        raise BadThreshold(f"{check}: {value!r} is not a time")
    if isinstance(value, int | float):
        return float(value)
    match = _TIME_RE.match(str(value))
    unit = (match.group(2)[:1].lower() or "s") if match else ""
    if not match or unit not in _TIME_UNITS:
        raise BadThreshold(f"{check}: {value!r} is not a time such as 30s, 5m or 2h")
    return float(match.group(1)) * _TIME_UNITS[unit]


def optional_seconds(value: object, check: str) -> float | None:
    """A threshold in seconds, or None where the fleet file leaves it out (or empty)."""
    return None if value in (None, "") else parse_seconds(value, check)


def parse_bytes(value: object, check: str = "threshold") -> int:
    """check_postgres's size: '10G', '500 MB', '1024' (bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise BadThreshold(f"{check}: {value!r} is not a size such as 500M or 10G")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def parse_percent(value: object, check: str = "threshold") -> int:
    match = re.fullmatch(r"\s*(\d+)\s*%?\s*", str(value))
    if not match or isinstance(value, bool):
        raise BadThreshold(f"{check}: {value!r} is not a percentage such as 90%")
    return int(match.group(1))


def parse_count_for_time(value: object, check: str) -> tuple[int | None, float | None]:
    """check_postgres's validate_integer_for_time: '10s', '5m', '+3' (a count), '3 for 10s'."""
    if value is None or value == "":
        return None, None
    text = str(value).strip()
    match = re.fullmatch(r"(.+?)\s(?:for|and)\s(.+)", text, re.I)
    if match:
        count, when = match.group(1), match.group(2)
        if re.search(r"[a-zA-Z]$", count) or re.fullmatch(r"[-+]\d+", when):
            count, when = when, count
        if not re.fullmatch(r"[-+]?\d+", count.strip()):
            raise BadThreshold(f"{check}: {value!r}: expected a count and a time, as '3 for 10s'")
        return int(count), parse_seconds(when, check)
    if re.fullmatch(r"[-+]\d+", text):
        return int(text), None
    return None, parse_seconds(value, check)


def _limits(fleet: Fleet, check: str) -> tuple[Any, Any]:
    t = fleet.threshold(check)
    return t.get("warn"), t.get("crit")


def _unknown(name: str, exc: Exception | str) -> Check:
    return Check(name, "unknown", detail=str(exc))


# --- what a sweep fetches --------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Timeouts for one sweep, derived from its deadline."""

    connect_timeout_s: int = 3
    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 1000
    command_timeout_s: float = 8.0

    @classmethod
    def for_deadline(cls, deadline_s: float) -> Limits:
        # libpq treats connect_timeout below 2 as 2.
        return cls(
            connect_timeout_s=max(2, min(5, math.ceil(deadline_s / 3))),
            statement_timeout_ms=max(500, int(deadline_s * 600)),
            lock_timeout_ms=max(200, min(2000, int(deadline_s * 100))),
            command_timeout_s=max(1.0, deadline_s * 0.8),
        )


def health_conninfo(dsn: str, limits: Limits, dbname: str | None = None) -> str:
    """The monitoring DSN with our application_name, timeouts, search_path pinned (see
    core.backups.PINNED_SEARCH_PATH) and, given one, another database."""
    params = pg_conninfo.conninfo_to_dict(dsn)
    own = (
        f"-c statement_timeout={limits.statement_timeout_ms} "
        f"-c lock_timeout={limits.lock_timeout_ms}"
    )
    options = pin_search_path(f"{params['options']} {own}" if params.get("options") else own)
    extra: dict[str, Any] = {
        "application_name": APP_NAME,
        "connect_timeout": limits.connect_timeout_s,
        "options": options,
    }
    if dbname is not None:
        extra["dbname"] = dbname
    return pg_conninfo.make_conninfo(dsn, **extra)


def pg_error_text(exc: BaseException) -> str:
    """What went wrong, without the host, port, user or DSN that libpq's messages carry."""
    text = str(exc).strip()
    for marker in ("FATAL:", "ERROR:", "PANIC:"):
        if marker in text:
            tail = text.rsplit(marker, 1)[1]
            return f"{marker[:-1]}: {' '.join(tail.split())}"[:200]
    low = text.lower()
    if "connection refused" in low:
        return "connection refused (is PostgreSQL running?)"
    if "timeout expired" in low or "timed out" in low:
        return "no answer before the connect timeout"
    if "could not translate host name" in low:
        return "cannot resolve the database host name"
    if "no such file or directory" in low:
        return "no PostgreSQL socket (is PostgreSQL running?)"
    return type(exc).__name__ + (": connection failed" if "connection" in low else "")


# Every name in the SQL below is pg_catalog's, qualified (and the search_path is pinned too, see
# health_conninfo): a customer owns its database, and in a database where it could create
# objects a function, operator or type of its own named like ours would otherwise run as the
# monitoring role, which sees every session on the server (DESIGN.md, "Trust boundaries").

# check_postgres's own SQL for locks (granted, mode, datname), plus the pid so our own probes,
# which connect while this runs, can be left out. Must stay the first statement: see above.
LOCKS_SQL = (
    "SELECT granted, mode, datname, l.pid FROM pg_catalog.pg_locks l "
    "RIGHT JOIN pg_catalog.pg_database d ON (d.oid=l.database) WHERE d.datallowconn"
)
# check_backends, counting our own session once and never our other probes.
BACKENDS_SQL = f"""
SELECT d.datname,
  pg_catalog.count(s.datid) FILTER (
    WHERE s.pid = pg_catalog.pg_backend_pid() OR s.application_name IS DISTINCT FROM '{APP_NAME}'
  ) AS current,
  (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'max_connections')::int AS mc
FROM pg_catalog.pg_database d LEFT JOIN pg_catalog.pg_stat_activity s ON (s.datid = d.oid)
GROUP BY d.datname ORDER BY d.datname
"""
# check_txn_idle / check_txn_time / check_query_time on PostgreSQL 10+: client backends only,
# ages rounded to whole seconds in SQL, as check_postgres does.
ACTIVITY_SQL = f"""
SELECT pid, datname, usename, state, pg_catalog.left(query, 200) AS query,
  COALESCE(pg_catalog.round(EXTRACT(epoch FROM pg_catalog.now()-state_change)),0)::bigint
    AS state_s,
  COALESCE(pg_catalog.round(EXTRACT(epoch FROM pg_catalog.now()-xact_start)),0)::bigint
    AS xact_s,
  xact_start IS NOT NULL AS in_xact, state_change IS NOT NULL AS has_state_change,
  application_name = '{APP_NAME}' AND pid <> pg_catalog.pg_backend_pid() AS ours
FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend'
ORDER BY xact_start, state_change, pid DESC
"""
PREPARED_SQL = """
SELECT database, pg_catalog.round(EXTRACT(epoch FROM pg_catalog.now()-prepared))::bigint AS age
FROM pg_catalog.pg_prepared_xacts ORDER BY prepared ASC
"""
# pg_database_size raises for a database the role may not see; that must not sink the pipeline.
# Each database's statistics reset time is read here too, once per server, for last_vacuum:
# inside a customer's database the monitoring role reads only that database's own tables.
DATABASES_SQL = """
SELECT d.datname, d.datallowconn, pg_catalog.age(d.datfrozenxid)::bigint AS xid_age,
  CASE WHEN pg_catalog.has_database_privilege(d.oid, 'CONNECT')
         OR pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE')
       THEN pg_catalog.pg_database_size(d.oid) END AS size_bytes,
  COALESCE(sd.blks_hit, 0) AS blks_hit, COALESCE(sd.blks_read, 0) AS blks_read,
  sd.stats_reset
FROM pg_catalog.pg_database d LEFT JOIN pg_catalog.pg_stat_database sd ON (sd.datid = d.oid)
ORDER BY d.datname
"""


# check_last_vacuum_analyze's query, aggregated in SQL to one row (a customer database may hold
# thousands of tables): its tables are every ordinary table outside information_schema, less
# pg_catalog here (see check_last_vacuum); a table's time is the later of its last manual and
# last automatic vacuum; ages rounded to whole seconds in SQL, as check_postgres does. It runs
# inside the customer's database, so its operators are pg_catalog's by name as well; when the
# statistics were reset comes from DATABASES_SQL.
LAST_VACUUM_SQL = """
SELECT pg_catalog.current_database(), pg_catalog.count(*) AS tables,
  pg_catalog.count(*) FILTER (WHERE v IS NULL) AS never,
  (pg_catalog.array_agg(pg_catalog.quote_ident(nspname) OPERATOR(pg_catalog.||) '.'
                        OPERATOR(pg_catalog.||) pg_catalog.quote_ident(relname) ORDER BY v, relname)
     FILTER (WHERE v IS NOT NULL))[1] AS oldest,
  pg_catalog.round(EXTRACT(epoch FROM pg_catalog.now() OPERATOR(pg_catalog.-)
                                      pg_catalog.min(v)))::bigint AS age_s
FROM (
  SELECT n.nspname, c.relname,
    GREATEST(pg_catalog.pg_stat_get_last_vacuum_time(c.oid),
             pg_catalog.pg_stat_get_last_autovacuum_time(c.oid)) AS v
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
  WHERE c.relkind OPERATOR(pg_catalog.=) 'r'
    AND n.nspname OPERATOR(pg_catalog.<>) 'information_schema'
    AND n.nspname OPERATOR(pg_catalog.<>) 'pg_catalog'
) AS t
"""


@dataclass(frozen=True)
class Activity:
    pid: int
    datname: str | None
    usename: str | None
    state: str | None
    query: str | None
    state_s: int
    xact_s: int
    in_xact: bool
    has_state_change: bool


@dataclass(frozen=True)
class DatabaseStats:
    datname: str
    allowconn: bool
    xid_age: int
    size_bytes: int | None
    blks_hit: int
    blks_read: int
    stats_reset: datetime | None = None


@dataclass
class ClusterStats:
    """What one pass over a cluster's views returned."""

    connect_ms: int
    locks: list[tuple[bool | None, str | None, str]] = field(default_factory=list)
    backends: dict[str, int] = field(default_factory=dict)
    max_connections: int = 0
    activity: list[Activity] = field(default_factory=list)
    prepared: list[tuple[str, int]] = field(default_factory=list)
    databases: dict[str, DatabaseStats] = field(default_factory=dict)


def fetch_cluster(server: Server, limits: Limits) -> ClusterStats:
    """One connection, one pipeline: everything the cluster-wide checks read."""
    started = time.monotonic()
    with psycopg.connect(health_conninfo(server.dsn, limits), autocommit=True) as conn:
        connect_ms = int((time.monotonic() - started) * 1000)
        with conn.pipeline():
            cursors = [conn.cursor() for _ in range(5)]
            for cur, sql in zip(
                cursors,
                (LOCKS_SQL, BACKENDS_SQL, ACTIVITY_SQL, PREPARED_SQL, DATABASES_SQL),
                strict=True,
            ):
                cur.execute(sql)
        locks_rows, backend_rows, activity_rows, prepared_rows, db_rows = (
            c.fetchall() for c in cursors
        )
    activity = [Activity(*row[:9]) for row in activity_rows if not row[9]]
    ours = {row[0] for row in activity_rows if row[9]}
    stats = ClusterStats(connect_ms=connect_ms)
    stats.locks = [(g, m, d) for g, m, d, pid in locks_rows if pid is None or pid not in ours]
    stats.backends = {name: int(current) for name, current, _ in backend_rows}
    stats.max_connections = int(backend_rows[0][2]) if backend_rows else 0
    stats.activity = activity
    stats.prepared = [(str(db), int(age)) for db, age in prepared_rows]
    stats.databases = {r[0]: DatabaseStats(*r) for r in db_rows}
    return stats


@dataclass(frozen=True)
class VacuumStats:
    """One database's row of LAST_VACUUM_SQL."""

    datname: str
    tables: int
    never: int  # tables with no vacuum on record
    oldest: str | None  # schema.table whose last vacuum is the oldest, if any has one
    age_s: int | None  # seconds since that vacuum
    stats_reset: datetime | None = None  # from the cluster's view: with_cluster_stats


@dataclass(frozen=True)
class Probe:
    ok: bool
    ms: int
    error: str = ""
    vacuum: VacuumStats | None = None
    vacuum_error: str = ""


def probe_database(server: Server, database: str, limits: Limits) -> Probe:
    """check_postgres's connection: connect to the database and run SELECT version().

    Then, on the same connection, last_vacuum's query; its failure is last_vacuum's, not the
    connection's. ``ms`` is the connection check's time, without that query.
    """
    started = time.monotonic()
    try:
        conninfo = health_conninfo(server.dsn, limits, dbname=database)
        with psycopg.connect(conninfo, autocommit=True) as conn:  # no BEGIN round trip
            conn.execute("SELECT pg_catalog.version()").fetchone()
            ms = int((time.monotonic() - started) * 1000)
            try:
                row = conn.execute(LAST_VACUUM_SQL).fetchone()
            except psycopg.Error as exc:
                return Probe(True, ms, vacuum_error=pg_error_text(exc))
    except psycopg.Error as exc:
        return Probe(False, int((time.monotonic() - started) * 1000), pg_error_text(exc))
    vacuum = VacuumStats(*row) if row else None
    return Probe(True, ms, vacuum=vacuum, vacuum_error="" if row else "no answer to the query")


def with_cluster_stats(vac: VacuumStats | None, db: DatabaseStats | None) -> VacuumStats | None:
    """A database's vacuum figures (its probe's) with what the cluster's views say of it."""
    if vac is None or db is None:
        return vac
    return replace(vac, stats_reset=db.stats_reset)


# --- cluster checks (pure: stats + thresholds -> Check) --------------------------------------


def check_server_connection(stats: ClusterStats | None, error: str = "") -> Check:
    if stats is None:
        return Check("connection", "crit", detail=error or "cannot connect")
    return Check("connection", "ok", value=stats.connect_ms, detail="accepting connections")


def check_backends(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_backends: '90%' of max_connections, 12 connections, or '-5' (5 slots left)."""
    name = "backends"
    specs = []
    for label, raw in (("warning", warn), ("critical", crit)):
        match = re.fullmatch(r"(-?)(\d+)(%?)", str(raw).strip())
        if not match or (match.group(1) and match.group(3)):
            return _unknown(name, f"bad {label} threshold {raw!r}: use 90%, 12 or -5")
        specs.append((match.group(1) == "-", int(match.group(2)), match.group(3) == "%"))
    limit, total = stats.max_connections, sum(stats.backends.values())
    if limit <= 0:
        return _unknown(name, "max_connections not readable")

    def as_count(minus: bool, n: int, pct: bool) -> int:
        return limit - n if minus else (n * limit // 100 if pct else n)

    def hit(minus: bool, n: int, pct: bool) -> bool:
        if minus:
            return limit - total <= n
        return total / limit * 100 >= n if pct else total >= n

    percent = int(total / limit * 100) or 1
    detail = f"{total} of {limit} connections ({percent}%)"
    w, c = specs
    verdict: Verdict = "crit" if hit(*c) else "warn" if hit(*w) else "ok"
    return Check(name, verdict, total, as_count(*w), as_count(*c), detail)


def check_txn_wraparound(stats: ClusterStats, warn: object, crit: object) -> Check:
    name = "txn_wraparound"
    try:
        w = int(str(warn).replace("_", "")) if warn not in (None, "") else None
        c = int(str(crit).replace("_", "")) if crit not in (None, "") else None
    except ValueError:
        return _unknown(name, f"bad thresholds {warn!r}/{crit!r}: transaction counts expected")
    rows = [d for d in stats.databases.values() if d.allowconn]
    if not rows:
        return _unknown(name, "no databases found")
    top = max(rows, key=lambda d: (d.xid_age, d.datname))
    verdict: Verdict = (
        "crit"
        if c is not None and top.xid_age >= c
        else "warn"
        if w is not None and top.xid_age >= w
        else "ok"
    )
    return Check(name, verdict, top.xid_age, w, c, f"{top.datname}: {top.xid_age}")


def _activity_check(
    name: str,
    rows: list[tuple[Activity, int]],
    warn: object,
    crit: object,
    what: str,
    counts: Callable[[Activity], bool] = lambda a: True,
) -> Check:
    """check_txn_idle's comparison: longest age against a time, a count, or 'count for time'.

    ``rows`` are what check_postgres's query returns (each with the age that matters); of those,
    ``counts`` picks the ones that count, as its Perl filter does after the query.
    """
    try:
        wcount, wtime = parse_count_for_time(warn, name)
        ccount, ctime = parse_count_for_time(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    shown_w = _plain(wtime) if wtime is not None and wcount is None else warn
    shown_c = _plain(ctime) if ctime is not None and ccount is None else crit
    shown_w = shown_w if isinstance(shown_w, int | str) or shown_w is None else str(shown_w)
    shown_c = shown_c if isinstance(shown_c, int | str) or shown_c is None else str(shown_c)
    if any(act.query and "insufficient" in act.query for act, _ in rows):
        return _unknown(name, "the monitoring role cannot see other sessions (grant pg_monitor)")
    rows = [(act, secs) for act, secs in rows if counts(act)]
    if not rows:
        return Check(name, "ok", 0, shown_w, shown_c, f"no {what}")
    count = len(rows)
    top, longest = rows[0]
    for act, secs in rows:
        if secs >= longest:
            top, longest = act, secs
    base = wcount or ccount
    if base and count < base:
        return Check(name, "ok", longest, shown_w, shown_c, f"fewer than {base} {what}")
    who = f"pid {top.pid} in {top.datname} as {top.usename}"
    detail = f"longest {what}: {longest}s ({who}); {count} in all"

    def tripped(cnt: int | None, tm: float | None) -> bool:
        if tm is not None and cnt is not None:
            return longest >= tm and count >= cnt
        if tm is not None:
            return longest >= tm
        return cnt is not None and count >= cnt

    verdict: Verdict = (
        "crit" if tripped(ccount, ctime) else "warn" if tripped(wcount, wtime) else "ok"
    )
    return Check(name, verdict, longest, shown_w, shown_c, detail)


def check_txn_idle(stats: ClusterStats, warn: object, crit: object) -> Check:
    rows = [
        (a, a.state_s)
        for a in stats.activity
        if a.state == "idle in transaction" or a.state is None
    ]
    return _activity_check(
        "txn_idle", rows, warn, crit, "idle in transaction",
        counts=lambda a: a.state == "idle in transaction",
    )  # fmt: skip


def check_txn_time(stats: ClusterStats, warn: object, crit: object) -> Check:
    rows = [(a, a.xact_s) for a in stats.activity if a.in_xact]
    return _activity_check("txn_time", rows, warn, crit, "transaction")


def check_query_time(stats: ClusterStats, warn: object, crit: object) -> Check:
    rows = [
        (a, a.state_s)
        for a in stats.activity
        if a.has_state_change and (a.state is None or not a.state.startswith("idle"))
    ]
    return _activity_check("query_time", rows, warn, crit, "query")


def _lock_limits(raw: object, label: str) -> dict[str, int]:
    text = "" if raw is None else str(raw)
    found = {
        re.sub(r"lock$", "", m.group(1).lower()): int(m.group(2))
        for m in re.finditer(r"(\w+)\s*=\s*(\d+)", text)
    }
    if found:
        return found
    if re.fullmatch(r"\d+", text.strip()):
        return {"total": int(text)}
    if text:
        raise BadThreshold(
            f"locks: bad {label} threshold {raw!r}: use 100 or 'total=100;waiting=5'"
        )
    return {}


def check_locks(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_locks: counts lock rows in databases that allow connections, by mode and waiting."""
    name = "locks"
    try:
        w, c = _lock_limits(warn, "warning"), _lock_limits(crit, "critical")
    except BadThreshold as exc:
        return _unknown(name, exc)
    totals: dict[str, int] = {"total": 0}
    got = False
    for granted, mode, _db in stats.locks:
        if granted is None:
            continue
        got = True
        totals["total"] += 1
        kind = re.sub(r"lock$", "", (mode or "").lower())
        totals[kind] = totals.get(kind, 0) + 1
        if not granted:
            totals["waiting"] = totals.get("waiting", 0) + 1
    shown_w: Number = w.get("total") if set(w) <= {"total"} else str(warn)
    shown_c: Number = c.get("total") if set(c) <= {"total"} else str(crit)
    if not got:
        return Check(name, "unknown", 0, shown_w, shown_c, "no locks seen in any database")
    verdict: Verdict = "ok"
    over = []
    for kind in sorted(set(totals) | set(w) | set(c)):
        n = totals.get(kind, 0)
        if kind in c and n >= c[kind]:
            verdict = "crit"
            over.append(f"{kind}={n}")
        elif kind in w and n >= w[kind]:
            verdict = "warn" if verdict == "ok" else verdict
            over.append(f"{kind}={n}")
    waiting = totals.get("waiting", 0)
    detail = f"total locks: {totals['total']}, waiting: {waiting}"
    if over:
        detail += f" (over: {', '.join(over)})"
    return Check(name, verdict, totals["total"], shown_w, shown_c, detail)


def check_prepared_txns(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_prepared_txns: age in seconds of the oldest prepared transaction."""
    name = "prepared_txns"
    try:
        w, c = optional_seconds(warn, name), optional_seconds(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    sw = _plain(w) if w is not None else None
    sc = _plain(c) if c is not None else None
    shown_w: Number = sw if isinstance(sw, int) or sw is None else str(sw)
    shown_c: Number = sc if isinstance(sc, int) or sc is None else str(sc)
    if not stats.prepared:
        return Check(name, "ok", 0, shown_w, shown_c, "no prepared transactions")
    verdict: Verdict = "ok"
    for _db, age in stats.prepared:
        if c is not None and age >= c:
            verdict = "crit"
        elif w is not None and age >= w and verdict == "ok":
            verdict = "warn"
    oldest_db, oldest = max(stats.prepared, key=lambda r: r[1])
    detail = f"{len(stats.prepared)} prepared, oldest {oldest}s in {oldest_db}"
    return Check(name, verdict, oldest, shown_w, shown_c, detail)


def cluster_checks(stats: ClusterStats, fleet: Fleet) -> list[Check]:
    return [spec.fn(stats, *_limits(fleet, *spec.thresholds)) for spec in CLUSTER_CHECKS]


def check_cluster(server: Server, fleet: Fleet, limits: Limits | None = None) -> list[Check]:
    """The server's ``connection`` and cluster-wide checks, now (for tools and tests)."""
    try:
        stats = fetch_cluster(server, limits or Limits())
    except psycopg.Error as exc:
        return cluster_down(pg_error_text(exc))
    return [check_server_connection(stats), *cluster_checks(stats, fleet)]


def is_full(error: str) -> bool:
    """PostgreSQL answered, but every connection slot is taken."""
    return "too many clients" in error or "remaining connection slots" in error


def cluster_down(error: str) -> list[Check]:
    """No cluster connection: connection is crit, what it would have told us is unknown.

    Except backends when the refusal was "too many clients": that is the answer, and
    check_postgres's backends calls it critical too.
    """
    checks = [check_server_connection(None, error)]
    for name in (spec.name for spec in CLUSTER_CHECKS):
        if name == "backends" and is_full(error):
            checks.append(Check(name, "crit", detail=f"no free connection slots: {error}"))
        else:
            checks.append(Check(name, "unknown", detail=f"PostgreSQL not answering: {error}"))
    return checks


# --- database checks -------------------------------------------------------------------------


def check_database_connection(probe: Probe) -> Check:
    if probe.ok:
        return Check("connection", "ok", probe.ms, detail="accepting connections")
    return Check("connection", "crit", None, detail=probe.error or "cannot connect")


def check_database_size(db: DatabaseStats | None, warn: object, crit: object) -> Check:
    name = "database_size"
    if db is None:
        return Check(name, "unknown", detail="database not found on the cluster")
    try:
        w = parse_bytes(warn, name) if warn not in (None, "") else None
        c = parse_bytes(crit, name) if crit not in (None, "") else None
    except BadThreshold as exc:
        return _unknown(name, exc)
    size = db.size_bytes
    if size is None:
        return Check(name, "unknown", None, w, c, "size not readable (grant pg_monitor)")
    verdict: Verdict = (
        "crit" if c is not None and size >= c else "warn" if w is not None and size >= w else "ok"
    )
    return Check(name, verdict, size, w, c, f"{db.datname}: {pretty_bytes(size)}")


def check_hitratio(db: DatabaseStats | None, warn: object, crit: object) -> Check:
    """check_hitratio (lower is worse), with a floor of activity below which it is not judged."""
    name = "hitratio"
    if db is None:
        return Check(name, "unknown", detail="database not found on the cluster")
    try:
        w = parse_percent(warn, name) if warn not in (None, "") else None
        c = parse_percent(crit, name) if crit not in (None, "") else None
    except BadThreshold as exc:
        return _unknown(name, exc)
    reads = db.blks_hit + db.blks_read
    if reads < HITRATIO_MIN_BLOCKS:
        return Check(name, "ok", None, w, c, f"too little activity to judge ({reads} block reads)")
    ratio = round(100 * db.blks_hit / reads, 2)
    verdict: Verdict = (
        "crit" if c is not None and ratio <= c else "warn" if w is not None and ratio <= w else "ok"
    )
    return Check(name, verdict, int(ratio), w, c, f"{ratio:.2f}% of {reads} block reads from cache")


def check_last_vacuum(
    vac: VacuumStats | None, warn: object, crit: object, error: str = ""
) -> Check:
    """check_postgres's last_vacuum: the longest time since any one table was last vacuumed.

    As check_last_vacuum_analyze (check_postgres 2.25) does it, per database:

    * a table's time is the later of its last manual VACUUM and its last autovacuum;
    * the tables are the ordinary ones (relkind 'r'; not TOAST, views, materialized views or
      partitioned parents) outside information_schema;
    * a table never vacuumed (no time on record) is passed over, and when no table has a time
      the answer is UNKNOWN ("No matching tables have ever been vacuumed");
    * the age is ``round(now() - time)`` in seconds, compared with ``>=``, critical first;
      defaults 1 day and 2 days; a warning above the critical is refused.

    Deliberately unlike it: system catalogs (pg_catalog) are left out, as check_postgres's
    ``--exclude=pg_catalog.`` would. By default it counts them, and the shared ones (pg_authid,
    pg_database, ...) carry the same vacuum time in every database of a cluster: vacuumed once at
    initdb or by a ``vacuumdb --all``, and rarely again since they hardly change, they would make
    every database on a server crit two days later whatever its own tables are doing. What a
    customer's tables are doing is the question here. With ``--exclude`` check_postgres also
    says UNKNOWN when the oldest time rounds to 0 seconds (its ``$maxtime < 1`` on a skipped
    row); we do not copy that: a table vacuumed this instant is ok.

    Unknown, with the reason, where nothing can be measured: the database not answering, no
    user tables, or no vacuum on record (never run, or the statistics were reset or lost).
    """
    name = "last_vacuum"
    try:
        w, c = optional_seconds(warn, name), optional_seconds(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    sw = int(w) if w is not None else None
    sc = int(c) if c is not None else None
    if w is not None and c is not None and w > c:
        return Check(name, "unknown", None, sw, sc, f"warning {warn} is above critical {crit}")
    if vac is None:
        return Check(name, "unknown", None, sw, sc, error or "vacuum times not read")
    if vac.tables == 0:
        return Check(name, "unknown", None, sw, sc, f"{vac.datname} has no user tables")
    if vac.oldest is None or vac.age_s is None:
        since = (
            f"since the statistics were reset {vac.stats_reset.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
            if vac.stats_reset is not None
            else "(never run, or the statistics were lost in a crash)"
        )
        tables = "table" if vac.tables == 1 else f"{vac.tables} tables"
        return Check(name, "unknown", None, sw, sc, f"no vacuum on record of its {tables} {since}")
    age = max(0, vac.age_s)
    verdict: Verdict = "crit" if c and age >= c else "warn" if w and age >= w else "ok"
    detail = f"{vac.oldest} last vacuumed {pretty_age(age)} ago"
    if vac.never:
        detail += f"; {vac.never} of {vac.tables} tables never vacuumed"
    return Check(name, verdict, age, sw, sc, detail)


# --- through the runner: disk, log, backups --------------------------------------------------


@dataclass(frozen=True)
class Filesystem:
    device: str
    mount: str
    size_bytes: int
    used_bytes: int
    avail_bytes: int
    used_percent: int
    paths: tuple[str, ...]


def df_argv(server: Server) -> list[str]:
    paths = list(dict.fromkeys([server.data_path, server.wal_dir, server.backup_path]))
    return ["df", "-P", "-B1", "--", *paths]


def parse_df(result: CommandResult, paths: Sequence[str]) -> list[Filesystem]:
    """`df -P -B1 -- paths` rows, one per filesystem, each with the paths it holds.

    df prints the rows in argument order and skips (to stderr) the paths it cannot read.
    """
    failed = {p for p in paths if f"{p}:" in result.stderr or f"'{p}'" in result.stderr}
    kept = [p for p in paths if p not in failed]
    rows = []
    for line in result.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[4].endswith("%"):
            rows.append(parts)
    out: dict[str, Filesystem] = {}
    for path, parts in zip(kept, rows, strict=False):
        device, size, used, avail, pct, mount = (
            parts[0],
            parts[1],
            parts[2],
            parts[3],
            parts[4],
            " ".join(parts[5:]),
        )
        if device in out:
            fs = out[device]
            out[device] = Filesystem(
                fs.device,
                fs.mount,
                fs.size_bytes,
                fs.used_bytes,
                fs.avail_bytes,
                fs.used_percent,
                (*fs.paths, path),
            )
            continue
        out[device] = Filesystem(
            device, mount, int(size), int(used), int(avail), int(pct.rstrip("%")), (path,)
        )
    return list(out.values())


def _disk_rule(raw: object) -> Callable[[int, int], bool]:
    """check_postgres's validate_size_or_percent_with_oper: '90%', '40G', '90% or 40G', ..."""
    text = "" if raw is None else str(raw).strip()
    if not text:
        return lambda used, pct: False
    match = re.fullmatch(r"(.+?)\s(&&|\|\||and|or)\s(.+)", text, re.I)
    if match:
        left, right = _disk_rule(match.group(1)), _disk_rule(match.group(3))
        if match.group(2).lower() in ("&&", "and"):
            return lambda used, pct: left(used, pct) and right(used, pct)
        return lambda used, pct: left(used, pct) or right(used, pct)
    if text.endswith("%"):
        limit = parse_percent(text, "disk_space")
        return lambda used, pct: pct >= limit
    size = parse_bytes(text, "disk_space")
    return lambda used, pct: used >= size


def _shown(raw: object) -> Number:
    if raw is None or (isinstance(raw, int) and not isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    return int(text[:-1]) if re.fullmatch(r"\d+%", text) else text


def check_disk_space(filesystems: Sequence[Filesystem], warn: object, crit: object) -> Check:
    """check_disk_space on the data, WAL and backup paths; value is the fullest one's percent."""
    name = "disk_space"
    try:
        w, c = _disk_rule(warn), _disk_rule(crit)
    except BadThreshold as exc:
        return _unknown(name, exc)
    if not filesystems:
        return Check(name, "unknown", detail="df returned no filesystems")
    verdict: Verdict = "ok"
    parts = []
    for fs in sorted(filesystems, key=lambda f: -f.used_percent):
        if c(fs.used_bytes, fs.used_percent):
            verdict = "crit"
        elif w(fs.used_bytes, fs.used_percent) and verdict == "ok":
            verdict = "warn"
        used, size = pretty_bytes(fs.used_bytes), pretty_bytes(fs.size_bytes)
        parts.append(f"{fs.mount} {fs.used_percent}% used ({used} of {size})")
    top = max(fs.used_percent for fs in filesystems)
    return Check(name, verdict, top, _shown(warn), _shown(crit), "; ".join(parts))


_SEVERITY_RE = re.compile(
    r"\b(DEBUG\d?|LOG|INFO|NOTICE|WARNING|ERROR|FATAL|PANIC|DETAIL|HINT|CONTEXT|STATEMENT|"
    r"QUERY|LOCATION):  "
)
_STAMP_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:\.\d+)?(?:\s*([A-Z]{2,5}|[+-]\d\d(?::?\d\d)?))?"
)
_TZ_HOURS = {
    "UTC": 0, "GMT": 0, "Z": 0, "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7,
    "MDT": -6, "PST": -8, "PDT": -7, "CET": 1, "CEST": 2, "BST": 1, "EET": 2, "EEST": 3,
}  # fmt: skip


def _line_time(line: str) -> datetime | None:
    match = _STAMP_RE.match(line)
    if not match:
        return None
    stamp = datetime.fromisoformat(match.group(1).replace(" ", "T"))
    zone = match.group(2)
    if zone is None or zone in _TZ_HOURS:
        return stamp.replace(tzinfo=UTC) - timedelta(hours=_TZ_HOURS.get(zone or "UTC", 0))
    if zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
        return stamp.replace(tzinfo=UTC) - (offset if zone[0] == "+" else -offset)
    return None


@dataclass
class LogFindings:
    counts: dict[str, int] = field(default_factory=dict)  # ERROR, FATAL and PANIC lines
    samples: list[str] = field(default_factory=list)  # the first few of those
    warnings: int = 0  # WARNING lines: shown, not errors
    notes: list[str] = field(default_factory=list)  # the first LOG lines that matter

    @property
    def total(self) -> int:
        """Error lines: ERROR, FATAL and PANIC."""
        return sum(self.counts.values())


# The detail of a log with nothing to show; the report leaves such a server out.
LOG_CLEAN = "no errors in the PostgreSQL log"
_LOG_WARNINGS_RE = re.compile(r"^\d+ errors?\b[^;]*\((\d+) warnings?\)")


def scan_log(text: str, since: datetime | None, *, partial_first_line: bool = False) -> LogFindings:
    """ERROR, FATAL and PANIC lines (counted), WARNING lines (counted apart) and LOG lines that
    matter (quoted), newer than ``since``.

    Lines our own probes caused (application_name dbops-health in the line) are left out; lines
    without a readable time stamp count, since the window is the end of the file anyway.
    """
    found = LogFindings()
    lines = text.splitlines()
    if partial_first_line and lines:
        lines = lines[1:]
    for line in lines:
        match = _SEVERITY_RE.search(line)
        if not match:
            continue
        severity, prefix, message = match.group(1), line[: match.start()], line[match.end() :]
        if severity == "LOG":
            if not any(p in message for p in LOG_LINES_THAT_MATTER):
                continue
        elif severity not in (*LOG_ERROR_LEVELS, "WARNING"):
            continue
        if APP_NAME in prefix:
            continue
        if since is not None:
            when = _line_time(line)
            if when is not None and when < since:
                continue
        quoted = f"{severity}: {' '.join(message.split())[:120]}"
        if severity == "WARNING":
            found.warnings += 1
        elif severity == "LOG":
            if len(found.notes) < 2 and quoted not in found.notes:
                found.notes.append(quoted)
        else:
            found.counts[severity] = found.counts.get(severity, 0) + 1
            if len(found.samples) < 3:
                found.samples.append(quoted)
    return found


def check_logfile(findings: LogFindings, warn: object, crit: object) -> Check:
    """Error lines (ERROR, FATAL, PANIC) against the thresholds; a PANIC is crit however few.

    The detail reads "2 errors: ERROR 1, FATAL 1 (3 warnings); ERROR: ..." or "0 errors
    (3 warnings)": warnings are said apart and never move the verdict.
    """
    name = "logfile"
    try:
        w = int(str(warn)) if warn not in (None, "") else None
        c = int(str(crit)) if crit not in (None, "") else None
    except ValueError:
        return _unknown(name, f"bad thresholds {warn!r}/{crit!r}: line counts expected")
    n = findings.total
    verdict: Verdict = (
        "crit"
        if (c is not None and n >= c) or findings.counts.get("PANIC")
        else "warn"
        if w is not None and n >= w
        else "ok"
    )
    if not n and not findings.warnings and not findings.notes:
        return Check(name, verdict, 0, w, c, LOG_CLEAN)
    head = f"{n} error{'' if n == 1 else 's'}"
    if n:
        head += ": " + ", ".join(f"{k} {v}" for k, v in sorted(findings.counts.items()))
    if findings.warnings:
        head += f" ({findings.warnings} warning{'' if findings.warnings == 1 else 's'})"
    quoted = " | ".join([*findings.samples, *findings.notes])
    return Check(name, verdict, n, w, c, f"{head}; {quoted}" if quoted else head)


def log_warnings(detail: str) -> int:
    """How many WARNING lines a logfile check's detail reports (0 when it names none)."""
    found = _LOG_WARNINGS_RE.match(detail)
    return int(found.group(1)) if found else 0


def log_argv(server: Server, tail_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    return ["tail", "-c", str(tail_bytes), "--", server.log_path]


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


# --- a sweep ---------------------------------------------------------------------------------

Scope = Literal["server", "cluster", "database"]


@dataclass(frozen=True)
class CheckSpec:
    """One row of the check table.

    ``scope`` says where the check runs: ``server`` checks read the host (or its pgBouncer),
    ``cluster`` checks read the cluster connection's one pipeline and share its failure (see
    :func:`cluster_down`), ``database`` checks run once per customer database. ``thresholds``
    are the ``fleet.threshold()`` keys the check reads, none for a check without thresholds.
    """

    name: str
    scope: Scope
    fn: Callable[..., Any]
    thresholds: tuple[str, ...] = ()


# Every check, in the order a report shows it: a server's checks first (pgbouncer only where the
# server has it configured), then each database's.
CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("connection", "server", check_server_connection),
    CheckSpec("backends", "cluster", check_backends, ("backends",)),
    CheckSpec("txn_wraparound", "cluster", check_txn_wraparound, ("txn_wraparound",)),
    CheckSpec("txn_idle", "cluster", check_txn_idle, ("txn_idle",)),
    CheckSpec("txn_time", "cluster", check_txn_time, ("txn_time",)),
    CheckSpec("query_time", "cluster", check_query_time, ("query_time",)),
    CheckSpec("locks", "cluster", check_locks, ("locks",)),
    CheckSpec("prepared_txns", "cluster", check_prepared_txns, ("prepared_txns",)),
    CheckSpec("disk_space", "server", check_disk_space, ("disk_space",)),
    CheckSpec("logfile", "server", check_logfile, ("logfile",)),
    CheckSpec("backup_perms", "server", check_backup_perms),
    CheckSpec("pgbouncer", "server", check_pgbouncer, ("pgb_pool_cl_waiting", "pgb_pool_maxwait")),
    CheckSpec("connection", "database", check_database_connection),
    CheckSpec("database_size", "database", check_database_size, ("database_size",)),
    CheckSpec("hitratio", "database", check_hitratio, ("hitratio",)),
    CheckSpec("last_vacuum", "database", check_last_vacuum, ("last_vacuum",)),
    CheckSpec("backup_age", "database", check_backup_age, ("backup_age",)),
    CheckSpec("backup_verified", "database", backup_verified_check),
)
# A server's checks by name, in report order; its cluster-wide ones; a database's.
SERVER_CHECKS = tuple(c.name for c in CHECKS if c.scope != "database")
CLUSTER_CHECKS = tuple(c for c in CHECKS if c.scope == "cluster")
DATABASE_CHECKS = tuple(c.name for c in CHECKS if c.scope == "database")


def in_report_order(checks: Iterable[Check], order: Sequence[str]) -> list[Check]:
    """``checks`` sorted the way the table orders them (a name not in ``order`` is a bug)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(checks, key=lambda c: rank[c.name])


T = TypeVar("T")


def spawn(fn: Callable[[], T], name: str) -> Future[T]:
    """Run ``fn`` in a daemon thread; the future is what a deadline-bound waiter looks at.

    Daemon, and never joined: a thread stuck on a hung server must not hold up a report, nor
    the process when it exits.
    """
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the waiter, who decides
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def spawn_each(
    items: Sequence[str], fn: Callable[[str], T], workers: int, name: str
) -> dict[str, Future[T]]:
    """``fn(item)`` for every item, ``workers`` at a time, each with its own future."""
    futures: dict[str, Future[T]] = {item: Future() for item in items}
    todo = list(items)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                item = todo.pop(0)
            future = futures[item]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(item))
            except BaseException as exc:
                future.set_exception(exc)

    for i in range(max(1, min(workers, len(items)))):
        threading.Thread(target=work, name=f"{name}-{i}", daemon=True).start()
    return futures


@dataclass
class DatabaseHealth:
    customer: str
    server: str
    database: str
    online: bool
    size_bytes: int | None
    last_backup_at: datetime | None
    connections: int | None
    checks: list[Check]


@dataclass
class ServerHealth:
    name: str
    reachable: bool
    postgres: Literal["up", "down"]
    checks: list[Check]
    databases: list[DatabaseHealth]
    filesystems: list[Filesystem] = field(default_factory=list)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass
class _Pending:
    """The futures of one server's sweep."""

    server: Server
    customers: list[Customer]
    cluster: Future[ClusterStats]
    probes: dict[str, Future[Probe]]
    df: Future[CommandResult]
    log: Future[CommandResult]
    backups: Future[dict[str, dict[str, Any]]]
    perms: Future[CommandResult]
    # None: the server has no pgBouncer configured, so no pgbouncer check.
    pgbouncer: Future[PgBouncerStats] | None = None


def _connect(runner: Runner, timeout: float) -> None:
    """Open the runner's connection, when it has one to open (SSH), within ``timeout``."""
    connect = getattr(runner, "connect", None)
    if callable(connect):
        connect(timeout=timeout)


def start_server(
    server: Server, customers: Sequence[Customer], runner: Runner | None, limits: Limits
) -> _Pending:
    mine = [c for c in customers if c.server == server.name]
    names = sorted({c.name for c in mine})
    tag = f"health-{server.name}"
    # The connection is opened once, then the commands share it in parallel: four commands
    # racing to connect to a hung sshd would wait out its timeout one after another.
    connected = (
        spawn(lambda: _connect(runner, limits.command_timeout_s), f"{tag}-connect")
        if runner
        else None
    )

    def command(argv: list[str]) -> CommandResult:
        if runner is None or connected is None:
            raise Unreachable(f"no runner for {server.name}")
        connected.result()  # raises what connecting raised
        return runner.run(argv, timeout=limits.command_timeout_s)

    def backups() -> dict[str, dict[str, Any]]:
        if not names:
            return {}
        found = command(backup_files_argv(server, names))
        return parse_backup_files(found.stdout, server.backup_path)

    return _Pending(
        server=server,
        customers=mine,
        cluster=spawn(lambda: fetch_cluster(server, limits), f"{tag}-cluster"),
        probes=spawn_each(
            sorted({c.database for c in mine}),
            lambda db: probe_database(server, db, limits),
            PROBES_PER_SERVER,
            f"{tag}-probe",
        ),
        df=spawn(lambda: command(df_argv(server)), f"{tag}-df"),
        log=spawn(lambda: command(log_argv(server)), f"{tag}-log"),
        backups=spawn(backups, f"{tag}-backups"),
        perms=spawn(lambda: command(backup_perms_argv(server)), f"{tag}-perms"),
        pgbouncer=(
            spawn(lambda: fetch_pgbouncer(server, limits), f"{tag}-pgbouncer")
            if server.pgbouncer_ini
            else None
        ),
    )


def all_futures(pending: Iterable[_Pending]) -> list[Future[Any]]:
    out: list[Future[Any]] = []
    for p in pending:
        out += [p.cluster, p.df, p.log, p.backups, p.perms, *p.probes.values()]
        if p.pgbouncer is not None:
            out.append(p.pgbouncer)
    return out


@dataclass(frozen=True)
class Outcome(Generic[T]):
    value: T | None
    error: str


def _outcome(future: Future[T], waited_s: float) -> Outcome[T]:
    """A future's result or what went wrong; one not done by the deadline is left to itself."""
    if not future.done():
        return Outcome(None, f"no answer within {waited_s:g}s")
    exc = future.exception()
    if exc is None:
        return Outcome(future.result(), "")
    if isinstance(exc, psycopg.Error):
        return Outcome(None, pg_error_text(exc))
    if isinstance(exc, DbopsError):
        return Outcome(None, exc.message)
    return Outcome(None, type(exc).__name__)


def finish_server(
    p: _Pending, fleet: Fleet, waited_s: float, now: datetime, log_since: datetime | None
) -> ServerHealth:
    """Turn one server's futures, done or not, into its checks."""
    server = p.server
    stats_out = _outcome(p.cluster, waited_s)
    stats, cluster_error = stats_out.value, stats_out.error
    checks: list[Check] = (
        [check_server_connection(stats), *cluster_checks(stats, fleet)]
        if stats is not None
        else cluster_down(cluster_error)
    )
    reachable = False
    filesystems: list[Filesystem] = []

    df_out = _outcome(p.df, waited_s)
    df, df_error = df_out.value, df_out.error
    if df is not None:
        reachable = True
        filesystems = parse_df(df, df_argv(server)[4:])
        if filesystems:
            checks.append(check_disk_space(filesystems, *_limits(fleet, "disk_space")))
        else:
            checks.append(
                Check("disk_space", "unknown", detail=f"df failed: {df.stderr.strip()[:160]}")
            )
    else:
        checks.append(Check("disk_space", "crit", detail=f"server not answering: {df_error}"))

    log_out = _outcome(p.log, waited_s)
    log, log_error = log_out.value, log_out.error
    if log is not None:
        reachable = True
        if log.ok:
            partial = len(log.stdout.encode()) >= LOG_TAIL_BYTES
            found = scan_log(log.stdout, log_since, partial_first_line=partial)
            checks.append(check_logfile(found, *_limits(fleet, "logfile")))
        else:
            checks.append(
                Check(
                    "logfile", "unknown", detail=f"cannot read the log: {log.stderr.strip()[:160]}"
                )
            )
    else:
        checks.append(Check("logfile", "crit", detail=f"server not answering: {log_error}"))
    perms_out = _outcome(p.perms, waited_s)
    if perms_out.value is not None:
        reachable = True
        checks.append(check_backup_perms(perms_out.value, server.backup_path))
    else:
        why = f"server not answering: {perms_out.error}"
        checks.append(Check("backup_perms", "unknown", detail=why))
    if p.pgbouncer is not None:
        bouncer = _outcome(p.pgbouncer, waited_s)
        checks.append(
            check_pgbouncer(
                bouncer.value,
                [c.database for c in p.customers],
                _limits(fleet, "pgb_pool_cl_waiting"),
                _limits(fleet, "pgb_pool_maxwait"),
                error=bouncer.error,
            )
        )

    backups_out = _outcome(p.backups, waited_s)
    backups, backup_error = backups_out.value, backups_out.error
    by_customer: dict[str, list[BackupSeen]] = {}
    if backups is not None:
        reachable = True
        by_customer = backups_by_customer(backups, server.backup_path)

    databases = []
    for customer in p.customers:
        probe_out = _outcome(p.probes[customer.database], waited_s)
        probe, probe_error = probe_out.value, probe_out.error
        conn = check_database_connection(probe or Probe(False, 0, probe_error))
        db = stats.databases.get(customer.database) if stats else None
        if stats is None:
            why = f"PostgreSQL not answering: {cluster_error}"
            size = Check("database_size", "unknown", detail=why)
            ratio = Check("hitratio", "unknown", detail=why)
        else:
            size = check_database_size(db, *_limits(fleet, "database_size"))
            ratio = check_hitratio(db, *_limits(fleet, "hitratio"))
        if backups is not None:
            age, last = check_backup_age(
                by_customer.get(customer.name, []), *_limits(fleet, "backup_age"), now
            )
        else:
            age, last = (
                Check("backup_age", "crit", detail=f"cannot list backups: {backup_error}"),
                None,
            )
        verified = (
            Check(**backup_verified_check(backups, server.backup_path, customer.name, now))
            if backups is not None
            else Check("backup_verified", "unknown", detail=f"cannot list backups: {backup_error}")
        )
        if probe is None or not probe.ok:
            why = f"database not answering: {probe.error if probe else probe_error}"
            vacuum = Check("last_vacuum", "unknown", detail=why)
        else:
            why = f"cannot read vacuum times: {probe.vacuum_error}"
            vac = with_cluster_stats(probe.vacuum, db)
            vacuum = check_last_vacuum(vac, *_limits(fleet, "last_vacuum"), error=why)
        connections = stats.backends.get(customer.database) if stats else None
        databases.append(
            DatabaseHealth(
                customer=customer.name,
                server=server.name,
                database=customer.database,
                online=conn.verdict == "ok",
                size_bytes=db.size_bytes if db else None,
                last_backup_at=last,
                connections=connections,
                checks=in_report_order([conn, size, ratio, vacuum, age, verified], DATABASE_CHECKS),
            )
        )
    return ServerHealth(
        name=server.name,
        reachable=reachable,
        postgres="up" if stats is not None or is_full(cluster_error) else "down",
        checks=in_report_order(checks, SERVER_CHECKS),
        databases=databases,
        filesystems=filesystems,
    )


RunnerSource = Mapping[str, Runner] | Callable[[str], Runner]


def _runner(runners: RunnerSource | Any, name: str) -> Runner | None:
    if isinstance(runners, Mapping):
        found: Runner | None = runners.get(name)
        return found
    getter = getattr(runners, "get", None)
    if callable(getter):  # RunnerPool
        got: Runner = getter(name)
        return got
    if callable(runners):
        made: Runner = runners(name)
        return made
    return None


def check_fleet(
    fleet: Fleet,
    customers: Iterable[Customer],
    runners: RunnerSource | Any,
    *,
    deadline_s: float = 10.0,
    servers: Sequence[str] | None = None,
    now: datetime | None = None,
    log_window: timedelta | None = timedelta(hours=24),
) -> list[ServerHealth]:
    """Every check on every server (or the named ones), in parallel, back by ``deadline_s``."""
    started = time.monotonic()
    now = now or datetime.now(UTC)
    limits = Limits.for_deadline(deadline_s)
    chosen = [s for s in fleet.servers if servers is None or s.name in servers]
    people = list(customers)
    pending = []
    for server in chosen:
        try:
            runner = _runner(runners, server.name)
        except DbopsError:
            runner = None
        pending.append(start_server(server, people, runner, limits))
    # Leave a moment to assemble the answer inside the deadline.
    budget = max(0.05, deadline_s - 0.05 - (time.monotonic() - started))
    wait(all_futures(pending), timeout=budget)
    waited = round(time.monotonic() - started, 1)
    since = now - log_window if log_window is not None else None
    return [finish_server(p, fleet, waited, now, since) for p in pending]
