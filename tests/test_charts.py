"""Charts: PNGs drawn from a simulated month of history, decoded, and their lines read back from
the figure and compared with the history they were drawn from."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import Engine

from core.charts import GIB, Chart, customer_chart, disk_chart
from core.trends import History, disk_runway
from storage.models_history import HOUR
from tests.history_sim import T0, Simulation, simulate


@pytest.fixture
def month(sqlite_engine: Engine) -> tuple[History, Simulation]:
    history = History(sqlite_engine)
    return history, simulate(history, days=31, step=timedelta(hours=1), compact_every=24)


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


def test_a_server_without_history_still_gets_a_chart(sqlite_engine: Engine) -> None:
    history = History(sqlite_engine)
    chart = disk_chart(history, "db9", T0)
    assert chart.png.startswith(b"\x89PNG") and chart.lines == {}
