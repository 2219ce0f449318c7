"""`dbops jobs run NAME`: one job now, by hand, recorded as a manual run; what it posts to Slack is
what the scheduled run posts, and it leaves the schedule's own slots to the scheduler."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.cli import _worker_notifier
from bot.runtime import Runtime
from bot.scheduler import Worker
from core.customers import customer_from_mapping, get_customer, upsert_customers
from core.jobs import last_slot, runs
from core.notify import NotifyError, RecordingNotifier
from storage.migrate import upgrade
from tests.bot_kit import sharing
from tests.slack_stub import BOT_TOKEN, Call, SlackStub

OPS = "#db-ops"


def _dbops(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture
def ctx(sandbox: dict[str, Any], stub: SlackStub, tmp_path: Path) -> Runtime:
    """The sandbox fleet's customers in a new database, and Slack's Web API at the stub."""
    context = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=sandbox["fleet"],
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
        ops_channel=OPS,
    )
    upgrade(context.engine)
    upsert_customers(context.engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    return context


@pytest.fixture
def cli_env(ctx: Runtime, sandbox: dict[str, Any], stub: SlackStub) -> dict[str, str]:
    """What `dbops` reads from its environment, for the same database, fleet and Slack."""
    return {
        **os.environ,
        "DATABASE_URL": ctx.settings.database_url,
        "DBOPS_FLEET": sandbox["fleet"],
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_API_URL": stub.base_url,
        "OPS_CHANNEL": OPS,
    }


def _posts(stub: SlackStub) -> list[Call]:
    return stub.find(lambda c: c.kind == "chat.postMessage")


def _shown(call: Call) -> dict[str, Any]:
    """What a post shows, minus the moment it was made: the report's context line says when it
    ran and how long it took, and its worst RPO how old the newest archived WAL was then, which
    two runs never share."""
    blocks = call.body.get("blocks") or []
    if isinstance(blocks, str):
        blocks = json.loads(blocks)
    kept = []
    for block in blocks:
        if block.get("type") == "context":
            (element,) = block["elements"]
            assert re.search(r"; \d+ ms$", element["text"]), element
            block = {**block, "elements": [{**element, "text": "<when>; <n> ms"}]}
        elif block.get("type") == "section" and "Worst RPO: " in block["text"]["text"]:
            # The RPO is the age of the newest archived WAL at the moment of the run.
            text = re.sub(r"Worst RPO: \S+ \(", "Worst RPO: <age> (", block["text"]["text"])
            block = {**block, "text": {**block["text"], "text": text}}
        kept.append(block)
    return {
        "channel": call.body.get("channel"),
        "text": call.body.get("text"),
        "threaded": bool(call.body.get("thread_ts")),
        "blocks": kept,
    }


def _morning_slot(worker: Worker) -> datetime:
    """The newest 08:00 New York weekday slot: today's date, whatever day the suite runs."""
    slot = last_slot(worker.specs["morning_report"].trigger, datetime.now(UTC), None)
    assert slot is not None
    return slot


def _at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def test_jobs_run_morning_report_posts_what_the_8am_run_posts(
    ctx: Runtime, cli_env: dict[str, str], stub: SlackStub, tmp_path: Path
) -> None:
    res = _dbops(cli_env, tmp_path, "jobs", "run", "morning_report")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("morning_report: ok")
    by_hand = [_shown(c) for c in _posts(stub)]
    assert [(p["channel"], p["threaded"]) for p in by_hand] == [(OPS, False), (OPS, True)]
    assert by_hand[0]["text"].startswith("Morning health check OK")
    assert by_hand[1]["blocks"][0]["type"] == "header"

    # The run is in the event log as a manual one, by the CLI, and took no scheduled slot.
    start, end = [
        e for e in ctx.events.query(subject="morning_report") if e.kind.startswith("job.")
    ]
    assert (start.kind, end.kind) == ("job.start", "job.end")
    assert start.actor == end.actor == "cli"
    assert start.payload["manual"] is True and end.payload["manual"] is True
    assert end.payload["run"] == start.payload["run"]
    assert end.payload["outcome"] == "ok" and end.payload["result"]["verdict"] == "ok"
    assert runs(ctx.engine, "morning_report") == []

    # The 08:00 run, on the scheduler's own wiring, five seconds after its slot.
    stub.reset()
    slot = _morning_slot(Worker(sharing(ctx, notifier=RecordingNotifier())))
    scheduled = Worker(
        sharing(ctx, notifier=_worker_notifier(ctx), clock=_at(slot + timedelta(seconds=5)))
    )
    try:
        result = scheduled.run("morning_report")
    finally:
        scheduled.ops.close()
    assert result.ran and result.ok and not result.manual, result
    assert [_shown(c) for c in _posts(stub)] == by_hand


