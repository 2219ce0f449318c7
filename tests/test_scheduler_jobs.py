"""The nightly jobs on the sandbox: backups at 02:00 and restore tests at 04:30 New York time,
each run once per slot, its outcome in the event log.

The sandbox's clusters and its first backups live on the real clock, so the test moves time
forward to the jobs' next slots, never back, and reads the status at the moved time too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine

from bot.runtime import Runtime
from bot.scheduler import Worker
from core.customers import customer_from_mapping, upsert_customers
from core.jobs import next_runs
from core.notify import RecordingNotifier
from storage.migrate import upgrade


@pytest.fixture
def worker(sandbox: dict[str, Any], tmp_path: Path) -> Worker:
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=sandbox["fleet"],
        ops_channel="#db-ops",
    )
    upgrade(ctx.engine)
    upsert_customers(ctx.engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    return Worker(ctx.with_notifier(RecordingNotifier()))


def test_nightly_backups_then_restore_tests(
    worker: Worker, sandbox: dict[str, Any], sandbox_backups_kept: None
) -> None:
    n = len(sandbox["customers"])
    # The next 02:00 and 04:30 in TIMEZONE after the real now (the triggers know DST).
    (backups_at,) = next_runs(worker.specs["nightly_backups"].trigger, datetime.now(UTC))
    (tests_at,) = next_runs(worker.specs["restore_tests"].trigger, backups_at)
    with time_machine.travel(backups_at + timedelta(seconds=4), tick=False):
        first = worker.run("nightly_backups")
        again = worker.run("nightly_backups")
    assert first.ran and first.ok, first
    assert first.outcome["ok"] == n and first.outcome["failed"] == 0
    assert not again.ran and again.why_not == "claimed elsewhere"  # the same slot: once
    with time_machine.travel(tests_at + timedelta(seconds=4), tick=False):
        tests = worker.run("restore_tests")
        status = worker.ops.status("acme")
    assert tests.ok and tests.outcome == {"tested": n, "failed": []}
    ends = [
        e
        for e in worker.rt.events.query(kind="job.end")
        if e.subject in ("nightly_backups", "restore_tests")
    ]
    assert [(e.subject, e.payload["outcome"]) for e in ends] == [
        ("nightly_backups", "ok"),
        ("restore_tests", "ok"),
    ]
    verified = next(c for c in status["database"]["checks"] if c["name"] == "backup_verified")
    assert verified["verdict"] == "ok", verified
