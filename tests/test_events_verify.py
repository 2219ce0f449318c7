"""`verify` names the first bad event: an edited row, a deleted row, a swapped pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine

from storage.events import EventLog
from tests.tamper import tamper


def _fill(events: EventLog, n: int = 6) -> None:
    for i in range(n):
        events.append("command", "acme", {"i": i, "text": f"/db status acme #{i}"}, actor="U_ALICE")


def _sql(engine: Engine, statement: str, **params: object) -> None:
    # The database refuses UPDATE and DELETE on events: the attacker lifts that guard first.
    tamper(engine, (statement, params))


def test_intact_log_verifies(events: EventLog) -> None:
    _fill(events)
    verdict = events.verify()
    assert verdict.ok and verdict.checked == 6


def test_edited_payload_is_caught(events: EventLog, engine: Engine) -> None:
    _fill(events)
    payload = json.dumps({"i": 3, "text": "/db restore acme"})
    _sql(engine, "UPDATE events SET payload = :p WHERE id = 4", p=payload)
    verdict = events.verify()
    assert not verdict.ok
    assert verdict.bad_id == 4
    assert "edited" in (verdict.reason or "")


def test_edited_actor_is_caught(events: EventLog, engine: Engine) -> None:
    _fill(events)
    _sql(engine, "UPDATE events SET actor = 'U_MALLORY' WHERE id = 2")
    assert events.verify().bad_id == 2


def test_deleted_row_is_caught(events: EventLog, engine: Engine) -> None:
    _fill(events)
    _sql(engine, "DELETE FROM events WHERE id = 3")
    verdict = events.verify()
    assert not verdict.ok
    assert verdict.bad_id == 4
    assert "3 missing" in (verdict.reason or "")


def test_deleted_row_with_ids_renumbered_is_caught(events: EventLog, engine: Engine) -> None:
    _fill(events)
    _sql(engine, "DELETE FROM events WHERE id = 3")
    for i in (4, 5, 6):
        _sql(engine, "UPDATE events SET id = :new WHERE id = :old", new=i - 1, old=i)
    verdict = events.verify()
    assert not verdict.ok and verdict.bad_id == 3


def test_swapped_pair_is_caught(events: EventLog, engine: Engine) -> None:
    _fill(events)
    # Swap rows 2 and 3 wholesale, hashes and all, as a careless or malicious copy would.
    _sql(engine, "UPDATE events SET id = 1000 WHERE id = 2")
    _sql(engine, "UPDATE events SET id = 2 WHERE id = 3")
    _sql(engine, "UPDATE events SET id = 3 WHERE id = 1000")
    verdict = events.verify()
    assert not verdict.ok
    assert verdict.bad_id == 2
    assert "prev_hash" in (verdict.reason or "")


def test_cli_verify_exit_codes(sqlite_engine: Engine) -> None:
    url = str(sqlite_engine.url)
    log = EventLog(sqlite_engine)
    _fill(log)
    env = {**os.environ, "DATABASE_URL": url}
    cmd = [sys.executable, "-m", "bot", "events", "verify"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "6 events" in ok.stdout
    _sql(sqlite_engine, "UPDATE events SET subject = 'globex' WHERE id = 5")
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "event 5" in bad.stderr


def test_cli_export_is_json_lines_that_verify_again(sqlite_engine: Engine) -> None:
    log = EventLog(sqlite_engine)
    _fill(log, 3)
    env = {**os.environ, "DATABASE_URL": str(sqlite_engine.url)}
    res = subprocess.run(
        [sys.executable, "-m", "bot", "events", "export"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # A header, the events, then the checkpoint that closes the export (storage/audit.py).
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines[0]["type"] == "dbops.export" and lines[-1]["type"] == "dbops.checkpoint"
    events = [r for r in lines if r["type"] == "event"]
    assert [r["id"] for r in events] == [1, 2, 3]
    assert events[1]["prev_hash"] == events[0]["hash"]
    exported = Path(str(sqlite_engine.url.database)).with_name("export.jsonl")
    exported.write_text(res.stdout)
    again = subprocess.run(
        [sys.executable, "-m", "bot", "events", "verify", "--file", str(exported)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "3 events" in again.stdout, again.stderr
    tail = subprocess.run(
        [sys.executable, "-m", "bot", "events", "tail", "-n", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert [r["id"] for r in json.loads(tail.stdout)] == [2, 3]
