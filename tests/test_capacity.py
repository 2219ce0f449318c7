"""The sweep's side of the measurement history (core.capacity) and the disk_runway check: the
figures a sweep keeps, a failure to keep them that never fails the sweep, a compaction once an
hour, runways fitted once an hour per server, the check's thresholds from the fleet file, and
the capacity review's figures. Time is passed in."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from core.capacity import Trends, measurements, review_text, runway_at
from core.checklists import get_checklist
from core.customers import Customer
from core.errors import NotFound
from core.fleet import Fleet, parse_fleet
from core.health import DatabaseHealth, Filesystem, ServerHealth, check_fleet
from core.health.runway import check_disk_runway, parse_days
from core.health.table import run_check
from core.health.thresholds import BadThreshold
from core.ops import Ops
from core.trends import (
    DatabaseSample,
    History,
    Runway,
    ServerSample,
    disk_runway,
    fit_runway,
)
from storage.db import make_engine
from storage.events import EventLog
from tests.history_sim import GIB, T0, simulate

NOW = T0 + timedelta(days=100)


def fleet_of(*names: str, thresholds: dict[str, Any] | None = None) -> Fleet:
    """Servers whose PostgreSQL refuses at once (port 1), with the paths the samples name."""
    return parse_fleet(
        {
            "servers": [
                {
                    "name": name,
                    "dsn": "host=127.0.0.1 port=1 user=m dbname=postgres connect_timeout=1",
                    "data_path": f"/srv/{name}/data",
                    "backup_path": f"/srv/{name}/backups",
                }
                for name in names
            ],
            "thresholds": thresholds or {},
        }
    )


def hourly(days: float, used: Any, total: int = 100 * GIB) -> list[tuple[datetime, float]]:
    hours = int(days * 24)
    return [(NOW - timedelta(hours=h), used(h / 24)) for h in range(hours, -1, -1)]


def runways(days: float, used: Any) -> list[Runway]:
    points = hourly(days, used)
    return [
        fit_runway(points, 100 * GIB, NOW, server="db1", path="data"),
        fit_runway(hourly(days, lambda ago: 10 * GIB), 200 * GIB, NOW, server="db1", path="backup"),
    ]


# --- the check ----------------------------------------------------------------------------------


def test_thresholds_are_days_or_times() -> None:
    assert parse_days(30) == parse_days("30") == parse_days("30d") == 30
    assert parse_days("4w") == 28 and parse_days("36h") == 1.5
    for bad in ("soon", "0", -3, True, "", None):
        with pytest.raises(BadThreshold):
            parse_days(bad)
    got = check_disk_runway(runways(14, lambda ago: 80 * GIB - ago * GIB), "soon", "7d")
    assert got.verdict == "unknown" and "'soon' is not a number of days" in got.detail


def test_filling_warns_with_the_shortest_runway_in_whole_days() -> None:
    found = runways(14, lambda ago: 80.5 * GIB - ago * GIB)  # 19.5 days left
    data, _ = found
    assert data.days is not None and 19 < data.days < 20
    got = check_disk_runway(found, "30d", "7d")
    assert (got.verdict, got.value, got.warn, got.crit) == ("warn", 19, 30, 7)
    assert got.value == math.floor(data.days)
    assert "data 80% used, full in 19.5 days" in got.detail and "backup" in got.detail
    assert check_disk_runway(found, 60, 20).verdict == "crit"
    assert check_disk_runway(found, "2w", "1w").verdict == "ok"


def test_not_filling_is_ok_and_too_little_history_says_so() -> None:
    steady = check_disk_runway(runways(14, lambda ago: 60 * GIB + ago * GIB), 30, 7)
    assert (steady.verdict, steady.value) == ("ok", None)
    assert "not filling (shrinking" in steady.detail
    young = check_disk_runway(runways(1, lambda ago: 80 * GIB - ago * GIB), 30, 7)
    assert young.verdict == "unknown" and young.value is None
    assert young.detail == "too little history: 25 hours of disk readings, a trend needs 2 days"
    nothing = check_disk_runway(
        [fit_runway([], None, NOW, path="data"), fit_runway([], None, NOW, path="backup")], 30, 7
    )
    assert nothing.detail == "no disk history yet: a trend needs 2 days of hourly readings"


def test_the_fleet_file_sets_the_thresholds() -> None:
    found = runways(14, lambda ago: 80.5 * GIB - ago * GIB)
    default = run_check("disk_runway", fleet_of("db1"), found)
    assert (default.verdict, default.warn, default.crit) == ("warn", 30, 7)
    strict = fleet_of("db1", thresholds={"disk_runway": {"warn": "8w", "crit": 21}})
    got = run_check("disk_runway", strict, found)
    assert (got.verdict, got.warn, got.crit) == ("crit", 56, 21)


# --- what a sweep keeps -------------------------------------------------------------------------


def health_of(name: str, *, shared: bool, used: int, backends: int | None = 7) -> ServerHealth:
    data, backups = f"/srv/{name}/data", f"/srv/{name}/backups"
    if shared:
        systems = [Filesystem("/dev/vda1", "/", 100 * GIB, used, 100 * GIB - used, 50,
                              (data, f"{data}/pg_wal", backups))]  # fmt: skip
    else:
        systems = [
            Filesystem("/dev/vda1", "/", 100 * GIB, used, 100 * GIB - used, 50, (data,)),
            Filesystem("/dev/vdb1", "/b", 200 * GIB, 3 * GIB, 197 * GIB, 2, (backups,)),
        ]
    dbs = [
        DatabaseHealth("acme", name, "acme", True, 5 * GIB, T0, 4, [], None, 12.5, 10**8),
        DatabaseHealth("gone", name, "gone", False, None, None, None, []),
    ]
    return ServerHealth(name, True, "up", [], dbs, systems, backends=backends)


def test_a_sweep_keeps_disk_backends_and_each_databases_figures() -> None:
    fleet = fleet_of("db1", "db2", "db3")
    dark = ServerHealth("db3", False, "down", [], [], [])
    got = measurements(
        fleet, [health_of("db1", shared=True, used=40 * GIB), health_of("db2", shared=False,
                used=50 * GIB, backends=None), dark]
    )  # fmt: skip
    assert got.servers == [
        ServerSample("db1", 40 * GIB, 100 * GIB, 40 * GIB, 100 * GIB, 7),
        ServerSample("db2", 50 * GIB, 100 * GIB, 3 * GIB, 200 * GIB, None),
    ]  # db3 said nothing: no row
    assert got.databases == [
        DatabaseSample("acme", "db1", 5 * GIB, 4, 12.5, 10**8),
        DatabaseSample("acme", "db2", 5 * GIB, 4, 12.5, 10**8),
    ]  # "gone" said nothing either


def test_a_failure_to_record_is_logged_and_counted_never_raised(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    trends = Trends(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"))  # no tables at all
    fleet = fleet_of("db1")
    with caplog.at_level(logging.ERROR, logger="core.capacity"):
        assert trends.record(fleet, [health_of("db1", shared=True, used=GIB)], T0) is False
    assert trends.failures == 1 and trends.last_error == "record: OperationalError"
    assert "measurement history: record failed (1 so far)" in caplog.text


def test_a_history_that_cannot_be_read_makes_the_check_unknown(tmp_path: Any) -> None:
    trends = Trends(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"))
    fleet = fleet_of("db1")
    (health,) = check_fleet(fleet, [], {}, deadline_s=1.5, now=NOW, runways=trends.runways)
    got = health.check("disk_runway")
    assert got is not None and got.verdict == "unknown"
    assert got.detail == "cannot read the disk history: OperationalError"
    assert health.postgres == "down"  # the rest of the sweep went on as ever
    (plain,) = check_fleet(fleet, [], {}, deadline_s=1.5, now=NOW)
    assert plain.check("disk_runway") is None  # no history given: no such check


def test_compaction_runs_once_an_hour(sqlite_engine: Engine) -> None:
    trends = Trends(sqlite_engine)
    fleet = fleet_of("db1")
    done: list[datetime] = []
    compact = trends.history.compact
    trends.history.compact = lambda now: (done.append(now), compact(now))[1]  # type: ignore[method-assign]
    start = T0 + timedelta(hours=10)
    sweeps = [start + timedelta(minutes=m) for m in (0, 5, 9, 11, 30, 59, 71, 72)]
    for at in sweeps:
        assert trends.record(fleet, [health_of("db1", shared=True, used=GIB)], at)
    # The first sweep of the process, then each first sweep after 10 past the hour.
    assert done == [sweeps[0], sweeps[3], sweeps[6]]
    assert trends.history.counts()["history_servers/hour"] == 1  # 10:00-11:00 is not over yet


def test_runways_are_fitted_once_an_hour_and_again_after_a_roll_up(sqlite_engine: Engine) -> None:
    history = History(sqlite_engine)
    sim = simulate(history, days=3, step=timedelta(hours=1), compact_every=24, customers=0)
    trends = Trends(sqlite_engine)
    now = sim.now + timedelta(minutes=20)
    first = trends.runways("db1", now)
    assert trends.runways("db1", now + timedelta(minutes=10)) is first and trends.fits == 1
    assert runway_at(now) == sim.now + timedelta(minutes=10)
    assert first == disk_runway(history, "db1", runway_at(now))
    # The last hour rolled up by another process (its compaction came late): fitted again.
    history.compact(sim.now + timedelta(minutes=25))
    again = trends.runways("db1", now + timedelta(minutes=20))
    assert again is not first and trends.fits == 2
    assert again[0].points == first[0].points + 1
    assert trends.runways("db2", now + timedelta(minutes=20)) and trends.fits == 3
    # The next hour: fitted as of 01:10.
    later = trends.runways("db1", sim.now + timedelta(hours=1, minutes=10))
    assert later[0].now == sim.now + timedelta(hours=1, minutes=10) and trends.fits == 4


def test_the_capacity_review_has_the_checks_figures(sqlite_engine: Engine) -> None:
    history = History(sqlite_engine)
    sim = simulate(history, days=4, step=timedelta(hours=1), compact_every=24)
    trends = Trends(sqlite_engine)
    fleet = fleet_of("db1", "db2", "db9")
    people = [Customer(f"cust{i}", f"db{i % 2 + 1}", f"cust{i}", f"cust{i}")
              for i in (1, 2)]  # fmt: skip
    review = trends.capacity_review(fleet, sim.now, people)
    order = [s["server"] for s in review["servers"]]
    assert order == ["db1", "db2", "db9"]  # shortest runway first, no history last
    for entry in review["servers"]:
        check = run_check("disk_runway", fleet, trends.runways(entry["server"], sim.now))
        assert (entry["days"], entry["verdict"], entry["detail"]) == (
            check.value,
            check.verdict,
            check.detail,
        )
    db1 = review["servers"][0]
    assert db1["days"] in (19, 20) and db1["verdict"] == "warn"
    data = db1["paths"][0]
    assert data["path"] == "data" and data["days_to_percent"] == 0  # 80% used already
    assert review["servers"][2]["verdict"] == "unknown"
    # cust0 is no customer any more: left out; the others with their server.
    assert [(c["customer"], c["server"]) for c in review["customers"]] == [
        ("cust1", "db2"),
        ("cust2", "db1"),
    ]
    assert review["customers"][0]["percent"] > review["customers"][1]["percent"] > 0
    text = review_text(review)
    assert f"db1: {db1['days']} days (data 80% used" in text and "cust1 (db2)" in text


def test_the_capacity_review_checklist_attaches_the_chart(sqlite_engine: Engine) -> None:
    ops = Ops(fleet_of("db1", "db2"), sqlite_engine, EventLog(sqlite_engine))
    sim = simulate(ops.trends.history, days=3, step=timedelta(hours=1), compact_every=24)
    review = get_checklist("capacity-review")
    assert review.attach == ("capacity",)
    (chart,) = ops.checklist_attachments(review, sim.now)
    assert chart.filename == f"fleet-disk-{sim.now:%Y%m%d}.png"
    assert chart.png.startswith(b"\x89PNG") and chart.title.startswith("Fleet disk over 30 days")
    assert chart.comment == review_text(ops.capacity_review(sim.now))
    assert ops.checklist_attachments(get_checklist("weekly-maintenance"), sim.now) == []
    one = ops.server_chart("db1", sim.now)
    assert one.png.startswith(b"\x89PNG") and "data full in 20 d" in one.title
    with pytest.raises(NotFound):
        ops.server_chart("db7", sim.now)
