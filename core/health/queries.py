"""What a sweep fetches from PostgreSQL: the cluster connection's one pipeline and each
customer database's probe (see core.health.sweep for how and why)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from core.backups import pin_search_path
from core.fleet import APP_NAME as APP_NAME  # every health session's application_name
from core.fleet import Server


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

# What this server can answer, asked before anything that differs between majors (13 to 18) is:
# a view by to_regclass, a column by pg_attribute, a function by the role's privilege, a setting
# by pg_settings (a setting a major lacks is NULL). No version number decides what is asked.
# Differences that matter to the checks: the checkpoint counters moved from pg_stat_bgwriter
# (checkpoints_timed, checkpoints_req) to pg_stat_checkpointer (num_timed, num_requested) in 17;
# pg_replication_slots grew conflicting (16), inactive_since and invalidation_reason (17);
# reserved_connections came in 16. Every expression here exists on every major from 13 on.
CAPABILITIES_SQL = """
SELECT pg_catalog.current_setting('server_version_num')::int AS version_num,
  pg_catalog.current_setting('server_version') AS version,
  pg_catalog.pg_is_in_recovery() AS in_recovery,
  pg_catalog.to_regclass('pg_catalog.pg_stat_checkpointer') IS NOT NULL AS checkpointer,
  EXISTS (SELECT FROM pg_catalog.pg_attribute
          WHERE attrelid = pg_catalog.to_regclass('pg_catalog.pg_stat_bgwriter')
            AND attname = 'checkpoints_timed' AND NOT attisdropped) AS bgwriter_checkpoints,
  pg_catalog.has_function_privilege('pg_catalog.pg_control_checkpoint()', 'EXECUTE')
    AS control_checkpoint,
  (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'max_slot_wal_keep_size')
    AS max_slot_wal_keep_size,
  (SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'wal_segment_size')
    AS wal_segment_size,
  (SELECT setting::int FROM pg_catalog.pg_settings WHERE name = 'checkpoint_timeout')
    AS checkpoint_timeout_s,
  (SELECT setting::int FROM pg_catalog.pg_settings WHERE name = 'superuser_reserved_connections')
    AS superuser_reserved,
  (SELECT setting::int FROM pg_catalog.pg_settings WHERE name = 'reserved_connections')
    AS reserved
"""
# Where the server's WAL is now: the insert position on a primary; on a standby what it has
# received (else replayed): pg_current_wal_lsn() raises during recovery, and CASE never calls it
# there.
_WAL_NOW = """CASE WHEN pg_catalog.pg_is_in_recovery()
  THEN COALESCE(pg_catalog.pg_last_wal_receive_lsn(), pg_catalog.pg_last_wal_replay_lsn())
  ELSE pg_catalog.pg_current_wal_lsn() END"""
# check_replication_slots's delta (WAL from the slot's restart_lsn to now, 0 without one), with
# each slot's whole row as JSON: the columns this major has (wal_status and safe_wal_size from
# 13, inactive_since and invalidation_reason from 17) and no error for those it lacks.
SLOTS_SQL = f"""
SELECT pg_catalog.to_jsonb(s) AS slot,
  COALESCE(pg_catalog.pg_wal_lsn_diff({_WAL_NOW}, s.restart_lsn), 0)::bigint AS retained
FROM pg_catalog.pg_replication_slots s ORDER BY s.slot_name
"""
# The last checkpoint as pg_control has it (what check_postgres's checkpoint reads with
# pg_controldata, here through SQL: the same on every major, on a standby its restartpoint):
# its age in whole seconds and the WAL written since its record.
CONTROL_CHECKPOINT_SQL = f"""
SELECT pg_catalog.round(EXTRACT(epoch FROM pg_catalog.now() - checkpoint_time))::bigint,
  pg_catalog.pg_wal_lsn_diff({_WAL_NOW}, checkpoint_lsn)::bigint
FROM pg_catalog.pg_control_checkpoint()
"""
# Checkpoints since the statistics were reset, timed and requested: the view by capability.
CHECKPOINTER_SQL = (
    "SELECT num_timed, num_requested, stats_reset FROM pg_catalog.pg_stat_checkpointer"
)
BGWRITER_CHECKPOINTS_SQL = (
    "SELECT checkpoints_timed, checkpoints_req, stats_reset FROM pg_catalog.pg_stat_bgwriter"
)


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


@dataclass(frozen=True)
class Capabilities:
    """CAPABILITIES_SQL's row: what the server is and can answer."""

    version_num: int
    version: str
    in_recovery: bool = False
    checkpointer: bool = False  # pg_stat_checkpointer (17+)
    bgwriter_checkpoints: bool = False  # pg_stat_bgwriter.checkpoints_timed (before 17)
    control_checkpoint: bool = False  # the role may run pg_control_checkpoint()
    max_slot_wal_keep_size: str | None = None  # MB; "-1": no limit
    wal_segment_size: int | None = None  # bytes
    checkpoint_timeout_s: int | None = None
    superuser_reserved: int | None = None
    reserved: int | None = None  # reserved_connections (16+)

    @property
    def major(self) -> int:
        return self.version_num // 10000


