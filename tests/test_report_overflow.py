"""The morning report on the worst morning reaches the ops channel in full.

Every backup of a 50-server fleet with 15 databases each failed overnight: the report is about
80,000 characters, where Slack takes about 12,000 in one message (``msg_blocks_too_long``). The
channel gets a one-line summary that always fits; its thread gets the whole report, every line,
in as many messages as it takes, each accepted by the strict Slack stub. `/db report` that
morning answers in one message and says how many lines it left out and where they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bot.notifiers import SlackNotifier, web_client
from bot.runtime import Runtime
from bot.scheduler import Worker
from bot.views import render
from core.report import text_view
from storage.migrate import upgrade
from tests.slack_stub import BOT_TOKEN, Call, SlackStub
from tests.synthetic_fleet import ALL_BACKUPS_FAILED, BACKUP_FAILED, NOW, fleet_report

OPS = "#db-ops"
TZ = ZoneInfo("America/New_York")
FLEET = """
[[servers]]
name = "vps000"
host = "127.0.0.1"
dsn = "host=127.0.0.1 user=dbops_monitor dbname=postgres"
"""


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture
def worker(stub: SlackStub, tmp_path: Path) -> Iterator[Worker]:
    """The scheduler's worker, posting to Slack (the stub) as `dbops scheduler` does."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=str(fleet),
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
        ops_channel=OPS,
    )
    upgrade(ctx.engine)
    worker = Worker(ctx.with_notifier(SlackNotifier(web_client(ctx.settings), ctx.events)))
    yield worker
    worker.ops.close()


def posts(stub: SlackStub) -> list[Call]:
    return stub.find(lambda c: c.kind == "chat.postMessage")


def test_every_backup_failed_and_the_channel_gets_every_line(
    worker: Worker, stub: SlackStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = fleet_report(50, 15, ALL_BACKUPS_FAILED)
    assert report["summary"]["backups_ok"] == 0 and report["summary"]["databases_total"] == 750
    monkeypatch.setattr(worker.ops, "report", lambda **_: report)

    outcome = worker.morning_report(NOW, late_s=0)

    head, *thread = posts(stub)
    assert all(p.ok for p in (head, *thread)), [(p.error, p.answer) for p in posts(stub)]
    # The summary, in the channel: the counts, and where the rest is.
    assert "thread_ts" not in head.body
    assert (
        head.body["text"].startswith("Morning health check CRIT")
        and "0/750 backups ok" in (head.body["text"])
    )
    assert f"in the thread: {len(thread)} messages" in head.text
    # The report, in its thread: as many messages as it takes, each one Slack took.
    assert outcome["parts"] == len(thread) > 5
    assert {p.body["thread_ts"] for p in thread} == {head.answer["ts"]}
    assert {p.answer["channel"] for p in (head, *thread)} == {stub.channel_id(OPS)}
    for k, part in enumerate(thread, 1):
        assert f"Part {k} of {len(thread)}" in part.text
    # Every failed backup is there, once, in order; nothing was cut.
    shown = "\n".join(p.text for p in thread)
    failed = re.findall(r"\*(c\d{3}x\d{2})\*: pg_dump: error", shown)
    assert failed == [d["customer"] for d in report["databases"]]
    assert BACKUP_FAILED.split(":")[0] in shown and "not shown" not in shown and "…and" not in shown
    # A list cut across messages carries its heading on.
    assert "Backups completed: 0/750 successful _(continued)_" in thread[1].text


def test_a_bad_morning_with_a_late_start_says_so_once(
    worker: Worker, stub: SlackStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.ops, "report", lambda **_: fleet_report(50, 15, ALL_BACKUPS_FAILED))
    worker.morning_report(NOW, late_s=20 * 60)
    late = [p for p in posts(stub) if "min late" in p.body["text"]]
    assert len(late) == 1 and "thread_ts" not in late[0].body


def test_db_report_that_morning_says_what_it_left_out() -> None:
    report = fleet_report(50, 15, ALL_BACKUPS_FAILED)
    message = render.report_reply(report, TZ).message()
    sections = [b["text"]["text"] for b in message["blocks"] if b["type"] == "section"]
    shown = [line for text in sections for line in text.split("\n") if line.strip()]
    notes = [e["text"] for b in message["blocks"] if b["type"] == "context" for e in b["elements"]]
    (left,) = [re.search(r"…and (\d+) more lines not shown here: `dbops report`", n) for n in notes
               if "not shown" in n]  # fmt: skip
    assert left is not None
    # What it shows and what it says it left out add up to the whole report.
    whole = render.template("report.md.j2", TZ, **text_view(report, TZ))
    assert len(shown) + int(left.group(1)) == len([ln for ln in whole.split("\n") if ln.strip()])
    assert 0 < sum("pg_dump: error" in line for line in shown) < 750


def test_a_good_morning_is_one_summary_and_one_part(
    worker: Worker, stub: SlackStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.ops, "report", lambda **_: fleet_report(3, 2))
    worker.morning_report(NOW + timedelta(days=1), late_s=0)
    head, part = posts(stub)
    assert head.ok and part.ok and part.body["thread_ts"] == head.answer["ts"]
    assert "in the thread" not in head.text and "Part" not in part.text
    assert part.body["blocks"][0]["type"] == "header"
