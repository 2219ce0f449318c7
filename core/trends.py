"""Trends: the sweep's measurements kept as history, downsampled as they age, and disk runway.

``History(engine)`` is the whole interface:

* ``record(measurements, at)``: one sweep's figures (per server: disk used and total on the data
  and backup paths, backends; per customer database: size, connections, the newest backup's
  duration and size), as tier-0 rows.
* ``compact(now)``: rolls every complete hour of sweeps into an hour row and every complete day
  of hours into a day row, then drops what aged out: sweeps after two days, hours after 30 days,
  days after two years (``RETENTION``). What an aggregate keeps of each metric (last, mean, max)
  is in storage/models_history.py. Time is passed in; running it twice, or from two processes,
  leaves the same rows. A bucket is rolled ``GRACE_S`` after it ends, so a sweep still writing
  its figures at the top of the hour is counted. Roll-up goes forward from the newest aggregate:
  a sweep recorded later than that, for an hour already rolled, stays a sweep row only.
* ``series(kind, key, metric, since, until)``: the points of one metric, from the finest tier
  that still covers ``since`` (or the one asked for). An aggregate's point is at its bucket's
  start.

Disk runway (``disk_runway``): days until a server's data or backup path is full at its recent
growth rate. The rate is a Theil-Sen fit (the median of the slopes between every pair of points,
robust to the spikes and drops that a vacuum, a dump or a deleted log make) over the last 14 days
of the hour tier; the level it starts from is the fit's value now, not the last sample. A path
whose fitted growth is flat or negative, or so slow it would take over ten years, is "not
filling". ``runway_check`` turns the result into the ``disk_runway`` check's verdict: WARN under
30 days, CRIT under 7, both parameters.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Engine, and_, delete, func, select
from sqlmodel import SQLModel

from core.units import pretty_bytes
from storage.models_history import (
    DAY,
    HOUR,
    SWEEP,
    DatabaseHistory,
    ServerHistory,
    insert_missing,
)

Kind = Literal["server", "database"]
Verdict = Literal["ok", "warn", "crit", "unknown"]

HOUR_S = 3600
DAY_S = 86400
# How long each tier is kept, in seconds.
RETENTION = {SWEEP: 2 * DAY_S, HOUR: 30 * DAY_S, DAY: 730 * DAY_S}
# Which tier each one is rolled up from, and its bucket.
ROLLUPS = ((SWEEP, HOUR, HOUR_S), (HOUR, DAY, DAY_S))
GRACE_S = 600

RUNWAY_WINDOW_DAYS = 14.0
RUNWAY_MIN_SPAN_DAYS = 2.0  # less history than this says nothing about a trend
RUNWAY_MIN_POINTS = 12
RUNWAY_MAX_DAYS = 3650.0  # slower than ten years to full is "not filling"
RUNWAY_FIT_POINTS = 120  # Theil-Sen is O(n^2): the window is thinned evenly to this many
RUNWAY_WARN_DAYS = 30.0
RUNWAY_CRIT_DAYS = 7.0
PATHS = ("data", "backup")


# --- what a sweep hands over ------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSample:
    """A server's figures in one sweep. When the data and backup paths share a filesystem,
    both carry the same numbers. None: not measured this time."""

    server: str
    data_used: int | None = None
    data_total: int | None = None
    backup_used: int | None = None
    backup_total: int | None = None
    backends: int | None = None


@dataclass(frozen=True)
class DatabaseSample:
    """A customer database's figures in one sweep; the backup ones are the newest backup's."""

    customer: str
    server: str
    size_bytes: int | None = None
    connections: int | None = None
    backup_seconds: float | None = None
    backup_bytes: int | None = None


@dataclass(frozen=True)
class Measurements:
    servers: Sequence[ServerSample] = ()
    databases: Sequence[DatabaseSample] = ()


# --- how each table rolls up ------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    model: type[SQLModel]
    key: str
    last: tuple[str, ...]  # last value measured
    mean: tuple[str, ...]  # mean weighted by n; "<name>_max" is its maximum
    peak: tuple[str, ...]  # last value, and "<name>_max" its maximum

    @property
    def maxima(self) -> tuple[str, ...]:
        return tuple(f"{name}_max" for name in (*self.mean, *self.peak))

    @property
    def metrics(self) -> tuple[str, ...]:
        return (*self.last, *self.peak, *self.mean, *self.maxima)


SERVERS = _Table(
    ServerHistory,
    "server",
    last=("data_total", "backup_total"),
    mean=("backends",),
    peak=("data_used", "backup_used"),
)
DATABASES = _Table(
    DatabaseHistory,
    "customer",
    last=("server", "size_bytes", "backup_seconds", "backup_bytes"),
    mean=("connections",),
    peak=(),
)
TABLES: dict[Kind, _Table] = {"server": SERVERS, "database": DATABASES}


def epoch(at: datetime) -> int:
    if at.tzinfo is None:
        raise ValueError("history times are aware datetimes (UTC)")
    return math.floor(at.timestamp())


def from_epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _aggregate(table: _Table, rows: Sequence[dict[str, Any]], at: int) -> dict[str, Any]:
    """One bucket's row from its source rows (in time order): same rule for hours and days."""
    out: dict[str, Any] = {table.key: rows[0][table.key], "at": at}
    out["n"] = sum(r["n"] for r in rows)
    for name in (*table.last, *table.peak):
        out[name] = next((r[name] for r in reversed(rows) if r[name] is not None), None)
    for name in table.mean:
        seen = [(r[name], r["n"]) for r in rows if r[name] is not None]
        weight = sum(n for _, n in seen)
        out[name] = sum(v * n for v, n in seen) / weight if weight else None
    for name in (*table.mean, *table.peak):
        tops = [r[f"{name}_max"] if r[f"{name}_max"] is not None else r[name] for r in rows]
        present = [v for v in tops if v is not None]
        out[f"{name}_max"] = round(max(present)) if present else None
    return out


