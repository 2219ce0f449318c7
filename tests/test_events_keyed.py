"""The keyed chain against an attacker with full write access to the database, not to the key.

Every attack is done in raw SQL (tests/tamper.py lifts the database's own guard first), and the
attacker recomputes every sha256 it can: what it cannot make is a seal. Each attack: verify
fails and names the first bad event; the intact log passes.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from storage.chain import GENESIS, SEGMENT_KIND, body_digest, row_body, sha_keyed, sha_unkeyed
from storage.db import make_engine
from storage.eventkeys import EventKey, Keyring, generate
from storage.events import EventLog, EventLogKeyError
from storage.migrate import upgrade
from tests.tamper import tamper

N = 8  # events 1 (the key's segment) .. 8


@pytest.fixture
def key_a() -> str:
    return generate()


@pytest.fixture
def ring(key_a: str) -> Keyring:
    return Keyring.parse(key_a)


@pytest.fixture
def keyed(engine: Engine, ring: Keyring) -> EventLog:
    log = EventLog(engine, keys=ring)
    for i in range(N - 1):
        log.append("command", "acme", {"i": i, "text": f"/db status acme #{i}"}, actor="U_ALICE")
    return log


def rows(engine: Engine) -> list[dict[str, Any]]:
    """The raw rows, payload as JSON text (what an INSERT takes back on either engine)."""
    with engine.connect() as conn:
        result = conn.execute(text("SELECT * FROM events ORDER BY id"))
        out = [dict(r._mapping) for r in result]
    for r in out:
        if not isinstance(r["payload"], str):
            r["payload"] = json.dumps(r["payload"])
    return out


def rechain(engine: Engine, start: int) -> None:
    """What an attacker without the key can do: recompute every hash from ``start`` on (ids,
    links, digests), leaving the seals as they were (it cannot make new ones)."""
    log = EventLog(engine)
    prev = GENESIS if start == 1 else log.query(after_id=start - 2, limit=1)[0].hash
    statements: list[str | tuple[str, dict[str, Any]]] = []
    for ev in log.query(after_id=start - 1, limit=10_000):
        digest = sha_keyed(prev, body_digest(row_body(ev)))
        statements.append(
            (
                "UPDATE events SET prev_hash = :p, hash = :h WHERE id = :id",
                {"p": prev, "h": digest, "id": ev.id},
            )
        )
        prev = digest
    tamper(engine, *statements)


def test_intact_keyed_log_verifies_every_seal(keyed: EventLog, ring: Keyring) -> None:
    verdict = keyed.verify()
    assert verdict.ok, verdict
    assert verdict.checked == N and verdict.sealed == N
    first = keyed.query(limit=1)[0]
    assert first.kind == SEGMENT_KIND and first.payload["key_id"] == ring.keys[0].id
    assert "unkeyed" not in str(verdict)


def test_edited_row_is_caught_even_with_every_hash_recomputed(
    keyed: EventLog, engine: Engine
) -> None:
    tamper(engine, ("UPDATE events SET subject = 'globex' WHERE id = 4", {}))
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 4 and "edited" in (verdict.reason or "")
    rechain(engine, 4)  # now every hash fits the edited row: only the seal is left
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 4
    assert "seal" in (verdict.reason or "")


def test_inserted_row_is_caught(keyed: EventLog, engine: Engine) -> None:
    # Make room after event 3, insert a forged event 4 that links to 3, re-link the rest.
    shift = [(f"UPDATE events SET id = id + 1 WHERE id = {i}", {}) for i in range(N, 3, -1)]
    third = rows(engine)[2]
    forged = {
        **third,
        "id": 4,
        "kind": "restore.done",
        "payload": '{"customer":"acme"}',
        "source_id": None,
        "prev_hash": third["hash"],
        "mac": "0" * 64,
    }
    cols = ", ".join(forged)
    marks = ", ".join(f":{c}" for c in forged)
    tamper(engine, *shift, (f"INSERT INTO events ({cols}) VALUES ({marks})", forged))
    rechain(engine, 4)
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 4 and "seal" in (verdict.reason or "")


def test_row_appended_without_the_key_is_caught(keyed: EventLog, engine: Engine) -> None:
    last = rows(engine)[-1]
    forged = {**last, "id": N + 1, "prev_hash": last["hash"], "key_id": None, "mac": None}
    ev = EventLog(engine).query(after_id=N - 1, limit=1)[0]
    body = row_body({**ev.__dict__, "id": N + 1})
    forged["hash"] = sha_unkeyed(last["hash"], body)
    cols = ", ".join(forged)
    tamper(
        engine,
        (f"INSERT INTO events ({cols}) VALUES ({', '.join(':' + c for c in forged)})", forged),
    )
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == N + 1
    assert "no seal" in (verdict.reason or "")


def test_deleted_row_is_caught(keyed: EventLog, engine: Engine) -> None:
    tamper(engine, ("DELETE FROM events WHERE id = 3", {}))
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 4 and "3 missing" in (verdict.reason or "")
    # Close the gap and recompute the chain: the seals give it away.
    tamper(
        engine, *[(f"UPDATE events SET id = {i - 1} WHERE id = {i}", {}) for i in range(4, N + 1)]
    )
    rechain(engine, 3)
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 3 and "seal" in (verdict.reason or "")


def test_swapped_rows_are_caught(keyed: EventLog, engine: Engine) -> None:
    tamper(
        engine,
        ("UPDATE events SET id = 1000 WHERE id = 5", {}),
        ("UPDATE events SET id = 5 WHERE id = 6", {}),
        ("UPDATE events SET id = 6 WHERE id = 1000", {}),
    )
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 5
    rechain(engine, 5)
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 5 and "seal" in (verdict.reason or "")


@pytest.fixture
def other_engine(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A second database of the same kind, where dbops itself writes a log under another key."""
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'other.db'}"
    else:
        url = request.getfixturevalue("pg_databases").create()
    eng = make_engine(url)
    upgrade(eng)
    yield eng
    eng.dispose()


