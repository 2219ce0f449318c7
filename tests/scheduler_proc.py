"""A `dbops scheduler` process for the replica tests: the same Worker and run_forever as the
CLI, with time moved to ``--start`` (ticking on from there) and messages written to a JSON-lines
file instead of Slack. Run: python -m tests.scheduler_proc --start ISO --out FILE."""

from __future__ import annotations

import argparse
import logging
from datetime import datetime

import time_machine

from bot.runtime import Runtime
from bot.scheduler import Worker, run_forever
from core.notify import JsonlNotifier


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", required=True, help="ISO time with offset")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with time_machine.travel(datetime.fromisoformat(args.start), tick=True):
        ctx = Runtime.load().ready()
        run_forever(Worker(ctx.with_notifier(JsonlNotifier(args.out))))


if __name__ == "__main__":
    main()
