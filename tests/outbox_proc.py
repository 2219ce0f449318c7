"""An outbox worker process for tests/test_outbox.py: the worker thread of `dbops serve` and
`dbops scheduler` alone, sending to the Slack stub, so a test can SIGKILL it mid-send.
Run: python -m tests.outbox_proc --db URL --api URL --owner NAME."""

from __future__ import annotations

import argparse
import logging
import threading

from bot.outbox import build_outbox_notifier
from core.settings import load_settings
from storage.db import make_engine
from storage.events import EventLog
from tests.slack_stub import BOT_TOKEN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--api", required=True)
    parser.add_argument("--owner", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    settings = load_settings(
        database_url=args.db, slack_bot_token=BOT_TOKEN, slack_api_url=args.api
    )
    events = EventLog(make_engine(args.db))
    notifier = build_outbox_notifier(settings, events, owner=args.owner)
    notifier.courier.run(threading.Event(), poll=0.05)


if __name__ == "__main__":
    main()