def _roll(conn: Connection, table: _Table, src: int, dst: int, width: int, hi: int) -> int:
    """Make the ``dst`` rows of every complete bucket (< hi) after the newest one there is,
    one bucket's worth of source rows at a time (a long pause is caught up in steps)."""
    cols = table.model.__table__.c  # type: ignore[attr-defined]
    names = [table.key, "at", "n", *table.metrics]
    made = 0
    newest = conn.execute(select(func.max(cols.at)).where(cols.tier == dst)).scalar()
    lo = int(newest) + width if newest is not None else 0
    while lo < hi:
        first = conn.execute(
            select(func.min(cols.at)).where(cols.tier == src, cols.at >= lo, cols.at < hi)
        ).scalar()
        if first is None:
            break
        bucket = int(first) // width * width
        found = conn.execute(
            select(*[cols[c] for c in names])
            .where(cols.tier == src, cols.at >= bucket, cols.at < bucket + width)
            .order_by(cols[table.key], cols.at)
        ).all()
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in found:
            data = dict(zip(names, row, strict=True))
            groups.setdefault(data[table.key], []).append(data)
        rows = [{**_aggregate(table, g, bucket), "tier": dst} for g in groups.values()]
        insert_missing(conn, table.model, rows)
        made += len(rows)
        lo = bucket + width
    return made


@dataclass
class CompactStats:
    rolled: dict[str, int] = field(default_factory=dict)  # "history_servers/hour": rows made
    expired: dict[str, int] = field(default_factory=dict)  # "history_servers/sweep": dropped


