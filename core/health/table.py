"""The one ordered table of checks: name -> function, scope, threshold keys."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg

from core.fleet import Fleet, Server
from core.health.archiving import check_archiving
from core.health.backup_checks import check_backup_age, check_backup_perms, check_backup_verified
from core.health.disk import check_disk_space
from core.health.logfile import check_logfile
from core.health.pgbouncer import check_pgbouncer
from core.health.postgres import (
    check_backends,
    check_checkpoint,
    check_database_connection,
    check_database_size,
    check_hitratio,
    check_last_vacuum,
    check_locks,
    check_prepared_txns,
    check_query_time,
    check_replication_slots,
    check_server_connection,
    check_txn_idle,
    check_txn_time,
    check_txn_wraparound,
    check_version,
    is_full,
)
from core.health.queries import ClusterStats, Limits, fetch_cluster, pg_error_text
from core.health.runway import check_disk_runway
from core.health.thresholds import Check, _limits

Scope = Literal["server", "cluster", "database"]


@dataclass(frozen=True)
class CheckSpec:
    """One row of the check table.

    ``scope`` says where the check runs: ``server`` checks read the host (or its pgBouncer),
    ``cluster`` checks read the cluster connection's one pipeline and share its failure (see
    :func:`cluster_down`), ``database`` checks run once per customer database. ``thresholds``
    are the ``fleet.threshold()`` keys the check reads, none for a check without thresholds.

    ``fn`` takes what the check reads, then its thresholds (``warn, crit`` for one key, a
    ``(warn, crit)`` pair per key for several), then any options by keyword: :meth:`run`.
    """

    name: str
    scope: Scope
    fn: Callable[..., Any]
    thresholds: tuple[str, ...] = ()

    def limits(self, fleet: Fleet | None) -> tuple[Any, ...]:
        """The threshold arguments ``fn`` takes after its inputs, read from ``fleet``."""
        if not self.thresholds:
            return ()
        if fleet is None:
            raise ValueError(f"the {self.name} check reads thresholds: it needs the fleet")
        if len(self.thresholds) == 1:
            return _limits(fleet, self.thresholds[0])
        return tuple(_limits(fleet, key) for key in self.thresholds)

    def run(self, fleet: Fleet | None, *inputs: Any, **options: Any) -> Any:
        """``fn(*inputs, *thresholds, **options)``: the check, with the fleet's thresholds."""
        return self.fn(*inputs, *self.limits(fleet), **options)


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
    CheckSpec("replication_slots", "cluster", check_replication_slots, ("replication_slots",)),
    CheckSpec("checkpoint", "cluster", check_checkpoint, ("checkpoint",)),
    CheckSpec("version", "cluster", check_version, ("version",)),
    CheckSpec("disk_space", "server", check_disk_space, ("disk_space",)),
    # From the measurement history, only where the sweep is given it (core.capacity.Trends).
    CheckSpec("disk_runway", "server", check_disk_runway, ("disk_runway",)),
    CheckSpec("logfile", "server", check_logfile, ("logfile",)),
    CheckSpec("backup_perms", "server", check_backup_perms),
    CheckSpec("pgbouncer", "server", check_pgbouncer, ("pgb_pool_cl_waiting", "pgb_pool_maxwait")),
    # Only where the server archives its WAL (pgbackrest_config), as pgbouncer only where set up.
    CheckSpec("archiving", "server", check_archiving),
    CheckSpec("connection", "database", check_database_connection),
    CheckSpec("database_size", "database", check_database_size, ("database_size",)),
    CheckSpec("hitratio", "database", check_hitratio, ("hitratio",)),
    CheckSpec("last_vacuum", "database", check_last_vacuum, ("last_vacuum",)),
    CheckSpec("backup_age", "database", check_backup_age, ("backup_age",)),
    CheckSpec("backup_verified", "database", check_backup_verified),
)
# A server's checks by name, in report order; its cluster-wide ones; a database's.
SERVER_CHECKS = tuple(c.name for c in CHECKS if c.scope != "database")
CLUSTER_CHECKS = tuple(c for c in CHECKS if c.scope == "cluster")
DATABASE_CHECKS = tuple(c.name for c in CHECKS if c.scope == "database")
# A row by where it runs and its name ("connection" is both a server's and a database's).
_BY_NAME: dict[tuple[str, str], CheckSpec] = {
    ("database" if c.scope == "database" else "server", c.name): c for c in CHECKS
}


def check_spec(name: str, *, database: bool = False) -> CheckSpec:
    """The table's row for a server's check ``name`` (or, with ``database``, a database's)."""
    return _BY_NAME["database" if database else "server", name]


def run_check(name: str, fleet: Fleet | None, *inputs: Any, **options: Any) -> Any:
    """A server's check ``name`` through its row of the table: see :meth:`CheckSpec.run`."""
    return check_spec(name).run(fleet, *inputs, **options)


def run_database_check(name: str, fleet: Fleet | None, *inputs: Any, **options: Any) -> Any:
    """A database's check ``name`` through its row of the table: see :meth:`CheckSpec.run`."""
    return check_spec(name, database=True).run(fleet, *inputs, **options)


def in_report_order(checks: Iterable[Check], order: Sequence[str]) -> list[Check]:
    """``checks`` sorted the way the table orders them (a name not in ``order`` is a bug)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(checks, key=lambda c: rank[c.name])


def cluster_checks(stats: ClusterStats, fleet: Fleet) -> list[Check]:
    """The cluster-wide checks, in table order, on one pass over the cluster's views."""
    return [spec.run(fleet, stats) for spec in CLUSTER_CHECKS]


def check_cluster(server: Server, fleet: Fleet, limits: Limits | None = None) -> list[Check]:
    """The server's ``connection`` and cluster-wide checks, now (for tools and tests)."""
    try:
        stats = fetch_cluster(server, limits or Limits())
    except psycopg.Error as exc:
        return cluster_down(pg_error_text(exc))
    return [run_check("connection", fleet, stats), *cluster_checks(stats, fleet)]


def cluster_down(error: str) -> list[Check]:
    """No cluster connection: connection is crit, what it would have told us is unknown.

    Except backends when the refusal was "too many clients": that is the answer, and
    check_postgres's backends calls it critical too.
    """
    checks = [run_check("connection", None, None, error)]
    for name in (spec.name for spec in CLUSTER_CHECKS):
        if name == "backends" and is_full(error):
            checks.append(Check(name, "crit", detail=f"no free connection slots: {error}"))
        else:
            checks.append(Check(name, "unknown", detail=f"PostgreSQL not answering: {error}"))
    return checks
