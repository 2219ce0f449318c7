"""Charts: PNGs drawn from a simulated month of history, decoded, and their lines read back from
the figure and compared with the history they were drawn from."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import Engine

from core.charts import GIB, Chart, customer_chart, disk_chart, fleet_disk_chart
from core.trends import History, disk_runway
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models_history import HOUR
from tests.history_sim import T0, Simulation, simulate


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[History, Simulation]]:
    """The month is simulated once for the module: every test here only reads it."""
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('charts') / 'dbops.db'}")
    upgrade(engine)
    history = History(engine)
    yield history, simulate(history, days=31, step=timedelta(hours=1), compact_every=24)
    engine.dispose()


def decoded(chart: Chart) -> Image.Image:
    assert chart.png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(chart.png))
    image.load()
    assert image.size == chart.size == (800, 450)
    assert len(image.getcolors(maxcolors=100_000) or []) > 20  # drawn on, not a blank page
    return image


def test_disk_chart_draws_the_history_and_the_runway(month: tuple[History, Simulation]) -> None:
    history, sim = month
    now = sim.now
    chart = disk_chart(history, "db1", now)
    decoded(chart)
    for path in ("data", "backup"):
        stored = history.series(
            "server", "db1", f"{path}_used", now - timedelta(days=30), now, HOUR
        )
        xs, ys = chart.lines[f"{path} used"]
        assert len(xs) == len(stored) == 719
        assert xs == [t for t, _ in stored]
        assert ys == pytest.approx([v / GIB for _, v in stored])
    data, _ = disk_runway(history, "db1", now)
    xs, ys = chart.lines["data projection"]
    assert data.days is not None and data.used is not None
    assert xs == [now, now + timedelta(days=data.days)]
    assert ys == pytest.approx([data.used / GIB, 100.0])  # to the disk's size: full
    assert "backup projection" not in chart.lines  # the backup path is not filling
    assert "data full in 20 d" in chart.title and "backup not filling" in chart.title


def test_customer_chart_draws_size_and_connections(month: tuple[History, Simulation]) -> None:
    history, sim = month
    now = sim.now
    chart = customer_chart(history, "cust2", now)
    decoded(chart)
    since = now - timedelta(days=30)
    for label, metric, scale in (
        ("size", "size_bytes", GIB),
        ("connections (mean)", "connections", 1.0),
        ("connections (peak)", "connections_max", 1.0),
    ):
        stored = history.series("database", "cust2", metric, since, now, HOUR)
        xs, ys = chart.lines[label]
        assert xs == [t for t, _ in stored] and len(xs) == 719
        assert ys == pytest.approx([v / scale for _, v in stored])
    # The last hour drawn is the last hour's sweep, as recorded.
    last_at, last = sim.samples[-2]
    assert chart.lines["size"][1][-1] == pytest.approx(last.databases[2].size_bytes / GIB)
    assert chart.lines["size"][0][-1] == last_at


def test_fleet_disk_chart_draws_every_server_and_its_runway(
    month: tuple[History, Simulation],
) -> None:
    history, sim = month
    now = sim.now
    runways = {s: disk_runway(history, s, now) for s in ("db1", "db2", "db9")}
    chart = fleet_disk_chart(history, ["db2", "db9", "db1"], now, runways=runways)
    decoded(chart)
    for server in ("db1", "db2"):  # each in percent of its data path's 100 GiB
        stored = history.series("server", server, "data_used", now - timedelta(days=30), now, HOUR)
        xs, ys = chart.lines[f"{server} data"]
        assert xs == [t for t, _ in stored] and len(xs) == 719
        assert ys == pytest.approx([100 * v / (100 * GIB) for _, v in stored])
    data = runways["db1"][0]
    assert data.days is not None and data.used is not None
    xs, ys = chart.lines["db1 projection"]
    assert xs == [now, now + timedelta(days=data.days)]
    assert ys == pytest.approx([100 * data.used / (100 * GIB), 100.0])  # to full
    slow = runways["db2"][0]  # 120 days: drawn 30 days ahead, not to full
    assert slow.days is not None and slow.days > 30 and slow.used is not None
    xs, ys = chart.lines["db2 projection"]
    assert xs == [now, now + timedelta(days=30)]
    assert ys[1] == pytest.approx(100 * (slow.used + 30 * (slow.growth_per_day or 0)) / (100 * GIB))
    assert set(chart.lines) == {"db1 data", "db1 projection", "db2 data", "db2 projection"}
    assert chart.title == "Fleet disk over 30 days (db1 full in 20 d, db2 full in 120 d)"


def test_a_server_without_history_still_gets_a_chart(sqlite_engine: Engine) -> None:
    history = History(sqlite_engine)
    chart = disk_chart(history, "db9", T0)
    assert chart.png.startswith(b"\x89PNG") and chart.lines == {}
