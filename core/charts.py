"""Charts of the history as PNG images (matplotlib, Agg, no display needed).

* ``disk_chart``: a server's disk use over 30 days, data and backup paths, each with its size
  and, where it is filling, the runway projection (dashed) from the fitted level now to full.
* ``customer_chart``: a customer's database size, and its connections (hourly mean and peak),
  over 30 days.
* ``fleet_disk_chart``: every server's disk over 30 days in percent of its size (the path that
  fills first, or the fuller one where none is filling), with each runway projection: the
  capacity review's one picture. The legend names the ``LEGEND_MAX`` shortest runways; the
  rest are drawn thin and grey.

Each returns a ``Chart``: the PNG bytes and, for each line drawn, the (x, y) the figure holds,
read back from the figure before it is saved (what the tests compare with the history). Sizes
are in GiB. matplotlib is imported when a chart is drawn, never at import: the CLI starts
without it. The figure is built through the object API (no pyplot), so no global state is
shared between threads.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from core.trends import PATHS, History, Runway, disk_runway
from storage.models_history import HOUR

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GIB = float(2**30)
WIDTH_IN, HEIGHT_IN, DPI = 8.0, 4.5, 100  # 800 x 450 pixels: readable in a Slack preview
COLOURS = {"data": "tab:blue", "backup": "tab:orange"}
LEGEND_MAX = 8


@dataclass(frozen=True)
class Chart:
    png: bytes
    # label -> (x, y) as plotted: datetimes and GiB (or connections)
    lines: dict[str, tuple[list[datetime], list[float]]] = field(default_factory=dict)
    title: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """Width and height in pixels, read from the PNG header."""
        return int.from_bytes(self.png[16:20], "big"), int.from_bytes(self.png[20:24], "big")


def _figure(rows: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    return fig, [row[0] for row in axes]


def _finish(fig: Figure, title: str, legend: int | None = None) -> Chart:
    """Read every labelled line back, then draw the PNG; the legend shows the first
    ``legend`` labels (all when None)."""
    import matplotlib.dates as mdates

    lines: dict[str, tuple[list[datetime], list[float]]] = {}
    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%d %b"))  # type: ignore[no-untyped-call]
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles[:legend], labels[:legend], loc="best", fontsize="small")
        for line in ax.get_lines():
            label = str(line.get_label())
            if not label.startswith("_"):
                xs: Any = line.get_xdata()
                ys: Any = line.get_ydata()
                lines[label] = (list(xs), [float(y) for y in ys])
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return Chart(buffer.getvalue(), lines, title)


def disk_chart(
    history: History,
    server: str,
    now: datetime,
    *,
    days: float = 30.0,
    runways: list[Runway] | None = None,
) -> Chart:
    """The server's disk use (each hour's last reading) over ``days``, its sizes, and the
    runway projection: to the day it is full, or ``days`` ahead when that is later."""
    if runways is None:
        runways = disk_runway(history, server, now)
    since = now - timedelta(days=days)
    fig, (ax,) = _figure()
    parts = []
    for path, runway in zip(PATHS, runways, strict=True):
        used = history.series("server", server, f"{path}_used", since, now, HOUR)
        colour = COLOURS[path]
        if used:
            xs: Any = [t for t, _ in used]
            ax.plot(xs, [v / GIB for _, v in used], color=colour, label=f"{path} used")
        if runway.total:
            ax.axhline(runway.total / GIB, color=colour, linestyle=":", linewidth=1)
        if runway.filling and runway.used is not None and runway.growth_per_day:
            # From the time the runway was fitted as of (``now``, unless handed in).
            ahead = days if runway.days is None else min(runway.days, days)
            end = runway.now + timedelta(days=ahead)
            level = runway.used + runway.growth_per_day * ahead
            span: Any = [runway.now, end]
            ax.plot(span, [runway.used / GIB, level / GIB], color=colour, linestyle="--",
                    label=f"{path} projection")  # fmt: skip
            parts.append(f"{path} full in {runway.days:.0f} d")
        elif runway.verdict != "unknown":
            parts.append(f"{path} not filling")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    at_now: Any = now
    ax.axvline(at_now, color="grey", linewidth=0.8)
    title = f"{server}: disk over {days:g} days" + (f" ({', '.join(parts)})" if parts else "")
    return _finish(fig, title)


def customer_chart(history: History, customer: str, now: datetime, *, days: float = 30.0) -> Chart:
    """The customer's database size (GiB) and connections (hourly mean and peak) over ``days``."""
    since = now - timedelta(days=days)
    fig, (top, bottom) = _figure(rows=2)

    def line(ax: Axes, metric: str, label: str, scale: float = 1.0, **style: Any) -> None:
        points = history.series("database", customer, metric, since, now, HOUR)
        if points:
            xs: Any = [t for t, _ in points]
            ax.plot(xs, [v / scale for _, v in points], label=label, **style)

    line(top, "size_bytes", "size", GIB, color="tab:blue")
    top.set_ylabel("GiB")
    top.set_ylim(bottom=0)
    line(bottom, "connections", "connections (mean)", color="tab:green")
    line(bottom, "connections_max", "connections (peak)", color="tab:red", linewidth=0.8)
    bottom.set_ylabel("connections")
    bottom.set_ylim(bottom=0)
    return _finish(fig, f"{customer}: size and connections over {days:g} days")