class History:
    """The measurement history in dbops's own database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- writing ------------------------------------------------------------------------------

    def record(self, measurements: Measurements, at: datetime) -> None:
        """Store one sweep's figures at ``at`` (recording the same sweep twice stores it once)."""
        t = epoch(at)
        servers = [
            {
                "server": s.server,
                "tier": SWEEP,
                "at": t,
                "n": 1,
                "data_used": s.data_used,
                "data_total": s.data_total,
                "backup_used": s.backup_used,
                "backup_total": s.backup_total,
                "backends": s.backends,
            }
            for s in measurements.servers
        ]
        databases = [
            {
                "customer": d.customer,
                "tier": SWEEP,
                "at": t,
                "server": d.server,
                "n": 1,
                "size_bytes": d.size_bytes,
                "connections": d.connections,
                "backup_seconds": d.backup_seconds,
                "backup_bytes": d.backup_bytes,
            }
            for d in measurements.databases
        ]
        with self.engine.begin() as conn:
            insert_missing(conn, ServerHistory, servers)
            insert_missing(conn, DatabaseHistory, databases)

    def compact(self, now: datetime) -> CompactStats:
        """Roll complete buckets up, then drop rows past their tier's retention: one transaction
        per table (on SQLite it takes the write lock first, so a sweep's record waits for it)."""
        t = epoch(now)
        stats = CompactStats()
        opts = {"sqlite_begin": "IMMEDIATE"} if self.engine.dialect.name == "sqlite" else {}
        for table in TABLES.values():
            name = table.model.__tablename__
            cols = table.model.__table__.c  # type: ignore[attr-defined]
            with self.engine.connect().execution_options(**opts) as conn, conn.begin():
                for src, dst, width in ROLLUPS:
                    hi = (t - GRACE_S) // width * width
                    stats.rolled[f"{name}/{_TIER[dst]}"] = _roll(conn, table, src, dst, width, hi)
                for tier, keep in RETENTION.items():
                    gone = conn.execute(
                        delete(table.model.__table__).where(  # type: ignore[attr-defined]
                            cols.tier == tier, cols.at < t - keep
                        )
                    )
                    stats.expired[f"{name}/{_TIER[tier]}"] = gone.rowcount
        return stats

    # --- reading ------------------------------------------------------------------------------

    def series(
        self,
        kind: Kind,
        key: str,
        metric: str,
        since: datetime,
        until: datetime,
        tier: int | None = None,
    ) -> list[tuple[datetime, float]]:
        """(time, value) of one metric of one server or customer, oldest first, NULLs left out.
        ``tier`` None: the finest tier whose retention reaches back from ``until`` to ``since``."""
        table = TABLES[kind]
        if metric not in table.metrics or metric == "server":
            raise ValueError(f"{kind} history has no metric {metric!r}")
        if tier is None:
            tier = tier_for(since, until)
        cols = table.model.__table__.c  # type: ignore[attr-defined]
        column = cols[metric]
        if tier == SWEEP and metric.endswith("_max"):
            column = func.coalesce(column, cols[metric.removesuffix("_max")])
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(cols.at, column)
                .where(
                    and_(
                        cols[table.key] == key,
                        cols.tier == tier,
                        cols.at >= epoch(since),
                        cols.at <= epoch(until),
                    )
                )
                .order_by(cols.at)
            ).all()
        return [(from_epoch(int(at)), float(v)) for at, v in rows if v is not None]

    def latest(self, kind: Kind, key: str, metric: str, until: datetime) -> float | None:
        """The newest value of a metric at or before ``until``, from the sweeps or, when none
        are left, the finest aggregate."""
        for tier in (SWEEP, HOUR, DAY):
            since = until - timedelta(seconds=RETENTION[tier])
            points = self.series(kind, key, metric, since, until, tier)
            if points:
                return points[-1][1]
        return None

    def keys(self, kind: Kind) -> list[str]:
        """Every server or customer that has history."""
        table = TABLES[kind]
        cols = table.model.__table__.c  # type: ignore[attr-defined]
        query = select(cols[table.key]).distinct().order_by(cols[table.key])
        with self.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(query)]

    def newest(self, kind: Kind, tier: int) -> datetime | None:
        """The time of the newest row of a tier, any series (one index look-up): what changes
        when a compaction has rolled a bucket up."""
        cols = TABLES[kind].model.__table__.c  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            at = conn.execute(select(func.max(cols.at)).where(cols.tier == tier)).scalar()
        return None if at is None else from_epoch(int(at))

    def counts(self) -> dict[str, int]:
        """Rows per table and tier ("history_databases/hour": 1440), for tests and the bench."""
        out: dict[str, int] = {}
        for table in TABLES.values():
            cols = table.model.__table__.c  # type: ignore[attr-defined]
            with self.engine.connect() as conn:
                query = select(cols.tier, func.count()).group_by(cols.tier)
                found = {int(tier): int(n) for tier, n in conn.execute(query)}
            for tier, name in _TIER.items():
                out[f"{table.model.__tablename__}/{name}"] = found.get(tier, 0)
        return out


