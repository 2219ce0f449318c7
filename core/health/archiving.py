"""The ``archiving`` check and the recovery window a sweep reads, for servers that archive their
WAL with pgBackRest (``pgbackrest_config`` in fleet.toml; see core.pitr).

``archiving`` reads ``pitr.ARCHIVER_SQL`` on its own short connection as the monitoring role
(pg_monitor may read pg_stat_archiver and the archive status directory), so a role without
pg_monitor fails this check alone, not the cluster connection's pipeline. A server without
archiving has no ``archiving`` row at all (as one without pgBouncer has no ``pgbouncer`` row):
a verdict about nothing would be noise on every report, and its databases' ``recovery`` being
null already says that they have no point-in-time recovery.

The recovery window (``pitr.recovery_window``: two pgBackRest commands through the server's
runner) is read once per server per sweep and shared by every database on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg

from core import pitr
from core.fleet import Server
from core.health.queries import Limits, health_conninfo
from core.health.thresholds import Check
from core.remote import Runner


def fetch_archiver(server: Server, limits: Limits) -> dict[str, Any]:
    """The ``pitr.ARCHIVER_SQL`` row, read as the monitoring role."""
    with psycopg.connect(health_conninfo(server.dsn, limits), autocommit=True) as conn:
        row = conn.execute(pitr.ARCHIVER_SQL).fetchone()
    found = row[0] if row else None
    return dict(found) if isinstance(found, Mapping) else {}


def check_archiving(row: Mapping[str, Any] | None, now: datetime, *, error: str = "") -> Check:
    """``archiving`` from the archiver's row at ``now`` (``pitr.archiving_verdict``): warn when
    archive_command last failed after its last success, crit when WAL has waited 15 minutes
    with nothing archived; unknown when the row could not be read."""
    if row is None:
        return Check("archiving", "unknown", detail=f"cannot read the archiver: {error}"[:200])
    v = pitr.archiving_verdict(row, now)
    return Check("archiving", v.verdict, v.value, detail=v.detail)


def read_recovery(
    runner: Runner, server: Server, now: datetime, *, timeout: float
) -> pitr.RecoveryWindow | None:
    """The server's recovery window at ``now`` (None: no base backup or archive yet)."""
    return pitr.recovery_window(runner, server, now=now, timeout=timeout)
