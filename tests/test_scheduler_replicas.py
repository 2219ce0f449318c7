"""Exactly once across scheduler processes on PostgreSQL: two at once, and one killed with
SIGKILL and started again later. Real processes, real APScheduler, time moved (not slept).

Time moves forward only, to the next weekday 08:00 in New York after the real now: the
schedulers work on the session's sandbox, whose clusters and backups are on the real clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, text

from core.customers import customer_from_mapping, upsert_customers
from core.jobs import job_specs, next_runs
from storage.db import make_engine
from storage.migrate import upgrade
from tests.pgserver import Databases

TIMEZONE = "America/New_York"


def next_morning_report() -> datetime:
    """The morning report's next slot (08:00 New York, a weekday) after the real now, in UTC."""
    (spec,) = [s for s in job_specs(ZoneInfo(TIMEZONE), {}) if s.id == "morning_report"]
    (slot,) = next_runs(spec.trigger, datetime.now(UTC))
    return slot.astimezone(UTC)


@pytest.fixture
def pg_engine(pg_databases: Databases, sandbox: dict[str, Any]) -> Iterator[Engine]:
    engine = make_engine(pg_databases.create())
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    yield engine
    engine.dispose()


def _start(
    engine: Engine, sandbox: dict[str, Any], start: datetime, out: Path
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "DBOPS_FLEET": sandbox["fleet"],
        "OPS_CHANNEL": "#db-ops",
        "TIMEZONE": TIMEZONE,
    }
    env.pop("SLACK_BOT_TOKEN", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.scheduler_proc",
            "--start",
            start.isoformat(),
            "--out",
            str(out),
        ],
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def _wait(predicate: Any, timeout: float, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(
                    f"scheduler exited early: {p.stderr.read() if p.stderr else ''}"
                )
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _stop(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def _posts(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _report_runs(engine: Engine) -> int:
    return _count(
        engine, "SELECT count(*) FROM events WHERE kind = 'job.end' AND subject = 'morning_report'"
    )


def test_two_schedulers_run_the_0800_report_once(
    pg_engine: Engine, sandbox: dict[str, Any], tmp_path: Path, sandbox_backups_kept: None
) -> None:
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    slot = next_morning_report()
    start = slot - timedelta(seconds=3)  # 07:59:57 in New York
    procs = [_start(pg_engine, sandbox, start, out) for out in outs]
    try:
        _wait(lambda: _report_runs(pg_engine) >= 1, 60, procs)
        # Give the loser every chance to run it too (it would have by now: both fire at 08:00).
        time.sleep(2)
    finally:
        _stop(*procs)
    assert _report_runs(pg_engine) == 1
    assert _count(pg_engine, "SELECT count(*) FROM job_runs WHERE job_id = 'morning_report'") == 1
    posts = [p for out in outs for p in _posts(out) if "health check" in p["text"].lower()]
    # One summary in the channel and its details in the thread, from one process only.
    assert len([p for p in posts if not p.get("thread")]) == 1
    assert (
        sum(1 for out in outs if any("health check" in p["text"].lower() for p in _posts(out))) == 1
    )
    with pg_engine.connect() as conn:
        row = conn.execute(
            text("SELECT scheduled_for, status FROM job_runs WHERE job_id = 'morning_report'")
        ).one()
    assert row.status == "ok"
    assert row.scheduled_for == slot


def test_killed_scheduler_restarted_late_runs_the_missed_report_once(
    pg_engine: Engine, sandbox: dict[str, Any], tmp_path: Path, sandbox_backups_kept: None
) -> None:
    out = tmp_path / "posts.jsonl"
    slot = next_morning_report()
    first = _start(pg_engine, sandbox, slot - timedelta(seconds=10), out)
    try:
        _wait(
            lambda: (
                _count(pg_engine, "SELECT count(*) FROM events WHERE kind = 'scheduler.start'") == 1
            ),
            30,
            [first],
        )
    finally:
        first.send_signal(signal.SIGKILL)  # before 08:00: the report is pending
        first.wait(timeout=10)
    assert _report_runs(pg_engine) == 0
    # Back up twenty minutes after 08:00: the missed report is run once, marked late.
    second = _start(pg_engine, sandbox, slot + timedelta(minutes=20), out)
    try:
        _wait(lambda: _report_runs(pg_engine) == 1, 60, [second])
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(timeout=10)
    late = [p for p in _posts(out) if "min late" in p["text"]]
    assert len(late) == 1 and "posted 20 min late" in late[0]["text"]
    # A third start a little later finds the slot done and runs nothing again.
    third = _start(pg_engine, sandbox, slot + timedelta(minutes=25), out)
    try:
        _wait(
            lambda: (
                _count(pg_engine, "SELECT count(*) FROM events WHERE kind = 'scheduler.start'") == 3
            ),
            30,
            [third],
        )
        time.sleep(2)
    finally:
        _stop(third)
    assert _report_runs(pg_engine) == 1
    assert len([p for p in _posts(out) if "min late" in p["text"]]) == 1
