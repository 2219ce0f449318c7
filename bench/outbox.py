"""The outbox's price: a post through the outbox (store, send, record) against a direct send.

Both go to the strict Slack stub over a real socket, in the same run, alternating so that both
see the same machine: the direct send is today's SlackNotifier (chat.postMessage, then its
``message.sent`` event); the outbox send is OutboxNotifier (the row and its ``message.queued``
event in one transaction, chat.postMessage with metadata, then the row marked sent with its
``message.sent`` event). Then the worker's rate: rows queued during a 429 window, drained by one
worker (``run_once``) once it is over. Prints p50 / p99 / mean per database.

    .venv/bin/python bench/outbox.py [--db sqlite|postgres|both] [--posts 300] [--latency-ms 0]

``--latency-ms`` makes the stub take that long per call (Slack is ~100-300 ms from most places);
the default 0 shows dbops's own overhead alone.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine

from bot.notifiers import SlackNotifier, web_client
from bot.outbox import build_outbox_notifier
from core.notify import Message
from core.settings import load_settings
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.pgserver import Databases, admin_conninfo
from tests.slack_stub import BOT_TOKEN, SlackStub


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


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def line(name: str, ms: list[float]) -> str:
    return (
        f"  {name:22s} p50 {percentile(ms, 50):6.2f} ms  p99 {percentile(ms, 99):6.2f} ms  "
        f"mean {statistics.fmean(ms):6.2f} ms"
    )


def run(kind: str, posts: int, latency_ms: float) -> None:
    with SlackStub() as stub, database(kind) as engine:
        stub.latency_s = latency_ms / 1000
        settings = load_settings(
            slack_bot_token=BOT_TOKEN, slack_api_url=stub.base_url, ops_channel="#db-ops"
        )
        events = EventLog(engine)
        direct = SlackNotifier(web_client(settings), events)
        outbox = build_outbox_notifier(settings, events)
        for warm in range(10):  # connections, caches, the first transactions
            direct.post("#db-ops", Message(f"warm-up {warm}"))
            outbox.post("#db-ops", Message(f"warm-up {warm}"))
        took: dict[str, list[float]] = {"direct send": [], "outbox (store + send)": []}
        for i in range(posts):
            for name, notifier in (("direct send", direct), ("outbox (store + send)", outbox)):
                started = time.perf_counter()
                ref = notifier.post("#db-ops", Message(f"{name} {i}: P1 inc-{i}: acme is down"))
                took[name].append((time.perf_counter() - started) * 1000)
                assert not ref.ts.startswith("outbox:"), "every post should go at once here"
        extra = [
            o - d for o, d in zip(took["outbox (store + send)"], took["direct send"], strict=True)
        ]
        print(f"{kind}: {posts} posts each, Slack stub latency {latency_ms:g} ms")
        for name, ms in took.items():
            print(line(name, ms))
        print(line("extra per post", extra))

        # The worker: rows queued while Slack said 429, sent once the window is over.
        stub.rate_limit(3600, "chat.postMessage")
        for i in range(posts):
            outbox.post("#db-ops", Message(f"queued {i}"))
        stub.advance(3600)
        outbox.courier.outbox.clock = lambda: _later(3601)
        started = time.perf_counter()
        sent = outbox.courier.run_once(limit=10 * posts)
        wall = time.perf_counter() - started
        print(f"  worker drained {sent} queued rows in {wall:.2f} s ({sent / wall:.0f} rows/s)")
        stub.check()


def _later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    for kind in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
        run(kind, args.posts, args.latency_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