def test_table_replaced_by_a_log_dbops_wrote_under_another_key(
    keyed: EventLog, engine: Engine, other_engine: Engine
) -> None:
    theirs = EventLog(other_engine, keys=Keyring.parse(generate()))
    for i in range(N + 2):
        theirs.append("command", "acme", {"i": i}, actor="U_MALLORY")
    assert theirs.verify().ok  # self-consistent: it verifies under its own key
    replacement = rows(other_engine)
    cols = ", ".join(replacement[0])
    insert = f"INSERT INTO events ({cols}) VALUES ({', '.join(':' + c for c in replacement[0])})"
    tamper(engine, ("DELETE FROM events", {}), *[(insert, r) for r in replacement])
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 1
    assert "not one of DBOPS_EVENTS_KEY's" in (verdict.reason or "")


def test_table_replaced_by_an_unkeyed_log_is_caught(keyed: EventLog, engine: Engine) -> None:
    tamper(engine, ("DELETE FROM events", {}))
    plain = EventLog(engine)
    for i in range(3):
        plain.append("command", "acme", {"i": i})
    verdict = keyed.verify()
    assert not verdict.ok and verdict.bad_id == 1 and "no event is sealed" in (verdict.reason or "")


def test_key_rotation_starts_a_segment_and_both_verify(
    keyed: EventLog, engine: Engine, key_a: str
) -> None:
    key_b = generate()
    both = Keyring.parse(f"{key_a}\n# rotated 2026-12\n{key_b}\n")
    rotated = EventLog(engine, keys=both)
    for i in range(3):
        rotated.append("command", "acme", {"after_rotation": i})
    segment = rotated.query(after_id=N, limit=1)[0]
    assert segment.kind == SEGMENT_KIND
    assert segment.payload == {
        "key_id": both.keys[1].id,
        "public_key": both.keys[1].public_text,
        "after": both.keys[0].id,
    }
    verdict = rotated.verify()
    assert verdict.ok, verdict
    assert verdict.checked == N + 4 and verdict.sealed == N + 4
    # The new key alone cannot vouch for the old segment.
    only_b = EventLog(engine, keys=Keyring.parse(key_b)).verify()
    assert not only_b.ok and only_b.bad_id == 1
    # A process still on the old key alone refuses to write after the new segment.
    with pytest.raises(EventLogKeyError, match="does not hold"):
        keyed.append("command", "acme", {"late": True})
    # Nor can the retired key be used to forge events after the new segment.
    rows_now = rows(engine)
    last = rows_now[-1]
    old = EventKey.from_secret(_secret(key_a))
    ev = EventLog(engine).query(after_id=N + 3, limit=1)[0]
    body = row_body({**ev.__dict__, "id": last["id"] + 1})
    digest = sha_keyed(last["hash"], body_digest(body))
    forged = {**last, "id": last["id"] + 1, "prev_hash": last["hash"], "hash": digest}
    forged.update(key_id=old.id, mac=old.seal(digest))
    cols = ", ".join(forged)
    tamper(
        engine,
        (f"INSERT INTO events ({cols}) VALUES ({', '.join(':' + c for c in forged)})", forged),
    )
    verdict = rotated.verify()
    assert not verdict.ok and verdict.bad_id == last["id"] + 1
    assert "retired" in (verdict.reason or "")


