"""Capacity: what each sweep leaves in the measurement history, the disk runways its
``disk_runway`` check judges, and the monthly capacity review's figures.

``Trends(engine)`` is one per process (core.ops.Ops holds it):

* ``record(fleet, healths, at)``: the sweep's figures (:func:`measurements`) into the history at
  the sweep's start, then ``History.compact`` when an hour has been completed since this process
  last compacted (otherwise nothing: a sweep a minute pays for one roll-up an hour). Never
  raises: a failure is logged and counted (``failures``, ``last_error``) and the sweep's answer
  stands; a compaction that failed is tried again at the next sweep.
* ``runways(server, now)``: core.trends.disk_runway as of :func:`runway_at` (``GRACE_S`` past the
  hour, when the hour before has been rolled up), cached per server until the hour turns or the
  hour tier gains a row. A sweep pays one index look-up (the newest hour row) for the whole
  fleet; every process reading the same history in the same hour gets the same figures, so the
  morning report, ``/db servers`` and ``/db status`` agree to the day.
* ``capacity_review(fleet, now)``: servers by runway (the check's own figures), customers by
  growth over 30 days: the monthly capacity review's data; ``review_text`` lays it out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from core.customers import Customer
from core.fleet import Fleet
from core.health import ServerHealth
from core.health.disk import Filesystem
from core.health.runway import runway_json
from core.health.table import run_check
from core.trends import (
    GRACE_S,
    HOUR_S,
    DatabaseSample,
    History,
    Measurements,
    Runway,
    ServerSample,
    customer_growth,
    disk_runway,
    epoch,
    from_epoch,
)
from core.units import pretty_bytes
from storage.models_history import HOUR

log = logging.getLogger(__name__)

REVIEW_DAYS = 30.0
REVIEW_TOP = 10
# The capacity review asks when each disk reaches this share of its size.
REVIEW_PERCENT = 80


def _hour(at: datetime) -> int:
    """Which roll-up is due at ``at``: it changes ``GRACE_S`` after each hour."""
    return (epoch(at) - GRACE_S) // HOUR_S


def runway_at(now: datetime) -> datetime:
    """The moment a runway is fitted as of: ``GRACE_S`` past the latest hour (never after
    ``now``), the same for every caller in that hour."""
    return from_epoch(_hour(now) * HOUR_S + GRACE_S)


def _filesystem(health: ServerHealth, path: str | None) -> Filesystem | None:
    return next((fs for fs in health.filesystems if path and path in fs.paths), None)


def measurements(fleet: Fleet, healths: Iterable[ServerHealth]) -> Measurements:
    """A sweep's figures for the history: per server its data and backup paths' filesystems
    (the same numbers twice when they share one) and backends; per customer database its size,
    connections and newest complete backup. A server or database that gave no figure at all
    is left out (a NULL row would say nothing)."""
    configs = {s.name: s for s in fleet.servers}
    servers, databases = [], []
    for health in healths:
        config = configs.get(health.name)
        data = _filesystem(health, config.data_path if config else None)
        backup = _filesystem(health, config.backup_path if config else None)
        sample = ServerSample(
            health.name,
            data.used_bytes if data else None,
            data.size_bytes if data else None,
            backup.used_bytes if backup else None,
            backup.size_bytes if backup else None,
            health.backends,
        )
        if data or backup or health.backends is not None:
            servers.append(sample)
        for db in health.databases:
            figures = (db.size_bytes, db.connections, db.backup_seconds, db.backup_bytes)
            if any(f is not None for f in figures):
                databases.append(DatabaseSample(db.customer, db.server, *figures))
    return Measurements(servers, databases)


@dataclass(frozen=True)
class Attachment:
    """A file a posting carries (the capacity review's chart): the bot uploads ``png`` as
    ``filename`` with ``title``, ``comment`` as the message that goes with it."""

    filename: str
    title: str
    png: bytes
    comment: str


class Trends:
    """The measurement history as the sweep and the capacity review use it."""

    def __init__(self, engine: Engine) -> None:
        self.history = History(engine)
        self.failures = 0  # records or compactions that failed, since the process started
        self.last_error = ""
        self.fits = 0  # runways fitted (not served from the cache)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[datetime, datetime | None], list[Runway]]] = {}
        self._newest: tuple[datetime, datetime | None] | None = None
        self._compacted: int | None = None

    # --- writing ------------------------------------------------------------------------------

    def record(self, fleet: Fleet, healths: Sequence[ServerHealth], at: datetime) -> bool:
        """Keep the sweep that started at ``at``; True when it was kept (and, when due,
        compacted). A failure is logged and counted, never raised."""
        try:
            self.history.record(measurements(fleet, healths), at)
        except Exception as exc:
            self._failed("record", exc)
            return False
        hour = _hour(at)
        if self._compacted == hour:
            return True
        try:
            self.history.compact(at)
        except Exception as exc:
            self._failed("compact", exc)
            return False
        self._compacted = hour
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = f"{what}: {type(exc).__name__}"
        log.exception("measurement history: %s failed (%d so far)", what, self.failures)

    # --- reading ------------------------------------------------------------------------------

    def _newest_hour(self, now: datetime) -> datetime | None:
        """The newest hour row, looked up once per ``now`` (one sweep asks for every server)."""
        with self._lock:
            if self._newest is not None and self._newest[0] == now:
                return self._newest[1]
        newest = self.history.newest("server", HOUR)
        with self._lock:
            self._newest = (now, newest)
        return newest

    def runways(self, server: str, now: datetime) -> list[Runway]:
        """The server's data and backup paths' runways, as of :func:`runway_at` (cached)."""
        at = runway_at(now)
        key = (at, self._newest_hour(now))
        with self._lock:
            hit = self._cache.get(server)
            if hit is not None and hit[0] == key:
                return hit[1]
        found = disk_runway(self.history, server, at)
        with self._lock:
            self._cache[server] = (key, found)
            self.fits += 1
        return found

    def capacity_review(
        self,
        fleet: Fleet,
        now: datetime,
        customers: Iterable[Customer] | None = None,
        *,
        top: int = REVIEW_TOP,
        days: float = REVIEW_DAYS,
    ) -> dict[str, Any]:
        """Servers by runway, shortest first (each the ``disk_runway`` check's own ``days``,
        ``verdict`` and ``detail``, its paths' fits, and when each path reaches
        ``REVIEW_PERCENT``%), then the ``top`` customers by growth over ``days`` (only
        ``customers`` when given, with their server)."""
        servers = []
        for server in fleet.servers:
            runways = self.runways(server.name, now)
            check = run_check("disk_runway", fleet, runways)
            entry: dict[str, Any] = {"server": server.name, **(runway_json(check, runways) or {})}
            for path, runway in zip(entry["paths"], runways, strict=True):
                path["days_to_percent"] = _days_to(runway, REVIEW_PERCENT)
            servers.append(entry)
        servers.sort(key=lambda e: (e["days"] is None, e["days"] or 0, e["server"]))
        where = {c.name: c.server for c in customers} if customers is not None else None
        grown = [
            {
                "customer": g.customer,
                "server": where.get(g.customer) if where is not None else None,
                "start_bytes": g.start_bytes,
                "end_bytes": g.end_bytes,
                "grown_bytes": g.grown_bytes,
                "percent": None if g.percent is None else round(g.percent, 1),
                "since": g.since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            for g in customer_growth(self.history, now, days)
            if where is None or g.customer in where
        ]
        return {
            "generated_at": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "days": days,
            "percent": REVIEW_PERCENT,
            "servers": servers,
            "customers": grown[:top],
        }


def _days_to(runway: Runway, percent: int) -> int | None:
    """Whole days until the path is ``percent``% full at its fitted rate (0: already there;
    None: not filling or not known)."""
    if runway.used is None or not runway.total:
        return None
    left = runway.total * percent / 100 - runway.used
    if left <= 0:
        return 0
    if not runway.filling or not runway.growth_per_day:
        return None
    return int(left / runway.growth_per_day)


def review_text(review: dict[str, Any]) -> str:
    """The capacity review's figures as plain lines (the bot escapes them for Slack)."""
    lines = [f"Disk runway, shortest first (as of {review['generated_at']}):"]
    for s in review["servers"]:
        at = [
            f"{p['path']} {review['percent']}% in {p['days_to_percent']} d"
            for p in s["paths"]
            if p.get("days_to_percent") is not None
        ]
        shown = f"{s['days']} days" if s["days"] is not None else s["verdict"]
        lines.append(
            f"  {s['server']}: {shown} ({s['detail']})" + (f"; {', '.join(at)}" if at else "")
        )
    top, days = len(review["customers"]), review["days"]
    lines.append(f"Top {top} customers by growth over {days:g} days:")
    for c in review["customers"]:
        pct = f"{c['percent']:+.1f}%" if c["percent"] is not None else "new"
        lines.append(
            f"  {c['customer']}"
            + (f" ({c['server']})" if c["server"] else "")
            + f": {pretty_bytes(c['start_bytes'])} -> {pretty_bytes(c['end_bytes'])} ({pct})"
        )
    if not review["customers"]:
        lines.append("  no customer has two readings in the window yet")
    return "\n".join(lines)
