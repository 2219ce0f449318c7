"""A sweep: every check on every server (``check_fleet``), in parallel, back by its deadline.

How a sweep talks to a server, and why:

* One connection per cluster, with the monitoring DSN, for every cluster-wide view. Its queries
  go in one pipeline (one round trip), locks first: in autocommit a pipeline is one implicit
  transaction, and the lock count must see only the lock its own statement takes, as
  check_postgres's does.
* One short connection per customer database for ``connection`` (connect_timeout small),
  which then asks for ``last_vacuum``'s figures: one more query, no other connection.
* Every connection says application_name=dbops and carries statement_timeout and
  lock_timeout as startup options, so no health query can hang on a lock or run away. dbops's
  own sessions (application_name dbops: these probes, a backup's pg_dump, a restore test) are
  left out of backends, activity, locks and the log.
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
* Where the server archives its WAL with pgBackRest (``pgbackrest_config``): the archiver's
  row on a connection of its own (``archiving``), and the recovery window through the runner
  (``pgbackrest info`` and ``repo-ls``), read once and shared by the server's databases as
  their ``recovery`` (core.health.archiving).
* ``disk_runway``, where the caller hands the sweep a source of runways (core.capacity.Trends:
  the measurement history, fitted once an hour per server): read in the caller's thread while
  the servers answer, so it costs the sweep no time; a history that cannot be read makes the
  check ``unknown``, never the sweep fail.
* Every piece runs in its own daemon thread and a sweep waits on them only until its deadline:
  a server that hangs is marked ``crit`` by the waiter, nobody joins the stuck thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

import psycopg

from core import pitr
from core.backups import backup_files_argv, backups_from_files, parse_backup_files
from core.customers import Customer
from core.errors import DbopsError, Unreachable
from core.fleet import Fleet, Server
from core.health.archiving import fetch_archiver, read_recovery
from core.health.backup_checks import BackupSeen, backup_perms_argv, backups_by_customer
from core.health.disk import Filesystem, df_argv, parse_df
from core.health.logfile import LOG_TAIL_BYTES, log_argv, scan_log
from core.health.pgbouncer import PgBouncerStats, fetch_pgbouncer
from core.health.postgres import is_full
from core.health.queries import (
    ClusterStats,
    Limits,
    Probe,
    fetch_cluster,
    pg_error_text,
    probe_database,
    with_cluster_stats,
)
from core.health.table import (
    DATABASE_CHECKS,
    SERVER_CHECKS,
    cluster_checks,
    cluster_down,
    in_report_order,
    run_check,
    run_database_check,
)
from core.health.thresholds import Check
from core.remote import CommandResult, Runner
from core.trends import Runway

log = logging.getLogger(__name__)

# Probes per server at a time: enough that a typical server's databases are probed in one wave
# (each probe is 4-5 round trips), few enough to leave max_connections alone.
PROBES_PER_SERVER = 16


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
    # DESIGN.md's ``recovery`` ({earliest, latest, rpo_seconds}): its server's recovery window,
    # None where the server has no archiving or no window yet.
    recovery: dict[str, Any] | None = None
    # The newest complete backup's duration and size (for the measurement history).
    backup_seconds: float | None = None
    backup_bytes: int | None = None


@dataclass
class ServerHealth:
    name: str
    reachable: bool
    postgres: Literal["up", "down"]
    checks: list[Check]
    databases: list[DatabaseHealth]
    filesystems: list[Filesystem] = field(default_factory=list)
    # The recovery window (servers with pgbackrest_config that have one), read this sweep.
    recovery: pitr.RecoveryWindow | None = None
    # Client backends on the cluster, ours left out (None: PostgreSQL not answering).
    backends: int | None = None
    # The runways the disk_runway check judged (empty: the sweep was given no history).
    runways: list[Runway] = field(default_factory=list)

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
    # None: the server has no WAL archiving configured, so no archiving check, no recovery.
    archiver: Future[dict[str, Any]] | None = None
    recovery: Future[pitr.RecoveryWindow | None] | None = None


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

    def recovery(now: datetime) -> pitr.RecoveryWindow | None:
        if runner is None or connected is None:
            raise Unreachable(f"no runner for {server.name}")
        connected.result()
        return read_recovery(runner, server, now, timeout=limits.command_timeout_s)

    archiving = bool(server.pgbackrest_config)
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
        archiver=(
            spawn(lambda: fetch_archiver(server, limits), f"{tag}-archiver") if archiving else None
        ),
        recovery=(
            spawn(lambda: recovery(datetime.now(UTC)), f"{tag}-recovery") if archiving else None
        ),
    )


def all_futures(pending: Iterable[_Pending]) -> list[Future[Any]]:
    out: list[Future[Any]] = []
    for p in pending:
        out += [p.cluster, p.df, p.log, p.backups, p.perms, *p.probes.values()]
        if p.pgbouncer is not None:
            out.append(p.pgbouncer)
        out += [f for f in (p.archiver, p.recovery) if f is not None]
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
    p: _Pending,
    fleet: Fleet,
    waited_s: float,
    now: datetime,
    log_since: datetime | None,
    *,
    runways: Outcome[list[Runway]] | None = None,
) -> ServerHealth:
    """Turn one server's futures, done or not, into its checks (``runways``: what the
    disk_runway check judges; None, no such check)."""
    server = p.server
    stats_out = _outcome(p.cluster, waited_s)
    stats, cluster_error = stats_out.value, stats_out.error
    checks: list[Check] = (
        [run_check("connection", fleet, stats), *cluster_checks(stats, fleet)]
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
            checks.append(run_check("disk_space", fleet, filesystems))
        else:
            checks.append(
                Check("disk_space", "unknown", detail=f"df failed: {df.stderr.strip()[:160]}")
            )
    else:
        checks.append(Check("disk_space", "crit", detail=f"server not answering: {df_error}"))
    if runways is not None:
        if runways.value is not None:
            checks.append(run_check("disk_runway", fleet, runways.value))
        else:
            why = f"cannot read the disk history: {runways.error}"
            checks.append(Check("disk_runway", "unknown", detail=why))

    log_out = _outcome(p.log, waited_s)
    log, log_error = log_out.value, log_out.error
    if log is not None:
        reachable = True
        if log.ok:
            partial = len(log.stdout.encode()) >= LOG_TAIL_BYTES
            found = scan_log(log.stdout, log_since, partial_first_line=partial)
            checks.append(run_check("logfile", fleet, found))
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
        checks.append(run_check("backup_perms", fleet, perms_out.value, server.backup_path))
    else:
        why = f"server not answering: {perms_out.error}"
        checks.append(Check("backup_perms", "unknown", detail=why))
    if p.pgbouncer is not None:
        bouncer = _outcome(p.pgbouncer, waited_s)
        checks.append(
            run_check(
                "pgbouncer",
                fleet,
                bouncer.value,
                [c.database for c in p.customers],
                error=bouncer.error,
            )
        )

    if p.archiver is not None:
        archiver = _outcome(p.archiver, waited_s)
        checks.append(run_check("archiving", fleet, archiver.value, now, error=archiver.error))
    window = _outcome(p.recovery, waited_s).value if p.recovery is not None else None
    if window is not None:  # the RPO as of the sweep's own time
        window = pitr.RecoveryWindow(
            window.earliest, window.latest, max(0, int((now - window.latest).total_seconds()))
        )
    recovery = window.as_json() if window is not None else None

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
        conn = run_database_check("connection", fleet, probe or Probe(False, 0, probe_error))
        db = stats.databases.get(customer.database) if stats else None
        if stats is None:
            why = f"PostgreSQL not answering: {cluster_error}"
            size = Check("database_size", "unknown", detail=why)
            ratio = Check("hitratio", "unknown", detail=why)
        else:
            size = run_database_check("database_size", fleet, db)
            ratio = run_database_check("hitratio", fleet, db)
        if backups is not None:
            age, last = run_database_check(
                "backup_age", fleet, by_customer.get(customer.name, []), now=now
            )
        else:
            age, last = (
                Check("backup_age", "crit", detail=f"cannot list backups: {backup_error}"),
                None,
            )
        verified = (
            run_database_check(
                "backup_verified", fleet, backups, server.backup_path, customer.name, now
            )
            if backups is not None
            else Check("backup_verified", "unknown", detail=f"cannot list backups: {backup_error}")
        )
        if probe is None or not probe.ok:
            why = f"database not answering: {probe.error if probe else probe_error}"
            vacuum = Check("last_vacuum", "unknown", detail=why)
        else:
            why = f"cannot read vacuum times: {probe.vacuum_error}"
            vac = with_cluster_stats(probe.vacuum, db)
            vacuum = run_database_check("last_vacuum", fleet, vac, error=why)
        connections = stats.backends.get(customer.database) if stats else None
        newest = next(
            (
                b
                for b in backups_from_files(
                    backups or {}, server.backup_path, server.name, customer.name
                )
                if b.complete
            ),
            None,
        )
        took = (
            (newest.finished_at - newest.started_at).total_seconds()
            if newest and newest.started_at and newest.finished_at
            else None
        )
        databases.append(
            DatabaseHealth(
                customer=customer.name,
                server=server.name,
                database=customer.database,
                online=conn.verdict == "ok",
                size_bytes=db.size_bytes if db else None,
                last_backup_at=last,
                connections=connections,
                backup_seconds=took,
                backup_bytes=newest.size_bytes if newest else None,
                checks=in_report_order([conn, size, ratio, vacuum, age, verified], DATABASE_CHECKS),
                recovery=recovery,
            )
        )
    return ServerHealth(
        name=server.name,
        reachable=reachable,
        postgres="up" if stats is not None or is_full(cluster_error) else "down",
        checks=in_report_order(checks, SERVER_CHECKS),
        databases=databases,
        filesystems=filesystems,
        recovery=window,
        backends=sum(stats.backends.values()) if stats is not None else None,
        runways=list(runways.value or []) if runways is not None else [],
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
    runways: Callable[[str, datetime], Sequence[Runway]] | None = None,
) -> list[ServerHealth]:
    """Every check on every server (or the named ones), in parallel, back by ``deadline_s``.

    ``runways(server, now)``: the server's disk runways, for the disk_runway check (None: no
    such check)."""
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
    fitted = {s.name: _runways(runways, s.name, now) for s in chosen} if runways else {}
    # Leave a moment to assemble the answer inside the deadline.
    budget = max(0.05, deadline_s - 0.05 - (time.monotonic() - started))
    wait(all_futures(pending), timeout=budget)
    waited = round(time.monotonic() - started, 1)
    since = now - log_window if log_window is not None else None
    return [
        finish_server(p, fleet, waited, now, since, runways=fitted.get(p.server.name))
        for p in pending
    ]


def _runways(
    source: Callable[[str, datetime], Sequence[Runway]], server: str, now: datetime
) -> Outcome[list[Runway]]:
    """The server's runways, or why they could not be read (logged: it is our own database)."""
    try:
        return Outcome(list(source(server, now)), "")
    except Exception as exc:
        log.exception("disk runway of %s not read", server)
        return Outcome(None, type(exc).__name__)
