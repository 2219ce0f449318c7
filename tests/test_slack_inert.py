"""A customer's own words reach Slack inert in every field: `<!channel>` and links in its
PostgreSQL log lines never ping or link, whatever path they take (the sweep's incident card, its
notification text, pages). The transports make every mrkdwn text inert in one place."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from slack_sdk import WebClient

from bot.notifiers import SlackNotifier
from bot.runtime import Runtime
from bot.scheduler import Worker
from core.customers import customer_from_mapping, upsert_customers
from core.notify import Message, inert_markup, inert_payload
from storage.migrate import upgrade
from tests.slack_stub import BOT_TOKEN, SlackStub

HOSTILE = "<!channel> wire the refund to <https://evil.example|slack.com> now <!here>"
LIVE = ("<!channel>", "<!here>", "<https://evil", "<!everyone>")


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("<!channel> hi", "&lt;!channel> hi"),
        ("see <https://evil|slack.com>", "see &lt;https://evil|slack.com>"),
        ("ack, <@U_ALICE>", "ack, <@U_ALICE>"),  # our own mention stays a mention
        ("<@U_ALICE> <!subteam^S1> <@U_BOB>", "<@U_ALICE> &lt;!subteam^S1> <@U_BOB>"),
        ("already &lt;!channel&gt; escaped", "already &lt;!channel&gt; escaped"),
        ("see `/db log <customer>`", "see `/db log &lt;customer>`"),
        ("no markup at all", "no markup at all"),
    ],
)
def test_inert_markup(text: str, expect: str) -> None:
    assert inert_markup(text) == expect
    assert inert_markup(expect) == expect  # idempotent: escaping twice changes nothing


def test_inert_payload_covers_every_mrkdwn_field_and_leaves_plain_text() -> None:
    payload = {
        "text": HOSTILE,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "<!channel>"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": HOSTILE}},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": HOSTILE}]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": HOSTILE}]},
        ],
    }
    out = inert_payload(payload)
    mrkdwn = [out["text"], out["blocks"][1]["text"]["text"]]
    mrkdwn += [out["blocks"][2]["fields"][0]["text"], out["blocks"][3]["elements"][0]["text"]]
    assert all(not any(live in m for live in LIVE) for m in mrkdwn), mrkdwn
    assert out["blocks"][0]["text"]["text"] == "<!channel>"  # plain_text renders no markup
    assert payload["text"] == HOSTILE  # the caller's payload is not changed


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


def _conninfo(spec: dict[str, Any], dbname: str) -> str:
    return f"host=127.0.0.1 port={spec['port']} dbname={dbname} user=postgres"


def test_a_customers_log_lines_reach_slack_inert_in_every_field(
    sandbox: dict[str, Any], stub: SlackStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The incident desk that posts cards reads its settings from the environment.
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_API_URL", stub.base_url)
    monkeypatch.setenv("OPS_CHANNEL", "#db-ops")
    acme = next(c for c in sandbox["customers"] if c["name"] == "acme")
    spec = next(s for s in sandbox["servers"] if s["name"] == acme["server"])
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=sandbox["fleet"],
        ops_channel="#db-ops",
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
    )
    upgrade(ctx.engine)
    upsert_customers(ctx.engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    notifier = SlackNotifier(WebClient(token=BOT_TOKEN, base_url=stub.base_url), ctx.events)
    worker = Worker(ctx.with_notifier(notifier))
    # A clean log first (as heal leaves it): the check quotes the window's first three error
    # lines, and a test before this one on the worker may have left some of its own there.
    os.truncate(spec["log_path"], 0)
    # acme raises errors whose message is a Slack control sequence, as its own role would.
    with psycopg.connect(_conninfo(spec, acme["database"]), autocommit=True) as conn:
        conn.execute(f"SET ROLE {acme['role']}")
        for _ in range(12):  # past the logfile check's crit threshold (10)
            with contextlib.suppress(psycopg.Error):
                conn.execute(f"DO $$ BEGIN RAISE EXCEPTION '{HOSTILE}'; END $$")
    try:
        outcome = worker.health_sweep(worker.clock(), 0)
        assert outcome["opened"] >= 1, outcome
        titles = [i.title for i in worker.incidents.open_incidents()]
        logfile = [t for t in titles if t.startswith("logfile critical")]
        assert logfile and not any("evil" in t or "channel" in t for t in logfile), titles
        # The card carries the log line (escaped) somewhere, so the words did travel.
        posted = [c for c in stub.calls if c.kind in ("chat.postMessage", "chat.update")]
        sent = json.dumps([c.body for c in posted], ensure_ascii=False)
        assert posted and "evil.example" in sent, sent[:2000]
        for call in stub.calls:
            raw = json.dumps(call.body, ensure_ascii=False)
            assert not any(live in raw for live in LIVE), (call.kind, raw[:2000])
    finally:
        worker.ops.close()
        os.truncate(spec["log_path"], 0)  # as heal rotates it: the next test reads a clean log


def test_a_plain_message_text_is_made_inert_by_the_notifier(stub: SlackStub) -> None:
    notifier = SlackNotifier(WebClient(token=BOT_TOKEN, base_url=stub.base_url))
    notifier.post("#db-ops", Message(text=f"Nightly backups failed for {HOSTILE}"))
    call = stub.wait_for(lambda c: c.kind == "chat.postMessage")
    assert not any(live in json.dumps(call.body) for live in LIVE), call.body