_TIER = {SWEEP: "sweep", HOUR: "hour", DAY: "day"}


def tier_for(since: datetime, until: datetime) -> int:
    reach = (until - since).total_seconds()
    for tier in (SWEEP, HOUR):
        if reach <= RETENTION[tier]:
            return tier
    return DAY


# --- growth of customers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Growth:
    customer: str
    start_bytes: int
    end_bytes: int
    since: datetime

    @property
    def grown_bytes(self) -> int:
        return self.end_bytes - self.start_bytes

    @property
    def percent(self) -> float | None:
        return 100.0 * self.grown_bytes / self.start_bytes if self.start_bytes else None


def customer_growth(history: History, now: datetime, days: float = 30.0) -> list[Growth]:
    """Each customer's size change over ``days`` (first and last point of the window), most
    grown (in percent, then bytes) first: the capacity review's "who grew"."""
    since = now - timedelta(days=days)
    out = []
    for customer in history.keys("database"):
        points = history.series("database", customer, "size_bytes", since, now)
        if len(points) >= 2:
            out.append(Growth(customer, int(points[0][1]), int(points[-1][1]), points[0][0]))
    return sorted(out, key=lambda g: (-(g.percent or 0.0), -g.grown_bytes, g.customer))


# --- disk runway ------------------------------------------------------------------------------


