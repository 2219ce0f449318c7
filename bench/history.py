"""The measurement history's size: two years of a small fleet simulated, measured, extrapolated
to 50 servers x 40 databases, and set against the bound.

Two years are recorded with time passed in, compacting as the clock crosses each hour: a sweep a
day until 33 days before the end, then one an hour, and for the last three days one a minute as
the scheduler runs them (the day and hour tiers hold one row per day and per hour whatever the
sweep rate, so the rows left are those of a sweep a minute throughout; only ``n`` differs). The
rows left are counted per tier and the bytes measured: on SQLite the history tables' pages
(dbstat, after VACUUM), on PostgreSQL (``--database-url``, an empty database)
pg_total_relation_size after VACUUM FULL.

    .venv/bin/python bench/history.py [--servers 4] [--databases 5] [--database-url URL] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine, text

from core.trends import DAY_S, RETENTION, DatabaseSample, History, Measurements, ServerSample
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models_history import DAY, HOUR, SWEEP

FLEET_SERVERS, FLEET_DATABASES = 50, 50 * 40
SWEEP_S = 60  # the scheduler's health sweep: one a minute
# Rows one series holds at steady state: two days of sweeps, 30 days of hours, 730 days.
ROWS_PER_SERIES = RETENTION[SWEEP] // SWEEP_S + RETENTION[HOUR] // 3600 + RETENTION[DAY] // DAY_S
# The bound (README): bytes per row, index included, that the history must stay under.
BOUND_BYTES_PER_ROW = 200
TABLES = ("history_servers", "history_databases")


def fleet_rows(servers: int = FLEET_SERVERS, databases: int = FLEET_DATABASES) -> int:
    return (servers + databases) * ROWS_PER_SERIES


def sweep(servers: int, databases: int, at: datetime, start: datetime) -> Measurements:
    days = (at - start).total_seconds() / DAY_S
    rng = random.Random(int(at.timestamp()))
    return Measurements(
        [
            ServerSample(
                f"db{s}",
                int((200 + days) * 2**30),
                2**40,
                int((300 + days) * 2**30),
                2**41,
                backends=rng.randint(5, 90),
            )
            for s in range(servers)
        ],
        [
            DatabaseSample(
                f"customer_{d:03d}",
                f"db{d % servers}",
                int((1 + days / 50) * 10**10),
                rng.randint(0, 40),
                300.0 + rng.random() * 60,
                3 * 10**9,
            )
            for d in range(databases)
        ],
    )


def measured_bytes(engine: Engine) -> int:
    if engine.dialect.name == "sqlite":
        engine.dispose()
        with contextlib.closing(sqlite3.connect(str(engine.url.database))) as conn:
            conn.execute("VACUUM")
            found = conn.execute(
                "SELECT sum(pgsize) FROM dbstat WHERE name LIKE 'history%' "
                "OR name LIKE 'ix_history%' OR name LIKE 'sqlite_autoindex_history%'"
            ).fetchone()
            return int(found[0] or 0)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        total = 0
        for table in TABLES:
            conn.exec_driver_sql(f"VACUUM FULL {table}")
            size = conn.execute(text(f"SELECT pg_total_relation_size('{table}')")).scalar()
            total += int(size or 0)
        return total


def run(engine: Engine, servers: int, databases: int) -> dict[str, Any]:
    history = History(engine)
    end = datetime(2029, 1, 1, tzinfo=UTC)
    start = end - timedelta(days=730)
    hourly_from = end - timedelta(days=33)
    minute_from = end - timedelta(days=3)
    started = time.perf_counter()
    at, sweeps = start, 0
    while at < end:
        history.record(sweep(servers, databases, at, start), at)
        sweeps += 1
        if at < hourly_from:
            step = timedelta(days=1)
        else:
            step = timedelta(hours=1) if at < minute_from else timedelta(seconds=SWEEP_S)
        nxt = at + step
        if nxt.timestamp() // 3600 != at.timestamp() // 3600:
            history.compact(nxt)
        at = nxt
    history.compact(end)
    took = time.perf_counter() - started
    counts = history.counts()
    rows = sum(counts.values())
    size = measured_bytes(engine)
    per_row = size / rows
    full_rows = fleet_rows()
    return {
        "backend": engine.dialect.name,
        "servers": servers,
        "databases": databases,
        "sweeps": sweeps,
        "simulated_s": round(took, 1),
        "rows": counts,
        "rows_total": rows,
        "rows_per_series": ROWS_PER_SERIES,
        "bytes": size,
        "bytes_per_row": round(per_row, 1),
        "fleet": f"{FLEET_SERVERS} servers x {FLEET_DATABASES // FLEET_SERVERS} databases",
        "fleet_rows": full_rows,
        "fleet_bytes_extrapolated": round(full_rows * per_row),
        "bound_bytes": full_rows * BOUND_BYTES_PER_ROW,
        "within_bound": per_row <= BOUND_BYTES_PER_ROW,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--databases", type=int, default=5, help="customer databases in all")
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: SQLite)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dbops-bench-history-") as directory:
        engine = make_engine(args.database_url or f"sqlite:///{directory}/history.db")
        upgrade(engine)
        try:
            out = run(engine, args.servers, args.databases)
        finally:
            engine.dispose()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    mb = 1024 * 1024
    print(
        f"{out['backend']}: {out['servers']} servers, {out['databases']} databases, 730 days "
        f"({out['sweeps']} sweeps recorded in {out['simulated_s']} s)"
    )
    print("rows per tier: " + ", ".join(f"{k} {v}" for k, v in out["rows"].items()))
    print(
        f"measured: {out['rows_total']} rows, {out['bytes'] / mb:.2f} MiB, "
        f"{out['bytes_per_row']} bytes a row"
    )
    print(
        f"{out['fleet']}: {out['fleet_rows']} rows ({ROWS_PER_SERIES} per series), "
        f"{out['fleet_bytes_extrapolated'] / mb:.0f} MiB extrapolated; bound "
        f"{out['bound_bytes'] / mb:.0f} MiB ({BOUND_BYTES_PER_ROW} bytes a row): "
        f"{'within' if out['within_bound'] else 'OVER'}"
    )
    return 0 if out["within_bound"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
