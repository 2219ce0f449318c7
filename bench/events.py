"""Event log throughput against the raw driver, in one run.

For SQLite and PostgreSQL: events per second appended one per transaction and in batches of
1,000, next to the raw driver (sqlite3 / psycopg ``executemany``) inserting same-shaped rows into
a table with no chain, no lock and no redaction. Prints the ratios.

    .venv/bin/python bench/events.py [--single N] [--batches B]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.db import make_engine
from storage.events import EventLog, NewEvent
from storage.migrate import upgrade
from tests.pgserver import Databases, admin_conninfo

# The same columns, keys and indexes as `events` (storage/migrations/versions/0001_events.py):
# what the raw driver skips is only the chain, the lock, the dedupe and the redaction.
RAW_DDL = [
    """CREATE TABLE raw_events (id BIGINT PRIMARY KEY, ts TIMESTAMP WITH TIME ZONE NOT NULL,
     kind VARCHAR(64) NOT NULL, actor VARCHAR(64), subject VARCHAR(200), payload {json} NOT NULL,
     source VARCHAR(64) NOT NULL, source_id VARCHAR(200), prev_hash VARCHAR(64) NOT NULL,
     hash VARCHAR(64) NOT NULL, UNIQUE (source, source_id))""",
    "CREATE INDEX raw_ts ON raw_events (ts)",
    "CREATE INDEX raw_kind ON raw_events (kind)",
    "CREATE INDEX raw_actor ON raw_events (actor)",
    "CREATE INDEX raw_subject ON raw_events (subject)",
]


def payload(i: int) -> dict[str, object]:
    return {"command": "/db status acme", "channel": "C0123", "i": i, "ok": True}


def raw_rows(start: int, n: int) -> list[tuple[object, ...]]:
    now = datetime.now(UTC)
    return [
        (
            start + i,
            now,
            "command",
            "U_ALICE",
            "acme",
            json.dumps(payload(i)),
            "slack",
            f"r{start + i}",
            "0" * 64,
            "0" * 64,
        )
        for i in range(n)
    ]


def rate(n: int, fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def dbops_rates(url: str, single: int, batches: int) -> tuple[float, float]:
    engine = make_engine(url)
    upgrade(engine)
    log = EventLog(engine)

    def one_by_one() -> None:
        for i in range(single):
            log.append(
                "command", "acme", payload(i), actor="U_ALICE", source="slack", source_id=f"s{i}"
            )

    def batched() -> None:
        for b in range(batches):
            log.append_many(
                [
                    NewEvent("command", "acme", payload(i), "U_ALICE", "slack", f"b{b}-{i}")
                    for i in range(1000)
                ]
            )

    r1, r2 = rate(single, one_by_one), rate(batches * 1000, batched)
    assert log.verify().ok
    engine.dispose()
    return r1, r2


def sqlite_raw(path: Path, single: int, batches: int) -> tuple[float, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for ddl in RAW_DDL:
        conn.execute(ddl.format(json="TEXT"))
    sql = "INSERT INTO raw_events VALUES (?,?,?,?,?,?,?,?,?,?)"

    def one_by_one() -> None:
        for row in raw_rows(1, single):
            conn.execute("BEGIN")
            conn.execute(sql, row)
            conn.execute("COMMIT")

    def batched() -> None:
        for b in range(batches):
            conn.execute("BEGIN")
            conn.executemany(sql, raw_rows(10_000_000 + b * 1000, 1000))
            conn.execute("COMMIT")

    out = rate(single, one_by_one), rate(batches * 1000, batched)
    conn.close()
    return out


def pg_raw(conninfo: str, single: int, batches: int) -> tuple[float, float]:
    with psycopg.connect(conninfo) as conn:
        for ddl in RAW_DDL:
            conn.execute(ddl.format(json="JSON"))
        conn.commit()
        sql = "INSERT INTO raw_events VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"

        def one_by_one() -> None:
            for row in raw_rows(1, single):
                conn.execute(sql, row)
                conn.commit()

        def batched() -> None:
            for b in range(batches):
                with conn.cursor() as cur:
                    cur.executemany(sql, raw_rows(10_000_000 + b * 1000, 1000))
                conn.commit()

        return rate(single, one_by_one), rate(batches * 1000, batched)


@contextlib.contextmanager
def pg_database() -> Iterator[tuple[str, str]]:
    with admin_conninfo() as admin:
        dbs = Databases(admin)
        try:
            url = dbs.create()
            conninfo = url.replace("postgresql+psycopg://", "postgresql://")
            yield url, conninfo
        finally:
            dbs.drop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--single", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        d1, d2 = dbops_rates(f"sqlite:///{tmp}/bench.db", args.single, args.batches)
        r1, r2 = sqlite_raw(Path(tmp) / "raw.db", args.single, args.batches)
        results.append(("sqlite", d1, r1, d2, r2))
    with pg_database() as (url, conninfo):
        d1, d2 = dbops_rates(url, args.single, args.batches)
        r1, r2 = pg_raw(conninfo, args.single, args.batches)
        results.append(("postgresql", d1, r1, d2, r2))

    print(f"{'database':<11} {'mode':<22} {'dbops ev/s':>11} {'raw ev/s':>11} {'ratio':>6}")
    for name, d1, r1, d2, r2 in results:
        print(f"{name:<11} {'1 event / transaction':<22} {d1:>11,.0f} {r1:>11,.0f} {d1 / r1:>6.2f}")
        print(f"{name:<11} {'batches of 1,000':<22} {d2:>11,.0f} {r2:>11,.0f} {d2 / r2:>6.2f}")


if __name__ == "__main__":
    main()