def theil_sen(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) of the Theil-Sen line: the median of the pairwise slopes, and the
    median of y - slope * x. Needs two distinct x."""
    slopes = [
        (yj - yi) / (xj - xi)
        for i, (xi, yi) in enumerate(points)
        for xj, yj in points[i + 1 :]
        if xj != xi
    ]
    if not slopes:
        raise ValueError("a fit needs points at two different times")
    slope = statistics.median(slopes)
    return slope, statistics.median(y - slope * x for x, y in points)


def _thin(points: Sequence[tuple[float, float]], most: int) -> list[tuple[float, float]]:
    if len(points) <= most:
        return list(points)
    step = (len(points) - 1) / (most - 1)
    return [points[round(i * step)] for i in range(most)]


@dataclass(frozen=True)
class Runway:
    """One path's runway. ``days`` None: not filling (``filling`` False) or not known
    (``verdict`` unknown). ``used`` is the fitted level now; ``growth_per_day`` in bytes."""

    server: str
    path: str
    verdict: Verdict
    days: float | None
    used: float | None
    total: int | None
    growth_per_day: float | None
    filling: bool
    points: int
    now: datetime
    detail: str

    @property
    def full_at(self) -> datetime | None:
        return self.now + timedelta(days=self.days) if self.days is not None else None


def runway_verdict(
    days: float | None, warn_days: float = RUNWAY_WARN_DAYS, crit_days: float = RUNWAY_CRIT_DAYS
) -> Verdict:
    if days is None:
        return "ok"
    return "crit" if days < crit_days else "warn" if days < warn_days else "ok"


def fit_runway(
    points: Sequence[tuple[datetime, float]],
    total: int | None,
    now: datetime,
    *,
    server: str = "",
    path: str = "data",
    warn_days: float = RUNWAY_WARN_DAYS,
    crit_days: float = RUNWAY_CRIT_DAYS,
    window_days: float = RUNWAY_WINDOW_DAYS,
) -> Runway:
    """The runway of a disk of ``total`` bytes whose use is ``points``; only the last
    ``window_days`` before ``now`` count."""
    start = now - timedelta(days=window_days)
    xy = [((t - now).total_seconds() / DAY_S, v) for t, v in points if start <= t <= now]

    def unknown(why: str) -> Runway:
        return Runway(server, path, "unknown", None, None, total, None, False, len(xy), now, why)

    if not total:
        return unknown(f"{path}: disk size not known")
    if len(xy) < RUNWAY_MIN_POINTS or xy[-1][0] - xy[0][0] < RUNWAY_MIN_SPAN_DAYS:
        return unknown(f"{path}: under {RUNWAY_MIN_SPAN_DAYS:g} days of history")
    slope, level = theil_sen(_thin(xy, RUNWAY_FIT_POINTS))
    level = min(max(level, 0.0), float(total))
    left = total - level
    days = left / slope if slope > 0 else None
    pct = 100.0 * level / total
    if days is None or days > RUNWAY_MAX_DAYS:
        shrink = f"shrinking {pretty_bytes(int(-slope))}/day" if slope < 0 else "flat"
        detail = f"{path} {pct:.0f}% used, not filling ({shrink})"
        return Runway(server, path, "ok", None, level, total, slope, False, len(xy), now, detail)
    verdict = runway_verdict(days, warn_days, crit_days)
    detail = (
        f"{path} {pct:.0f}% used, full in {days:.1f} days "
        f"(+{pretty_bytes(int(slope))}/day over {window_days:g} days)"
    )
    return Runway(server, path, verdict, days, level, total, slope, True, len(xy), now, detail)


def disk_runway(
    history: History,
    server: str,
    now: datetime,
    *,
    warn_days: float = RUNWAY_WARN_DAYS,
    crit_days: float = RUNWAY_CRIT_DAYS,
    window_days: float = RUNWAY_WINDOW_DAYS,
) -> list[Runway]:
    """The runway of the server's data and backup paths, from the hour tier (each hour's last
    reading, placed at the hour's end)."""
    since = now - timedelta(days=window_days)
    out = []
    for path in PATHS:
        used = history.series("server", server, f"{path}_used", since, now, HOUR)
        points = [(t + timedelta(seconds=HOUR_S), v) for t, v in used]
        total = history.latest("server", server, f"{path}_total", now)
        out.append(
            fit_runway(
                points,
                int(total) if total else None,
                now,
                server=server,
                path=path,
                warn_days=warn_days,
                crit_days=crit_days,
                window_days=window_days,
            )
        )
    return out


@dataclass(frozen=True)
class RunwayCheck:
    """The ``disk_runway`` check, field for field a core.health Check: ``value`` is the
    shortest runway in days (None when no path is filling)."""

    name: str
    verdict: Verdict
    value: float | None
    warn: float
    crit: float
    detail: str


def runway_check(
    runways: Iterable[Runway],
    warn_days: float = RUNWAY_WARN_DAYS,
    crit_days: float = RUNWAY_CRIT_DAYS,
) -> RunwayCheck:
    """One verdict over a server's paths, by these thresholds (the worst path decides; unknown
    only when no path is known)."""
    found = list(runways)
    rank = {"ok": 0, "warn": 1, "crit": 2}
    known = [runway_verdict(r.days, warn_days, crit_days) for r in found if r.verdict != "unknown"]
    verdict: Verdict = max(known, key=lambda v: rank[v]) if known else "unknown"
    days = [r.days for r in found if r.days is not None]
    value = round(min(days), 1) if days else None
    detail = "; ".join(r.detail for r in found)
    return RunwayCheck("disk_runway", verdict, value, warn_days, crit_days, detail)


def servers_by_runway(
    history: History, servers: Iterable[str], now: datetime
) -> list[tuple[str, RunwayCheck]]:
    """Servers, the shortest runway first (not filling and unknown last): the capacity review."""
    checks = [(s, runway_check(disk_runway(history, s, now))) for s in servers]
    return sorted(checks, key=lambda sc: (sc[1].value is None, sc[1].value or 0.0, sc[0]))
