"""The measurement history and disk runway: a month of sweeps simulated with time passed in (on
SQLite and PostgreSQL), its tiers counted and its aggregates checked against the samples; the
runway fit on synthetic series, clean, noisy and shrinking."""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from core.trends import (
    DatabaseSample,
    History,
    Measurements,
    ServerSample,
    customer_growth,
    disk_runway,
    epoch,
    fit_runway,
    runway_check,
    runway_verdict,
    servers_by_runway,
)
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models_history import DAY, HOUR, SWEEP, DatabaseHistory, ServerHistory
from tests.history_sim import GIB, T0, Simulation, simulate

STEP = timedelta(minutes=30)  # 48 sweeps a day


def rows(engine: Engine, model: Any, tier: int) -> list[dict[str, Any]]:
    table = model.__table__
    with engine.connect() as conn:
        found = conn.execute(select(table).where(table.c.tier == tier).order_by(*table.primary_key))
        return [dict(r._mapping) for r in found]


def in_bucket(sim: Simulation, start: datetime, width: timedelta) -> list[tuple[int, Any]]:
    return [(i, m) for i, (at, m) in enumerate(sim.samples) if start <= at < start + width]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def month_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """One database per backend for the month's tests (the month is simulated once): they read
    it, and the one that compacts again changes nothing."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('month') / 'dbops.db'}"
    else:
        url = request.getfixturevalue("pg_databases").create()
    eng = make_engine(url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def month(month_engine: Engine) -> tuple[History, Simulation]:
    history = History(month_engine)
    return history, simulate(history, days=31, step=STEP, compact_every=12)


@pytest.mark.slow
def test_a_month_of_sweeps_keeps_each_tier_to_its_age(
    month_engine: Engine, month: tuple[History, Simulation]
) -> None:
    history, sim = month
    counts = history.counts()
    # Sweeps of the last two days (the one exactly two days old included): 2 x 48.
    # Hours: every complete hour (the last one, still in its 10-minute grace, not yet) of the
    # last 30 days: 30 x 24 - 1. Days: every complete day but the last (its hours are not all
    # rolled until 00:10): 31 - 1.
    per_series = {"sweep": 96, "hour": 719, "day": 30}
    for tier, n in per_series.items():
        assert counts[f"history_servers/{tier}"] == 2 * n
        assert counts[f"history_databases/{tier}"] == 3 * n
    sweeps = rows(month_engine, ServerHistory, SWEEP)
    assert min(r["at"] for r in sweeps) == epoch(sim.now - timedelta(days=2))
    days = rows(month_engine, ServerHistory, DAY)
    assert min(r["at"] for r in days) == epoch(T0)
    assert sum(r["n"] for r in days) == 2 * 30 * 48  # every sweep of the 30 days is in a day

    before = {
        m.__tablename__: [rows(month_engine, m, t) for t in (SWEEP, HOUR, DAY)]
        for m in (ServerHistory, DatabaseHistory)
    }
    again = history.compact(sim.now)
    assert sum(again.rolled.values()) == 0 and sum(again.expired.values()) == 0
    after = {
        m.__tablename__: [rows(month_engine, m, t) for t in (SWEEP, HOUR, DAY)]
        for m in (ServerHistory, DatabaseHistory)
    }
    assert after == before


@pytest.mark.slow
def test_aggregates_keep_last_mean_and_max(
    month_engine: Engine, month: tuple[History, Simulation]
) -> None:
    history, sim = month
    hours = {(r["customer"], r["at"]): r for r in rows(month_engine, DatabaseHistory, HOUR)}
    # An hour whose last sweep could not read cust1's size: the hour keeps the last size read.
    start = next(
        T0 + timedelta(hours=h)
        for h in range(24 * 5, 24 * 30)
        if in_bucket(sim, T0 + timedelta(hours=h), timedelta(hours=1))[-1][1]
        .databases[1]
        .size_bytes
        is None
    )
    bucket = in_bucket(sim, start, timedelta(hours=1))
    got = hours[("cust1", epoch(start))]
    sizes = [m.databases[1].size_bytes for _, m in bucket if m.databases[1].size_bytes is not None]
    conns = [m.databases[1].connections for _, m in bucket]
    assert got["n"] == len(bucket) == 2
    assert got["size_bytes"] == sizes[-1]
    assert got["connections"] == pytest.approx(statistics.mean(conns))
    assert got["connections_max"] == max(conns)
    assert got["server"] == "db2"

    day = T0 + timedelta(days=12)
    bucket = in_bucket(sim, day, timedelta(days=1))
    server_days = {(r["server"], r["at"]): r for r in rows(month_engine, ServerHistory, DAY)}
    got = server_days[("db2", epoch(day))]
    used = [m.servers[1].data_used for _, m in bucket]
    backends = [m.servers[1].backends for _, m in bucket]
    assert got["n"] == 48
    assert got["data_used"] == used[-1] and got["data_used_max"] == max(used)
    assert got["data_total"] == 100 * GIB
    assert got["backends"] == pytest.approx(statistics.mean(backends))
    assert got["backends_max"] == max(backends)
    assert got["backup_used"] == bucket[-1][1].servers[1].backup_used
    database_days = {(r["customer"], r["at"]): r for r in rows(month_engine, DatabaseHistory, DAY)}
    got = database_days[("cust2", epoch(day))]
    assert got["backup_seconds"] == bucket[-1][1].databases[2].backup_seconds
    assert got["connections"] == pytest.approx(
        statistics.mean(m.databases[2].connections for _, m in bucket)
    )

    # series() picks the tier that reaches back far enough, and returns what is stored.
    month_points = history.series(
        "server", "db1", "data_used", sim.now - timedelta(days=30), sim.now
    )
    assert len(month_points) == 719
    stored = {
        r["at"]: r["data_used"]
        for r in rows(month_engine, ServerHistory, HOUR)
        if r["server"] == "db1"
    }
    assert all(stored[epoch(t)] == v for t, v in month_points)
    recent = history.series("server", "db1", "data_used_max", sim.now - timedelta(hours=6), sim.now)
    assert len(recent) == 12  # sweeps: a sweep's peak is its reading
    assert recent[-1] == (sim.samples[-1][0], float(sim.samples[-1][1].servers[0].data_used))


def test_recording_a_sweep_twice_stores_it_once(engine: Engine) -> None:
    history = History(engine)
    m = Measurements([ServerSample("db1", 1, 2, 3, 4, 5)], [DatabaseSample("c", "db1", 10, 1)])
    history.record(m, T0)
    history.record(m, T0)
    assert history.counts()["history_servers/sweep"] == 1
    assert history.counts()["history_databases/sweep"] == 1


def test_days_are_kept_two_years(engine: Engine) -> None:
    history = History(engine)

    def sweep(day: int) -> None:
        at = T0 + timedelta(days=day, hours=12)
        history.record(Measurements([ServerSample("db1", day, 100)]), at)
        history.compact(at + timedelta(days=1, hours=1))

    for day in (0, 1, 2, 400):
        sweep(day)
    assert history.counts()["history_servers/day"] == 4
    history.compact(T0 + timedelta(days=731, hours=12))  # day 1 ended 730 days before
    days = rows(engine, ServerHistory, DAY)
    assert [r["data_used"] for r in days] == [2, 400]
    assert history.counts()["history_servers/sweep"] == 0
    assert history.counts()["history_servers/hour"] == 0


@pytest.mark.slow
def test_runway_of_the_simulated_month(
    month_engine: Engine, month: tuple[History, Simulation]
) -> None:
    history, sim = month
    data, backup = disk_runway(history, "db1", sim.now)
    assert data.filling and data.days == pytest.approx(20, abs=1)
    assert data.verdict == "warn"
    assert backup.verdict == "ok" and not backup.filling and "not filling" in backup.detail
    check = runway_check([data, backup])
    assert (check.name, check.verdict, check.value) == ("disk_runway", "warn", round(data.days, 1))
    assert runway_check([data, backup], warn_days=10, crit_days=25).verdict == "crit"
    # db2 holds half as much (40 GiB of 100) and grows half as fast: 120 days.
    order = servers_by_runway(history, ["db2", "db1"], sim.now)
    assert [s for s, _ in order] == ["db1", "db2"]
    assert order[1][1].value == pytest.approx(120, abs=3)
    growth = customer_growth(history, sim.now)
    assert [g.customer for g in growth] == ["cust0", "cust1", "cust2"]  # smallest grew most (%)
    assert all(g.grown_bytes > 0 for g in growth)


# --- the fit, on synthetic series -------------------------------------------------------------

NOW = T0 + timedelta(days=100)
DISK = 100 * 10**9
GB = 10**9


def hourly(days: float, value: Any) -> list[tuple[datetime, float]]:
    hours = int(days * 24)
    return [(NOW - timedelta(hours=h), value(h / 24)) for h in range(hours, -1, -1)]


def test_one_gb_a_day_at_80_percent_is_20_days() -> None:
    runway = fit_runway(hourly(14, lambda ago: 80 * GB - ago * GB), DISK, NOW)
    assert runway.days == pytest.approx(20, abs=1)
    assert runway.growth_per_day == pytest.approx(GB, rel=0.01)
    assert runway.verdict == "warn"
    assert runway.full_at == pytest.approx(NOW + timedelta(days=20), abs=timedelta(days=1))


def test_a_noisy_series_is_within_two_days() -> None:
    rng = random.Random(20)

    def noisy(ago: float) -> float:
        value = 80 * GB - ago * GB + rng.gauss(0, 1.5 * GB)
        if rng.random() < 0.05:  # a dump or a runaway temp file for an hour
            value += rng.uniform(5, 15) * GB
        return value

    points = hourly(14, noisy)
    runway = fit_runway(points, DISK, NOW)
    assert runway.days == pytest.approx(20, abs=2)
    # The last reading alone would be off by its noise; the fit is not moved by the spikes.
    assert runway.used == pytest.approx(80 * GB, abs=1 * GB)


def test_shrinking_and_flat_are_not_filling() -> None:
    shrinking = fit_runway(hourly(14, lambda ago: 60 * GB + ago * GB / 2), DISK, NOW)
    assert not shrinking.filling and shrinking.days is None and shrinking.verdict == "ok"
    assert "not filling (shrinking" in shrinking.detail
    flat = fit_runway(hourly(14, lambda ago: 60 * GB), DISK, NOW)
    assert not flat.filling and "not filling (flat)" in flat.detail


def test_only_the_last_two_weeks_count() -> None:
    # Fast growth a month ago, 1 GB/day since: the runway follows the recent rate.
    points = hourly(40, lambda ago: 80 * GB - ago * GB - max(0.0, ago - 14) * 3 * GB)
    assert fit_runway(points, DISK, NOW).days == pytest.approx(20, abs=1)


def test_too_little_history_is_unknown() -> None:
    runway = fit_runway(hourly(1, lambda ago: 80 * GB - ago * GB), DISK, NOW)
    assert runway.verdict == "unknown" and runway.days is None
    assert fit_runway(hourly(14, lambda ago: GB), None, NOW).verdict == "unknown"
    assert runway_check([runway]).verdict == "unknown"


def test_full_disk_is_zero_days() -> None:
    runway = fit_runway(hourly(14, lambda ago: DISK + GB - ago * GB), DISK, NOW)
    assert runway.days == 0 and runway.verdict == "crit"


@pytest.mark.parametrize(
    ("days", "verdict"), [(None, "ok"), (45.0, "ok"), (30.0, "ok"), (29.9, "warn"), (6.9, "crit")]
)
def test_runway_thresholds(days: float | None, verdict: str) -> None:
    assert runway_verdict(days) == verdict
    assert runway_verdict(days, warn_days=60, crit_days=40) == (
        "ok" if days is None else "crit" if days < 40 else "warn"
    )
