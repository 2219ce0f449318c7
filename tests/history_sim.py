"""A fleet's sweeps, simulated with time passed in: what tests/test_trends.py and
tests/test_charts.py record into the history, and the samples they expect back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.trends import DatabaseSample, History, Measurements, ServerSample

GIB = 2**30
T0 = datetime(2027, 3, 1, tzinfo=UTC)  # a UTC midnight


def data_used(at: datetime, now: datetime) -> int:
    """db1's data path: 100 GiB, 1 GiB a day more, 80% used at ``now``: full 20 days later."""
    return round(80 * GIB - (now - at).total_seconds() / 86400 * GIB)


def backup_used(at: datetime, now: datetime) -> int:
    """db1's backup path: 200 GiB, emptied by 0.5 GiB a day (retention shortened)."""
    return round(120 * GIB + (now - at).total_seconds() / 86400 * GIB / 2)


def size_of(customer: int, i: int) -> int | None:
    """Customer sizes: every 7th sweep of customer 1 could not read the size."""
    if customer == 1 and i % 7 == 0:
        return None
    return (customer + 1) * 10**9 + i * 10**5


@dataclass
class Simulation:
    now: datetime
    step: timedelta
    samples: list[tuple[datetime, Measurements]] = field(default_factory=list)


def simulate(
    history: History,
    *,
    days: int,
    step: timedelta,
    compact_every: int,
    servers: int = 2,
    customers: int = 3,
    start: datetime = T0,
    on_compact: Callable[[datetime], None] | None = None,
    names: Sequence[str] = (),
) -> Simulation:
    """Sweeps every ``step`` from ``start`` for ``days``, a compact every ``compact_every``
    sweeps and once more at the end (``now``, the first instant after the last sweep's step).
    Servers are db1, db2, ... unless ``names`` names them (the first is db1's figures, ...)."""
    now = start + timedelta(days=days)
    sim = Simulation(now, step)
    count = int(timedelta(days=days) / step)
    for i in range(count):
        at = start + i * step
        m = Measurements(
            [
                ServerSample(
                    names[s] if s < len(names) else f"db{s + 1}",
                    data_used(at, now) // (s + 1),
                    100 * GIB,
                    backup_used(at, now),
                    200 * GIB,
                    backends=(i * (s + 3)) % 11,
                )
                for s in range(servers)
            ],
            [
                DatabaseSample(
                    f"cust{c}",
                    f"db{c % servers + 1}",
                    size_of(c, i),
                    connections=(i + c) % 9,
                    backup_seconds=30.0 + (i // 96),  # each newer backup a second slower
                    backup_bytes=10**8 + c,
                )
                for c in range(customers)
            ],
        )
        history.record(m, at)
        sim.samples.append((at, m))
        if i % compact_every == compact_every - 1:
            history.compact(at)
            if on_compact:
                on_compact(at)
    history.compact(now)
    return sim
