"""`dbops events export`: JSON lines that verify on their own (`dbops events verify --file`),
filtered by time, customer or incident, ending at a signed checkpoint; 10,000 events exported
and verified in well under 5 s each."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from storage.audit import concerns, export, read_export, verify_export
from storage.eventkeys import Keyring, generate
from storage.events import EventLog, NewEvent

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
FAR = datetime(2100, 1, 1, tzinfo=UTC)


@pytest.fixture
def ring() -> Keyring:
    return Keyring.parse(generate())


@pytest.fixture
def keyed(engine: Engine, ring: Keyring) -> EventLog:
    log = EventLog(engine, keys=ring)
    batch = []
    for i in range(30):
        who = ("acme", "globex", "initech")[i % 3]
        batch.append(NewEvent("command", who, {"i": i}, "U_ALICE", ts=T0 + timedelta(minutes=i)))
    batch.append(NewEvent("incident.opened", "inc-7", {"customers": ["acme"]}, "sweep", ts=T0))
    batch.append(
        NewEvent(
            "billing.credit_applied",
            "acme",
            {"incident": "inc-7", "amount_cents": 1234},
            "U_CAROL",
            ts=T0 + timedelta(minutes=40),
        )
    )
    log.append_many(batch)
    return log


def _export(log: EventLog, **kw: object) -> list[str]:
    out = io.StringIO()
    export(log, out, seal=log.checkpoint, now=datetime.now(UTC), **kw)  # type: ignore[arg-type]
    return out.getvalue().splitlines()


def test_customer_export_shows_only_theirs_and_verifies(keyed: EventLog, ring: Keyring) -> None:
    lines = _export(keyed, since=T0, until=FAR, customer="acme")
    exported = read_export(lines)
    shown = [r for r in exported.rows if hasattr(r, "kind")]
    assert shown and all(r.kind == "events.key" or concerns(r, "acme", None) for r in shown)
    # acme's own events, and the incident that names acme among its customers
    assert {r.subject for r in shown if r.kind != "events.key"} == {"acme", "inc-7"}
    assert "globex" not in "\n".join(lines[1:])  # others' events: digests only
    assert exported.header["customer"] == "acme" and exported.checkpoints
    verdict = verify_export(exported, ring)
    assert verdict.ok, verdict
    assert verdict.sealed == len(exported.rows)  # the stubs' seals are checked too
    # An auditor with the public key only: the signed checkpoint vouches for every event.
    public = Keyring.parse(ring.keys[0].public_text)
    audited = verify_export(exported, public)
    assert audited.ok and "public keys only" in str(audited)
    assert "covered by a signed checkpoint" in str(audited)


def test_incident_export(keyed: EventLog, ring: Keyring) -> None:
    exported = read_export(_export(keyed, since=T0, until=FAR, incident="inc-7"))
    kinds = sorted(r.kind for r in exported.rows if hasattr(r, "kind") and r.kind != "events.key")
    assert kinds == ["billing.credit_applied", "incident.opened"]
    assert verify_export(exported, ring).ok


def _edited(lines: list[str], index: int, **changes: object) -> list[str]:
    data = json.loads(lines[index])
    data.update(changes)
    return [*lines[:index], json.dumps(data), *lines[index + 1 :]]


def test_a_tampered_export_fails_naming_where(keyed: EventLog, ring: Keyring) -> None:
    lines = _export(keyed, since=T0, until=FAR, customer="acme")
    events = [i for i, line in enumerate(lines) if '"type":"event"' in line]
    stubs = [i for i, line in enumerate(lines) if '"type":"stub"' in line]
    target = events[2]
    target_id = json.loads(lines[target])["id"]
    edited = read_export(_edited(lines, target, subject="globex"))
    verdict = verify_export(edited, ring)
    assert not verdict.ok and verdict.bad_id == target_id and "edited" in (verdict.reason or "")
    dropped = read_export([*lines[: stubs[1]], *lines[stubs[1] + 1 :]])
    assert verify_export(dropped, ring).bad_id == json.loads(lines[stubs[1]])["id"] + 1
    cut = read_export(lines[:-1])  # the closing checkpoint gone
    assert not verify_export(cut, ring).ok
    forged = read_export(_edited(lines, len(lines) - 1, id=json.loads(lines[-1])["id"] - 1))
    assert "valid signature" in (verify_export(forged, ring).reason or "")


def test_ten_thousand_events_export_and_verify_under_5_s(engine: Engine, ring: Keyring) -> None:
    log = EventLog(engine, keys=ring)
    for b in range(10):
        log.append_many(
            [
                NewEvent("command", "acme" if i % 2 else "globex", {"i": i, "b": b}, "U_ALICE")
                for i in range(1000)
            ]
        )
    started = time.perf_counter()
    out = io.StringIO()
    summary = export(log, out, since=T0, until=FAR, seal=log.checkpoint, now=datetime.now(UTC))
    exported_s = time.perf_counter() - started
    assert summary.events == 10_001  # the key's segment and every event
    started = time.perf_counter()
    verdict = verify_export(read_export(out.getvalue().splitlines()), ring)
    verified_s = time.perf_counter() - started
    assert verdict.ok and verdict.checked == 10_001
    assert exported_s < 5 and verified_s < 5, (exported_s, verified_s)


def test_cli_export_then_offline_verify(sqlite_engine: Engine, tmp_path: Path) -> None:
    keyfile = tmp_path / "events.keys"
    keyfile.write_text(generate() + "\n")
    keyfile.chmod(0o600)
    log = EventLog(sqlite_engine, keys=Keyring.load(str(keyfile)))
    for i in range(6):
        log.append("command", ("acme", "globex")[i % 2], {"i": i}, ts=T0 + timedelta(hours=i))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DBOPS_", "SLACK_"))}
    env = {
        **base,
        "DATABASE_URL": str(sqlite_engine.url),
        "DBOPS_EVENTS_KEY": str(keyfile),
        "DBOPS_CHECKPOINTS": str(tmp_path / "checkpoints.jsonl"),
    }
    run = [sys.executable, "-m", "bot", "events"]
    made = subprocess.run(
        [*run, "export", "--from", "2026-11-02T09:30:00Z", "--to", "2026-11-02T13:30:00Z",
         "--customer", "acme"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    path = tmp_path / "acme.jsonl"
    path.write_text(made.stdout)
    header = json.loads(made.stdout.splitlines()[0])
    assert header["customer"] == "acme" and header["first_id"] == 3  # 10:00, after the key's
    offline = {**base, "DBOPS_EVENTS_KEY": str(keyfile)}  # no database on the auditor's side
    ok = subprocess.run(
        [*run, "verify", "--file", str(path)], env=offline, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stderr
    # The auditor's side: only the public key, as the export's header lists it.
    public = tmp_path / "auditor.keys"
    public.write_text("".join(k["public_key"] + "\n" for k in header["public_keys"]))
    audited = subprocess.run(
        [*run, "verify", "--file", str(path)],
        env={**base, "DBOPS_EVENTS_KEY": str(public)},
        capture_output=True,
        text=True,
    )
    assert audited.returncode == 0 and "public keys only" in audited.stdout, audited.stderr
    path.write_text(made.stdout.replace('"i":2', '"i":20'))
    bad = subprocess.run(
        [*run, "verify", "--file", str(path)], env=offline, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "event 4" in bad.stderr, bad.stderr
