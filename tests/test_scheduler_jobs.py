"""The nightly jobs on the sandbox: backups at 02:00 and restore tests at 04:30 New York time,
each run once per slot, its outcome in the event log."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import time_machine

from bot.context import Context
from bot.scheduler import Worker
from core.customers import customer_from_mapping, upsert_customers
from core.notify import RecordingNotifier
from storage.migrate import upgrade


@pytest.fixture
def worker(sandbox: dict[str, Any], tmp_path: Path) -> Worker:
    ctx = Context.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=sandbox["fleet"],
        ops_channel="#db-ops",
    )
    upgrade(ctx.engine)
    upsert_customers(ctx.engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    return Worker(ctx, RecordingNotifier())


def test_nightly_backups_then_restore_tests(
    worker: Worker, sandbox: dict[str, Any], sandbox_backups_kept: None
) -> None:
    n = len(sandbox["customers"])
    with time_machine.travel(datetime(2026, 11, 24, 7, 0, 4, tzinfo=UTC), tick=False):
        first = worker.run("nightly_backups")
        again = worker.run("nightly_backups")
    assert first.ran and first.ok, first
    assert first.outcome["ok"] == n and first.outcome["failed"] == 0
    assert not again.ran and again.why_not == "claimed elsewhere"  # the same slot: once
    with time_machine.travel(datetime(2026, 11, 24, 9, 30, 4, tzinfo=UTC), tick=False):
        tests = worker.run("restore_tests")
    assert tests.ok and tests.outcome == {"tested": n, "failed": []}
    ends = [
        e
        for e in worker.ctx.events.query(kind="job.end")
        if e.subject in ("nightly_backups", "restore_tests")
    ]
    assert [(e.subject, e.payload["outcome"]) for e in ends] == [
        ("nightly_backups", "ok"),
        ("restore_tests", "ok"),
    ]
    status = worker.ops.status("acme")
    verified = next(c for c in status["database"]["checks"] if c["name"] == "backup_verified")
    assert verified["verdict"] == "ok", verified
