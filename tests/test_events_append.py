"""Appending to the event log: chain, idempotency, redaction, queries."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from storage.events import GENESIS, REDACTED, EventLog, NewEvent, canonical, iso, row_hash


def test_first_event_links_to_genesis_and_each_next_to_the_one_before(events: EventLog) -> None:
    a = events.append("command", "acme", {"text": "/db status acme"}, actor="U_ALICE")
    b = events.append("command", "acme", {"text": "/db report"}, actor="U_ALICE")
    assert (a.id, b.id) == (1, 2)
    assert a.prev_hash == GENESIS
    assert b.prev_hash == a.hash
    assert b.hash == row_hash(a.hash, b.__dict__)
    assert events.verify().ok


def test_same_source_id_is_stored_once_and_returns_the_first(events: EventLog) -> None:
    first = events.append("stripe.event", "cus_1", {"n": 1}, source="stripe", source_id="evt_1")
    again = events.append("stripe.event", "cus_1", {"n": 2}, source="stripe", source_id="evt_1")
    assert again == first
    assert again.payload == {"n": 1}
    assert events.count() == 1
    # The same id from another source is a different event.
    other = events.append("alert", "acme", {}, source="alertmanager", source_id="evt_1")
    assert other.id == 2


def test_batch_dedupes_against_the_log_and_within_itself(events: EventLog) -> None:
    events.append("x", source="slack", source_id="r1")
    out = events.append_many(
        [
            NewEvent("x", source="slack", source_id="r1"),
            NewEvent("x", source="slack", source_id="r2"),
            NewEvent("x", source="slack", source_id="r2"),
            NewEvent("x"),
        ]
    )
    assert [e.id for e in out] == [1, 2, 2, 3]
    assert events.count() == 3
    assert events.verify().ok


def test_secrets_are_redacted_before_they_are_stored(events: EventLog) -> None:
    ev = events.append(
        "provision",
        "acme",
        {
            "password": "hunter2",
            "nested": {"api_token": "xoxb-123", "Authorization": "Bearer abc"},
            "dsn": "host=db password=s3cret",
            "url": "postgresql://acme:s3cret@db/acme",
            "note": "connect with password=s3cret now",
            "slack": "token xoxb-1234-abcd was used",
        },
    )
    stored = events.query(subject="acme")[0]
    assert stored.payload == ev.payload
    text = repr(stored.payload)
    assert "hunter2" not in text and "s3cret" not in text and "1234-abcd" not in text
    assert stored.payload["password"] == REDACTED
    assert stored.payload["nested"]["api_token"] == REDACTED
    assert stored.payload["url"] == "postgresql://acme:***@db/acme"
    assert events.verify().ok


def test_floats_and_datetimes_are_stored_in_canonical_form(events: EventLog) -> None:
    when = datetime(2026, 3, 8, 7, 0, tzinfo=UTC)
    ev = events.append("m", payload={"ratio": 0.25, "whole": 3.0, "at": when})
    assert ev.payload == {"ratio": "0.25", "whole": 3, "at": "2026-03-08T07:00:00.000000Z"}
    assert events.query()[0].payload == ev.payload
    assert events.verify().ok


def test_queries_by_subject_kind_time_and_pages(events: EventLog) -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    for i in range(10):
        events.append(
            "alert" if i % 2 else "command",
            "acme" if i < 5 else "globex",
            {"i": i},
            ts=t0 + timedelta(hours=i),
        )
    assert [e.payload["i"] for e in events.query(subject="acme")] == [0, 1, 2, 3, 4]
    assert [e.payload["i"] for e in events.query(kind="alert", subject="globex")] == [5, 7, 9]
    window = events.query(since=t0 + timedelta(hours=2), until=t0 + timedelta(hours=4))
    assert [e.payload["i"] for e in window] == [2, 3]
    page1 = events.query(limit=4)
    page2 = events.query(after_id=page1[-1].id, limit=4)
    page3 = events.query(after_id=page2[-1].id, limit=4)
    assert [e.id for e in page1 + page2 + page3] == list(range(1, 11))
    assert [e.id for e in events.tail(3)] == [8, 9, 10]
    assert events.query(kind_prefix="al", limit=2)[0].kind == "alert"


def test_hash_is_sha256_of_prev_hash_and_canonical_json_of_the_row(events: EventLog) -> None:
    ev = events.append(
        "alert",
        "acme",
        {"b": [1, "ü"], "a": {"z": None}},
        actor="U_BOB",
        source="alertmanager",
        source_id="fp-1",
    )
    body = {
        "id": ev.id,
        "ts": iso(ev.ts),
        "kind": ev.kind,
        "actor": ev.actor,
        "subject": ev.subject,
        "payload": ev.payload,
        "source": ev.source,
        "source_id": ev.source_id,
    }
    text = canonical(body)
    assert text.startswith('{"actor":"U_BOB","id":1,"kind":"alert","payload":{"a":{"z":null}')
    assert ev.hash == hashlib.sha256((GENESIS + text).encode()).hexdigest()
