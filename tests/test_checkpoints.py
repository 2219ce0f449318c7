"""Checkpoints: the signed head, appended to DBOPS_CHECKPOINTS and posted to the ops channel,
hourly by the scheduler and after every destructive action; a log cut back past one fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import Engine

from bot.runtime import Runtime
from bot.scheduler import Worker
from core.checkpoints import (
    DESTRUCTIVE_KINDS,
    Checkpointer,
    publish,
    read_checkpoints,
)
from core.jobs import job_specs, next_runs
from core.notify import RecordingNotifier
from storage.chain import Checkpoint, parse_checkpoints
from storage.eventkeys import Keyring, generate
from storage.events import EventLog
from storage.group_commit import GroupCommitLog
from storage.migrate import upgrade
from tests.tamper import tamper

OPS = "#db-ops"


@pytest.fixture
def ring() -> Keyring:
    return Keyring.parse(generate())


@pytest.fixture
def keyed(engine: Engine, ring: Keyring) -> EventLog:
    return EventLog(engine, keys=ring)


def _fill(log: EventLog, n: int, tag: str = "x") -> None:
    for i in range(n):
        log.append("command", "acme", {"i": i, "tag": tag}, actor="U_ALICE")


def test_publish_appends_a_signed_line_and_posts_it(
    keyed: EventLog, ring: Keyring, tmp_path: Path
) -> None:
    _fill(keyed, 4)
    path, notifier = tmp_path / "checkpoints.jsonl", RecordingNotifier()
    checkpoint = publish(keyed, notifier, OPS, path)
    head = keyed.tail(1)[0]
    assert (checkpoint.id, checkpoint.hash, checkpoint.count) == (head.id, head.hash, 5)
    assert checkpoint.key_id == ring.keys[0].id
    assert ring.keys[0].signature_ok(checkpoint.message(), checkpoint.signature or "")
    assert [(c.id, c.hash, c.signature) for c in read_checkpoints(path)] == [
        (checkpoint.id, checkpoint.hash, checkpoint.signature)
    ]
    (post,) = notifier.posts(OPS)
    assert checkpoint.line() in post.message.text
    # Slack's copy is a witness too: the posted text parses back to the same checkpoint.
    (from_slack,) = parse_checkpoints(post.message.text)
    assert (from_slack.id, from_slack.signature) == (checkpoint.id, checkpoint.signature)
    verdict = keyed.verify([from_slack])
    assert verdict.ok and verdict.checkpoints == 1


def test_log_cut_back_past_a_checkpoint_fails(
    keyed: EventLog, engine: Engine, tmp_path: Path
) -> None:
    _fill(keyed, 5)
    path = tmp_path / "checkpoints.jsonl"
    publish(keyed, None, OPS, path)  # event 6
    _fill(keyed, 3, "after")
    assert keyed.verify(read_checkpoints(path)).ok
    tamper(engine, ("DELETE FROM events WHERE id >= 5", {}))
    assert keyed.verify().ok  # a clean cut: nothing in the table gives it away ...
    verdict = keyed.verify(read_checkpoints(path))  # ... but the published head does
    assert not verdict.ok and verdict.bad_id == 5
    assert "cut off" in (verdict.reason or "") and "up to 6" in (verdict.reason or "")


def test_log_cut_back_and_written_again_fails_at_the_checkpoint(
    keyed: EventLog, engine: Engine, tmp_path: Path
) -> None:
    _fill(keyed, 5)
    path = tmp_path / "checkpoints.jsonl"
    publish(keyed, None, OPS, path)  # event 6
    tamper(engine, ("DELETE FROM events WHERE id >= 4", {}))
    _fill(keyed, 5, "rewritten")  # dbops itself writes on: every row sealed and linked
    assert keyed.verify().ok
    verdict = keyed.verify(read_checkpoints(path))
    assert not verdict.ok and verdict.bad_id == 6
    assert "not the event the checkpoint" in (verdict.reason or "")


def test_altered_or_foreign_checkpoints_are_refused(keyed: EventLog, tmp_path: Path) -> None:
    _fill(keyed, 3)
    good = keyed.checkpoint()
    altered = Checkpoint.from_json({**good.as_json(), "id": 3}, "cp:1")
    verdict = keyed.verify([altered])
    assert not verdict.ok and "valid signature" in (verdict.reason or "")
    stranger = Keyring.parse(generate())
    at = datetime.fromisoformat(good.ts.replace("Z", "+00:00"))
    foreign = Checkpoint.make(good.id, good.hash, good.count, at, stranger.keys[0])
    verdict = keyed.verify([foreign])
    assert not verdict.ok and "not one of DBOPS_EVENTS_KEY's" in (verdict.reason or "")
    with pytest.raises(ValueError, match="line 2"):
        parse_checkpoints(good.line() + '\n{"type": "dbops.checkpoint", "v": 1}\n')


def test_unkeyed_log_gets_unsigned_checkpoints_that_still_catch_a_cut(
    events: EventLog, engine: Engine
) -> None:
    _fill(events, 4)
    checkpoint = events.checkpoint()
    assert checkpoint.key_id is None and checkpoint.signature is None
    tamper(engine, ("DELETE FROM events WHERE id = 4", {}))
    assert events.verify([checkpoint]).bad_id == 4


@pytest.mark.parametrize("batching", [False, True])
def test_a_destructive_action_is_followed_by_a_checkpoint(
    engine: Engine, ring: Keyring, tmp_path: Path, batching: bool
) -> None:
    log = GroupCommitLog(engine, keys=ring) if batching else EventLog(engine, keys=ring)
    path, notifier = tmp_path / "checkpoints.jsonl", RecordingNotifier()
    checkpointer = Checkpointer(lambda: publish(log, notifier, OPS, path)).watch(log)
    try:
        _fill(log, 3)
        assert checkpointer.flush(5) and not path.exists()  # nothing destructive yet
        for kind in sorted(DESTRUCTIVE_KINDS):
            done = log.append(kind, "acme", {"customer": "acme"}, actor="U_CAROL")
            assert checkpointer.flush(10)
            last = read_checkpoints(path)[-1]
            assert last.id >= done.id  # it covers the action
        assert len(notifier.posts(OPS)) == len(read_checkpoints(path))
        assert log.verify(read_checkpoints(path)).ok
    finally:
        checkpointer.close()
        if isinstance(log, GroupCommitLog):
            log.close()


FLEET = """
[[servers]]
name = "vps1"
host = "127.0.0.1"
dsn = "host=127.0.0.1 user=dbops_monitor dbname=postgres"
"""


def test_scheduler_checkpoints_hourly_and_after_a_restart(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(FLEET)
    keyfile = tmp_path / "events.keys"
    keyfile.write_text(generate() + "\n")
    keyfile.chmod(0o600)
    path = tmp_path / "checkpoints.jsonl"
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=tmp_path / "fleet.toml",
        ops_channel=OPS,
        dbops_events_key=str(keyfile),
        dbops_checkpoints=path,
    )
    upgrade(ctx.engine)
    spec = next(s for s in job_specs(ctx.settings.tz, {}) if s.id == "events_checkpoint")
    runs = next_runs(spec.trigger, datetime.now(UTC), 3)
    assert [(b - a).total_seconds() for a, b in pairwise(runs)] == [3600] * 2
    notifier = RecordingNotifier()
    worker = Worker(ctx.with_notifier(notifier))
    try:
        result = worker.run_manual("events_checkpoint", actor="cli")
        assert ctx.keys is not None
        assert result.ok and result.outcome["key_id"] == ctx.keys.keys[0].id
        assert len(read_checkpoints(path)) == 1 and len(notifier.posts(OPS)) == 1
        # A restart recorded by anything in this process (the command, a card's button):
        ctx.events.append("server.restart", "vps1", {"answering": True}, actor="U_ALICE")
        assert worker.checkpointer.flush(10)
        assert len(read_checkpoints(path)) == 2 and len(notifier.posts(OPS)) == 2
        assert ctx.events.verify(read_checkpoints(path)).ok
    finally:
        worker.checkpointer.close()
        worker.ops.close()


def test_cli_checkpoint_and_verify_against_the_file(sqlite_engine: Engine, tmp_path: Path) -> None:
    keyfile = tmp_path / "events.keys"
    keyfile.write_text(generate() + "\n")
    keyfile.chmod(0o600)
    path = tmp_path / "checkpoints.jsonl"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DBOPS_", "SLACK_"))}
    env = {
        **base,
        "DATABASE_URL": str(sqlite_engine.url),
        "DBOPS_EVENTS_KEY": str(keyfile),
        "DBOPS_CHECKPOINTS": str(path),
    }
    log = EventLog(sqlite_engine, keys=Keyring.load(str(keyfile)))
    _fill(log, 4)
    run = [sys.executable, "-m", "bot", "events"]
    made = subprocess.run([*run, "checkpoint", "--json"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert data["id"] == 5 and data["file"] == str(path) and data["signature"]
    ok = subprocess.run([*run, "verify"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "1 checkpoint(s) matched" in ok.stdout, ok.stderr
    tamper(sqlite_engine, ("DELETE FROM events WHERE id >= 3", {}))
    cut = subprocess.run([*run, "verify"], env=env, capture_output=True, text=True)
    assert cut.returncode == 1 and "event 3" in cut.stderr and "cut off" in cut.stderr
    # The same, against lines copied from Slack into another file.
    slack = tmp_path / "from-slack.txt"
    slack.write_text(f"dbops  11:30\n:lock: Event log checkpoint ...\n```{path.read_text()}```\n")
    cut = subprocess.run(
        [*run, "verify", "--checkpoints", str(slack)],
        env={**env, "DBOPS_CHECKPOINTS": ""},
        capture_output=True,
        text=True,
    )
    assert cut.returncode == 1 and "event 3" in cut.stderr