def test_jobs_run_json_prints_the_outcome(
    cli_env: dict[str, str], stub: SlackStub, tmp_path: Path
) -> None:
    res = _dbops(cli_env, tmp_path, "jobs", "run", "oncall_handoff", "--json")
    assert res.returncode == 0, res.stderr
    outcome = json.loads(res.stdout)
    assert outcome["job"] == "oncall_handoff" and outcome["manual"] is True
    assert outcome["ok"] is True and outcome["outcome"] == "ok"
    assert outcome["error_id"] is None and isinstance(outcome["duration_ms"], int)
    # `dbops jobs --json` still lists the jobs.
    listed = _dbops(cli_env, tmp_path, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "nightly_backups" in {row["id"] for row in json.loads(listed.stdout)}


def test_a_manual_run_leaves_the_scheduled_slot_to_the_scheduler(ctx: Runtime) -> None:
    notifier = RecordingNotifier()
    worker = Worker(ctx.with_notifier(notifier))
    slot = _morning_slot(worker)
    try:
        # An operator posts the report by hand 30 s after 08:00, before the scheduler gets to it.
        worker.clock = _at(slot + timedelta(seconds=30))
        by_hand = worker.run_manual("morning_report", actor="cli", user="alice")
        assert by_hand.ran and by_hand.ok and by_hand.manual
        assert runs(ctx.engine, "morning_report") == []
        # The scheduled run still happens, once.
        worker.clock = _at(slot + timedelta(seconds=31))
        on_time = worker.run("morning_report")
        again = worker.run("morning_report")
        assert on_time.ran and on_time.ok and on_time.slot == slot, on_time
        assert not again.ran and again.why_not == "claimed elsewhere"
        # And a claim held by the scheduler does not stop another run by hand.
        assert worker.run_manual("morning_report", actor="cli").ok
    finally:
        worker.ops.close()
    assert len(notifier.posts(OPS)) == 6  # three runs, a headline and its thread each
    starts = [e for e in ctx.events.query(kind="job.start") if e.subject == "morning_report"]
    assert [e.payload.get("manual", False) for e in starts] == [True, False, True]
    assert starts[0].payload["user"] == "alice"


def test_a_job_that_raises_is_a_failed_manual_run(ctx: Runtime) -> None:
    notifier = RecordingNotifier(fail_with=NotifyError("Slack chat.postMessage failed: boom"))
    worker = Worker(ctx.with_notifier(notifier))
    try:
        result = worker.run_manual("morning_report", actor="cli")
    finally:
        worker.ops.close()
    assert result.ran and not result.ok and result.manual
    assert result.error_id and result.error == "NotifyError"
    (end,) = [e for e in ctx.events.query(kind="job.end") if e.subject == "morning_report"]
    assert end.payload["manual"] is True and end.payload["outcome"] == "failed"
    assert end.payload["error_id"] == result.error_id


def test_jobs_run_nightly_backups_with_a_server_down_exits_1(
    ctx: Runtime,
    cli_env: dict[str, str],
    stub: SlackStub,
    tmp_path: Path,
    sandbox_break: Callable[[str, str], dict[str, Any]],
    sandbox_backups_kept: None,
) -> None:
    server = get_customer(ctx.engine, "acme").server
    sandbox_break("server-down", server)
    res = _dbops(cli_env, tmp_path, "jobs", "run", "nightly_backups", "--json")
    assert res.returncode == 1, (res.stdout, res.stderr)
    outcome = json.loads(res.stdout)
    assert outcome["ok"] is False and outcome["outcome"] == "failed"
    assert outcome["result"]["failed"] >= 1
    # The channel hears of it as it would from the 02:00 run.
    (post,) = _posts(stub)
    assert post.body["channel"] == OPS and "Nightly backups failed for" in post.body["text"]
    assert "acme" in post.body["text"]
    (end,) = [e for e in ctx.events.query(kind="job.end") if e.subject == "nightly_backups"]
    assert end.payload["manual"] is True and end.payload["outcome"] == "failed"
    backups = [e for e in ctx.events.query(subject="acme") if e.kind.startswith("backup")]
    assert backups and all(e.actor == "cli" for e in backups)


def test_jobs_run_an_unknown_job_names_the_jobs(cli_env: dict[str, str], tmp_path: Path) -> None:
    res = _dbops(cli_env, tmp_path, "jobs", "run", "nightly_backup")
    assert res.returncode == 2
    assert "no job 'nightly_backup'" in res.stderr
    for name in ("morning_report", "nightly_backups", "restore_tests", "health_sweep"):
        assert name in res.stderr
    assert "Did you mean 'nightly_backups'?" in res.stderr
    assert "Traceback" not in res.stderr