def _deciding(runways: Sequence[Runway], latest: dict[str, float]) -> Runway | None:
    """The path a server's fleet line shows: the first to fill, else the fuller one now."""
    filling = [r for r in runways if r.days is not None]
    if filling:
        return min(filling, key=lambda r: r.days or 0.0)
    known = [r for r in runways if r.path in latest]
    return max(known, key=lambda r: latest[r.path]) if known else None


def fleet_disk_chart(
    history: History,
    servers: Sequence[str],
    now: datetime,
    *,
    days: float = 30.0,
    runways: Mapping[str, Sequence[Runway]] | None = None,
) -> Chart:
    """Every server's disk use in percent of its size over ``days`` (each hour's last reading
    over the size then), the first path to fill, and its projection to full (or ``days``
    ahead). Lines are labelled ``<server> <path>`` and ``<server> projection``; the legend
    lists the shortest runways first."""
    since = now - timedelta(days=days)
    fitted = {s: list(runways[s]) if runways else disk_runway(history, s, now) for s in servers}
    drawn = []
    for server in servers:
        percent: dict[str, list[tuple[datetime, float]]] = {}
        for path in PATHS:
            used = history.series("server", server, f"{path}_used", since, now, HOUR)
            sizes = dict(history.series("server", server, f"{path}_total", since, now, HOUR))
            percent[path] = [(t, 100.0 * v / sizes[t]) for t, v in used if sizes.get(t)]
        latest = {path: points[-1][1] for path, points in percent.items() if points}
        runway = _deciding(fitted[server], latest)
        if runway is not None and percent[runway.path]:
            drawn.append((server, runway, percent[runway.path]))
    drawn.sort(key=lambda d: (d[1].days is None, d[1].days or 0.0, d[0]))
    fig, (ax,) = _figure()
    parts: list[str] = []
    legend = 0  # the shown servers' lines and projections come first among the handles
    for i, (server, runway, points) in enumerate(drawn):
        shown = i < LEGEND_MAX
        style: dict[str, Any] = {} if shown else {"color": "lightgrey", "linewidth": 0.8}
        xs: Any = [t for t, _ in points]
        (line,) = ax.plot(xs, [v for _, v in points], label=f"{server} {runway.path}", **style)
        legend += shown
        if runway.filling and runway.used is not None and runway.growth_per_day and runway.total:
            ahead = min(runway.days or days, days)
            span: Any = [runway.now, runway.now + timedelta(days=ahead)]
            level = runway.used + runway.growth_per_day * ahead
            ax.plot(span, [100.0 * runway.used / runway.total, 100.0 * level / runway.total],
                    color=line.get_color(), linestyle="--", linewidth=line.get_linewidth(),
                    label=f"{server} projection")  # fmt: skip
            legend += shown
            if len(parts) < 3:
                parts.append(f"{server} full in {runway.days:.0f} d")
    ax.axhline(100, color="tab:red", linestyle=":", linewidth=1)
    ax.axhline(80, color="grey", linestyle=":", linewidth=0.8)
    ax.set_ylabel("% of disk used")
    ax.set_ylim(0, 105)
    at_now: Any = now
    ax.axvline(at_now, color="grey", linewidth=0.8)
    title = f"Fleet disk over {days:g} days" + (f" ({', '.join(parts)})" if parts else "")
    return _finish(fig, title, legend=legend)
