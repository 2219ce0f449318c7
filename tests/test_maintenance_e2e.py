"""A maintenance window end to end, on the session's sandbox, with the scheduler's jobs run as
the scheduler runs them (core.jobs: each slot claimed, run, recorded), time moved from one
sweep to the next instead of waited for.

The first server of the sandbox goes into maintenance and its PostgreSQL is stopped: no
incident, no page. A customer database on another server goes down at the same time: paged as
usual. The window ends with the server still down: paged within 60 s, and the window's summary
goes in the thread of its announcement.

Time moves forward from the real now, never back: the sandbox's clusters and backups live on
the real clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine

from bot.runtime import Runtime
from bot.scheduler import Worker
from bot.views.render import report_parts
from core.customers import customer_from_mapping, upsert_customers
from core.jobs import next_runs
from core.notify import RecordingNotifier, Sent
from core.report import render_text
from storage.migrate import upgrade

ALICE = "U_ALICE"  # the sandbox's primary on call
OPS = "#db-ops"


@pytest.fixture
def worker(sandbox: dict[str, Any], tmp_path: Path) -> Worker:
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=sandbox["fleet"],
        ops_channel=OPS,
    )
    upgrade(ctx.engine)
    upsert_customers(ctx.engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    return Worker(ctx.with_notifier(RecordingNotifier()))


def pages(worker: Worker) -> list[Sent]:
    notifier = worker.notifier
    assert isinstance(notifier, RecordingNotifier)
    return [s for s in notifier.sent if s.how == "dm"]


def test_a_window_holds_its_servers_pages_and_lets_them_go_at_its_end(
    worker: Worker,
    sandbox: dict[str, Any],
    sandbox_break: Callable[[str, str], dict[str, Any]],
) -> None:
    server = sandbox["servers"][0]["name"]
    mine = sorted(c["name"] for c in sandbox["customers"] if c["server"] == server)
    other = next(c for c in sandbox["customers"] if c["server"] != server)
    sweep = worker.specs["health_sweep"].trigger
    (slot,) = next_runs(sweep, datetime.now(UTC) + timedelta(seconds=5))
    try:
        with time_machine.travel(slot - timedelta(seconds=20), tick=False) as clock:
            start = datetime.now(UTC)
            scheduled = worker.maintenance.schedule(
                server, "5m", "kernel upgrade", actor=ALICE, now=start
            )
            window = worker.maintenance.set_announcement(scheduled.window.id, OPS, "1700.0001")
            sandbox_break("server-down", server)
            sandbox_break("db-down", other["name"])

            def run_sweep_at(at: datetime) -> dict[str, Any]:
                clock.move_to(at)
                result = worker.run("health_sweep")
                assert result.ok, result
                worker.run("escalation_tick")
                return dict(result.outcome or {})

            # Three sweeps inside the window.
            for n in range(3):
                run_sweep_at(slot + n * timedelta(minutes=1) + timedelta(seconds=1))
            open_now = worker.incidents.open_incidents()
            assert not [i for i in open_now if i.server == server], open_now
            assert [i for i in open_now if other["name"] in i.customers], "paged as usual"
            texts = [p.message.text for p in pages(worker)]
            assert any(other["name"] in t for t in texts), texts
            assert not any(server in t for t in texts), texts
            suppressed = worker.rt.events.query(kind="maintenance.suppressed", limit=100)
            assert {e.subject for e in suppressed} >= {server, *mine}, "recorded, once each"
            # The report says so, instead of the failure.
            report = worker.ops.report(deadline_s=10.0)
            entry = next(s for s in report["servers"] if s["name"] == server)
            assert entry["postgres"] == "down", "the checks still ran"
            assert entry["maintenance"]["ref"] == window.ref
            assert f"{server}: in maintenance until" in render_text(report, worker.rt.tz)
            slack = json.dumps(
                [b.to_dict() for r in report_parts(report, worker.rt.tz) for b in r.blocks]
            )
            assert "In maintenance until" in slack and window.ref in slack, "and in Slack"
            assert f"*{server}*: in maintenance until" in slack
            status = worker.ops.status(mine[0], deadline_s=5.0)  # `dbops status` too
            assert status["database"]["maintenance"] == entry["maintenance"]
            assert status["server"]["maintenance"] == entry["maintenance"]

            # The window ends with the server still down: the first sweep after it pages.
            end = window.ends_at
            (after,) = next_runs(sweep, end)
            outcome = run_sweep_at(after + timedelta(seconds=1))
            assert outcome.get("maintenance_closed") == [window.id], outcome
            (inc,) = [i for i in worker.incidents.open_incidents() if i.server == server]
            assert inc.kind == "server_down"
            paged = [p for p in pages(worker) if f"inc-{inc.id}" in p.message.text]
            assert paged and paged[0].to == ALICE
            assert end <= paged[0].at <= end + timedelta(seconds=60), (end, paged[0].at)
            notifier = worker.notifier
            assert isinstance(notifier, RecordingNotifier)
            (summary,) = [s for s in notifier.posts(OPS) if window.ref in s.message.text]
            assert summary.thread_ts == "1700.0001", "in the announcement's thread"
            assert "still failing at the end" in summary.message.text
            assert worker.maintenance.get(window.id).summary_posted_at is not None
    finally:
        worker.ops.close()