@dataclass(frozen=True)
class Slot:
    """A replication slot: SLOTS_SQL's row, the columns this major has."""

    name: str
    type: str
    active: bool
    retained: int  # bytes of WAL from its restart_lsn to now
    wal_status: str | None = None  # reserved, extended, unreserved, lost (13+)
    inactive_since: str | None = None  # 17+
    invalidation_reason: str | None = None  # 17+

    @classmethod
    def from_row(cls, row: dict[str, Any], retained: int) -> Slot:
        return cls(
            name=str(row.get("slot_name")),
            type=str(row.get("slot_type")),
            active=bool(row.get("active")),
            retained=int(retained),
            wal_status=row.get("wal_status"),
            inactive_since=row.get("inactive_since"),
            invalidation_reason=row.get("invalidation_reason"),
        )


@dataclass(frozen=True)
class CheckpointStats:
    """The last checkpoint (pg_control_checkpoint) and the counters since the stats reset."""

    age_s: int | None = None
    wal_since: int | None = None  # bytes of WAL written since its record
    timed: int | None = None
    requested: int | None = None
    source: str = ""  # the view the counters came from
    unreadable: str = ""  # why the age could not be read


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
    # Read when the rest was; None only in a ClusterStats made by hand.
    capabilities: Capabilities | None = None
    slots: list[Slot] = field(default_factory=list)
    checkpoint: CheckpointStats | None = None
    # When the pass ran, by this machine's clock (what the version check dates against).
    at: datetime | None = None


def checkpoint_queries(caps: Capabilities) -> list[str]:
    """What the checkpoint check asks of this server: pg_control_checkpoint() where the role may
    run it, then the counters from the view this server has (none when it has neither)."""
    queries = [CONTROL_CHECKPOINT_SQL] if caps.control_checkpoint else []
    if caps.checkpointer:
        queries.append(CHECKPOINTER_SQL)
    elif caps.bgwriter_checkpoints:
        queries.append(BGWRITER_CHECKPOINTS_SQL)
    return queries


def _checkpoint(caps: Capabilities, rows: list[list[tuple[Any, ...]]]) -> CheckpointStats:
    age = wal_since = timed = requested = None
    if caps.control_checkpoint:
        control = rows.pop(0)
        if control:
            age, wal_since = control[0][0], control[0][1]
    source = ""
    if rows and rows[0]:
        timed, requested = rows[0][0][0], rows[0][0][1]
        source = "pg_stat_checkpointer" if caps.checkpointer else "pg_stat_bgwriter"
    return CheckpointStats(
        age_s=None if age is None else int(age),
        wal_since=None if wal_since is None else int(wal_since),
        timed=None if timed is None else int(timed),
        requested=None if requested is None else int(requested),
        source=source,
        unreadable=""
        if caps.control_checkpoint
        else "the monitoring role may not run pg_control_checkpoint() (grant pg_monitor)",
    )


def fetch_cluster(server: Server, limits: Limits) -> ClusterStats:
    """One connection, two pipelines: everything the cluster-wide checks read.

    The first asks what every major answers alike, the server's capabilities among it; the
    second what differs between majors, chosen by those capabilities (never an SQL error in
    the server's log for a view or column this major lacks).
    """
    started = time.monotonic()
    at = datetime.now(UTC)
    with psycopg.connect(health_conninfo(server.dsn, limits), autocommit=True) as conn:
        connect_ms = int((time.monotonic() - started) * 1000)
        first = (
            LOCKS_SQL, BACKENDS_SQL, ACTIVITY_SQL, PREPARED_SQL, DATABASES_SQL,
            CAPABILITIES_SQL, SLOTS_SQL,
        )  # fmt: skip
        with conn.pipeline():
            cursors = [conn.cursor() for _ in first]
            for cur, sql in zip(cursors, first, strict=True):
                cur.execute(sql)
        (
            locks_rows, backend_rows, activity_rows, prepared_rows, db_rows, caps_rows, slot_rows
        ) = (c.fetchall() for c in cursors)  # fmt: skip
        caps = Capabilities(*caps_rows[0])
        second = checkpoint_queries(caps)
        with conn.pipeline():
            cursors = [conn.cursor() for _ in second]
            for cur, sql in zip(cursors, second, strict=True):
                cur.execute(sql)
        checkpoint = _checkpoint(caps, [c.fetchall() for c in cursors])
    activity = [Activity(*row[:9]) for row in activity_rows if not row[9]]
    ours = {row[0] for row in activity_rows if row[9]}
    stats = ClusterStats(connect_ms=connect_ms)
    stats.locks = [(g, m, d) for g, m, d, pid in locks_rows if pid is None or pid not in ours]
    stats.backends = {name: int(current) for name, current, _ in backend_rows}
    stats.max_connections = int(backend_rows[0][2]) if backend_rows else 0
    stats.activity = activity
    stats.prepared = [(str(db), int(age)) for db, age in prepared_rows]
    stats.databases = {r[0]: DatabaseStats(*r) for r in db_rows}
    stats.capabilities = caps
    stats.slots = [Slot.from_row(row, retained) for row, retained in slot_rows]
    stats.checkpoint = checkpoint
    stats.at = at
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