def _secret(key: str) -> bytes:
    token = key.removeprefix("evk_")
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def test_without_a_key_verify_proves_order_only(engine: Engine, keyed: EventLog) -> None:
    keyless = EventLog(engine)
    verdict = keyless.verify()
    assert verdict.ok and verdict.sealed == 0
    assert "not set" in str(verdict) and "order only" in str(verdict)
    with pytest.raises(EventLogKeyError, match="no DBOPS_EVENTS_KEY"):
        keyless.append("command", "acme", {})


def test_unkeyed_log_says_so(events: EventLog) -> None:
    events.append("command", "acme", {"i": 1})
    verdict = events.verify()
    assert verdict.ok
    assert "unkeyed" in str(verdict) and "order only" in str(verdict)


def test_unkeyed_history_then_a_key(events: EventLog, engine: Engine, ring: Keyring) -> None:
    for i in range(3):
        events.append("command", "acme", {"before_key": i})
    keyed = EventLog(engine, keys=ring)
    keyed.append("command", "acme", {"after_key": True})
    verdict = keyed.verify()
    assert verdict.ok and verdict.checked == 5 and verdict.sealed == 2
    # The unkeyed prefix is covered by the seals after it: editing it breaks the chain there.
    tamper(engine, ("UPDATE events SET subject = 'globex' WHERE id = 2", {}))
    assert keyed.verify().bad_id == 2


def test_cli_verify_names_the_event_and_says_unkeyed(sqlite_engine: Engine, tmp_path: Path) -> None:
    key = generate()
    keyfile = tmp_path / "events.keys"
    keyfile.write_text(f"{key}\n")
    keyfile.chmod(0o600)
    EventLog(sqlite_engine, keys=Keyring.load(str(keyfile))).append("command", "acme", {"i": 1})
    base = {k: v for k, v in os.environ.items() if not k.startswith("DBOPS_")}
    env = {**base, "DATABASE_URL": str(sqlite_engine.url), "DBOPS_EVENTS_KEY": str(keyfile)}
    cmd = [sys.executable, "-m", "bot", "events", "verify"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2 seals checked" in ok.stdout
    keyless = subprocess.run(
        cmd, env={**env, "DBOPS_EVENTS_KEY": ""}, capture_output=True, text=True
    )
    assert keyless.returncode == 0 and "order only" in keyless.stdout
    tamper(sqlite_engine, ("UPDATE events SET actor = 'U_MALLORY' WHERE id = 2", {}))
    rechain(sqlite_engine, 2)
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "event 2" in bad.stderr and "seal" in bad.stderr
    assert key not in bad.stderr + bad.stdout


def test_a_key_typed_into_a_command_is_never_stored(keyed: EventLog, key_a: str) -> None:
    ev = keyed.append("command", "acme", {"text": f"/db oops {key_a}"}, actor="U_ALICE")
    assert key_a not in str(ev.payload) and ev.payload["text"] == "/db oops evk_***"


def test_the_seal_is_plain_hmac_sha256_of_the_hash(keyed: EventLog, ring: Keyring) -> None:
    key = ring.keys[0]
    assert key.mac_key is not None
    for ev in keyed.tail(3):
        assert ev.mac == hmac.digest(key.mac_key, ev.hash.encode(), "sha256").hex()
