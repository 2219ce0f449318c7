"""Escalation lag: how late a page leaves after it is due, with 1,000 incidents open.

1,000 P1 incidents are opened (through core.incidents, so each has its whole escalation plan
as timer rows), their first steps spread over ``--window`` seconds; then tickers run the
worker loop (``Escalator.run``'s wake-at-next-due loop) in real time until every step is sent:
the primary DM at open, the secondary after ack_timeout (5 s here), the channel after
channel_after (10 s). Prints p50 / p99 / max of (sent_at - due_at) per database.

    .venv/bin/python bench/escalation.py [--db sqlite|postgres|both] [--incidents 1000]
        [--window 10] [--tickers 1] [--latency-ms 0] [--send-workers 1]

``--latency-ms`` makes each send take that long (a Slack call is ~100-300 ms); with it, use
``--send-workers`` to send in parallel as the bot's notifier would.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine, bindparam, select, update

from core.customers import Customer, upsert_customers
from core.escalation import Escalator, StepResult
from core.fleet import Fleet, parse_fleet
from core.incidents import Incidents
from core.notify import Message, MessageRef, RecordingNotifier
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from storage.models_incidents import EscalationTimer, aware
from tests.pgserver import Databases, admin_conninfo

TIMERS = EscalationTimer.__table__  # type: ignore[attr-defined]


class SlowNotifier(RecordingNotifier):
    """A RecordingNotifier whose every send takes ``latency`` seconds, like a Web API call."""

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency = latency

    def dm(self, user: str, message: Message) -> MessageRef:
        time.sleep(self.latency)
        return super().dm(user, message)

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        time.sleep(self.latency)
        return super().post(channel, message, thread_ts)


def bench_fleet() -> Fleet:
    return parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}],
            "oncall": {"primary": "U0ALICE", "secondary": "U0BOB", "escalation_channel": "#esc"},
            "escalation": {"ack_timeout": "5s", "channel_after": "10s", "repeat": 0},
        }
    )


def open_incidents(engine: Engine, n: int, window: float) -> tuple[float, int]:
    """Open ``n`` incidents whose first pages fall due over ``window`` seconds from ~1 s after
    the opening is done. Returns (seconds the opening took, steps planned)."""
    events = EventLog(engine)
    fleet = bench_fleet()
    upsert_customers(engine, [Customer("acme", "vps1", "acme", "acme")])
    desk = Incidents(engine, events, fleet)
    placeholder = datetime.now(UTC) + timedelta(days=1)
    started = time.monotonic()
    for i in range(n):
        when = placeholder + timedelta(seconds=window * i / n)
        desk.open(f"outage {i}", "P1", actor="bench", customers=["acme"], now=when)
    took = time.monotonic() - started
    # Now that opening is over, move the whole plan to start a second from now.
    shift = datetime.now(UTC) + timedelta(seconds=1) - placeholder
    with engine.begin() as conn:
        rows = conn.execute(select(TIMERS.c.id, TIMERS.c.due_at)).all()
        moved = [{"tid": r[0], "due": (aware(r[1]) or placeholder) + shift} for r in rows]
        stmt = update(TIMERS).where(TIMERS.c.id == bindparam("tid")).values(due_at=bindparam("due"))
        conn.execute(stmt, moved)
    return took, len(rows)


def run_tickers(
    engine: Engine, tickers: int, latency: float, send_workers: int, expected: int
) -> list[StepResult]:
    events = EventLog(engine)
    fleet = bench_fleet()
    notifier: RecordingNotifier = SlowNotifier(latency) if latency else RecordingNotifier()
    results: list[StepResult] = []
    lock = threading.Lock()
    stop = threading.Event()

    def loop(worker: int) -> None:
        pager = Escalator(
            engine, events, fleet, notifier, worker_id=f"bench-{worker}", send_workers=send_workers
        )
        while not stop.is_set():
            done = pager.tick()
            with lock:
                results.extend(done)
                if len(results) >= expected:
                    stop.set()
            nxt = pager.next_due()
            wait = 0.2 if nxt is None else min(0.2, (nxt - datetime.now(UTC)).total_seconds())
            stop.wait(max(0.0, wait))

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(tickers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stop.set()
    return results


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@contextlib.contextmanager
def database(kind: str) -> Iterator[Engine]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            engine = make_engine(f"sqlite:///{tmp}/bench.db")
            upgrade(engine)
            yield engine
            engine.dispose()
        return
    with admin_conninfo() as conninfo:
        dbs = Databases(conninfo)
        try:
            engine = make_engine(dbs.create())
            upgrade(engine)
            yield engine
            engine.dispose()
        finally:
            dbs.drop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--incidents", type=int, default=1000)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--tickers", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--send-workers", type=int, default=1)
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    worst = 0.0
    for kind in kinds:
        with database(kind) as engine:
            took, steps = open_incidents(engine, args.incidents, args.window)
            started = time.monotonic()
            results = run_tickers(
                engine, args.tickers, args.latency_ms / 1000, args.send_workers, steps
            )
            wall = time.monotonic() - started
        lags = [r.lag_s for r in results if r.action in ("dm", "post")]
        sent = summary(results)
        p50, p99 = percentile(lags, 50), percentile(lags, 99)
        worst = max(worst, p99)
        print(
            f"{kind:8s} {args.incidents} open incidents, {len(lags)} pages sent in {wall:.1f}s "
            f"({sent}); opening took {took:.1f}s\n"
            f"         due-to-sent lag: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {max(lags) * 1000:.0f} ms  (tickers {args.tickers}, "
            f"send latency {args.latency_ms:g} ms, send workers {args.send_workers})"
        )
    print(f"aim p99 < 2 s: {'met' if worst < 2.0 else 'MISSED'}")
    return 0 if worst < 2.0 else 1


def summary(results: list[StepResult]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        key = f"{r.target} {r.action}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


if __name__ == "__main__":
    raise SystemExit(main())
