"""What a sweep fetches from PostgreSQL: the cluster connection's one pipeline and each
customer database's probe (see core.health.sweep for how and why)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from core.backups import pin_search_path
from core.fleet import Server

APP_NAME = "dbops-health"


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
