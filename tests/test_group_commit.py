"""GroupCommitLog: appends from many threads share transactions and keep every promise of
EventLog.append (each caller gets its stored event back, a repeated (source, source_id) comes back
as the first, the chain verifies), and one bad event fails alone, with a clear error."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine

from bot.commands.errors import reply_for
from storage.events import EventLog
from storage.group_commit import EventLogUnavailable, GroupCommitLog


def test_many_threads_one_chain(engine: Engine) -> None:
    log = GroupCommitLog(engine)
    try:
        with ThreadPoolExecutor(16) as pool:
            stored = list(
                pool.map(
                    lambda i: log.append("command", f"c{i % 7}", {"i": i}, source_id=f"d{i % 150}"),
                    range(300),
                )
            )
    finally:
        log.close()
    # 150 deliveries, each sent twice: the second of each came back as the first.
    assert len({e.id for e in stored}) == 150
    for event in stored:
        assert event.source_id == f"d{event.payload['i'] % 150}"
    plain = EventLog(engine)
    assert plain.verify().ok and plain.verify().checked == 150
    assert sorted(e.id for e in plain.iter_all()) == list(range(1, 151))


def test_a_bad_event_fails_alone(engine: Engine) -> None:
    log = GroupCommitLog(engine)
    try:
        good = [log.submit("command", "acme", {"n": n}) for n in range(5)]
        bad = log.submit("x" * 65, "acme", {})  # a kind over 64 characters is refused
        more = log.submit("command", "acme", {"n": 5})
        assert [f.result(10).payload["n"] for f in [*good, more]] == [0, 1, 2, 3, 4, 5]
        with pytest.raises(EventLogUnavailable):
            bad.result(10)
    finally:
        log.close()
    assert EventLog(engine).verify().ok
    # What the user is told: nothing was done, and what to check; no stack trace.
    reply = reply_for(EventLogUnavailable("the event log could not be written"))
    assert "nothing was done" in reply.text and "DATABASE_URL" in str(reply.message())
