"""The event writer when its database goes away: every append is over by its deadline, a batch
fails whole (never event by event), appends fail at once while the database is known to be down,
and the log comes back by itself, its chain whole, nothing written twice, nothing half-written.

Real PostgreSQL behind a proxy that black-holes or refuses (tests/event_outage.py), and real
SQLite with its write lock held by another connection. The production deadline is 5 s (four
queued events once took 50 s); these logs use 2 s unless a test says otherwise.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import storage.events
from storage.db import make_engine
from storage.events import APPEND_DEADLINE_S, BREAKER_LONGEST_S, EventLog, EventLogUnavailable
from storage.group_commit import GroupCommitLog
from storage.migrate import upgrade
from tests.event_outage import DEADLINE_S, EventOutage
from tests.pgserver import wait_until

pytestmark = pytest.mark.postgres

SLACK = 0.5  # what a deadline may overrun by on two busy shared cores
FAST = 0.1  # "at once"


def timed(fn: Callable[[], object]) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


def workers_in_the_driver() -> list[str]:
    """Deadline workers whose stack is inside psycopg or sqlite3: still blocked on the database."""
    names = {t.ident: t.name for t in threading.enumerate()}
    stuck = []
    for ident, frame in sys._current_frames().items():
        if names.get(ident) != "dbops-db-deadline":
            continue
        f = frame
        while f is not None:
            if "psycopg" in f.f_code.co_filename or "sqlalchemy" in f.f_code.co_filename:
                stuck.append(f"{names[ident]}: {f.f_code.co_name}")
                break
            f = f.f_back
    return stuck


def assert_chain(outage: EventOutage, source_ids: list[str]) -> None:
    """The stored events are exactly these, once each, in order, ids without gaps."""
    stored = [e for e in outage.stored() if e.kind != "probe"]
    assert [e.source_id for e in stored] == source_ids
    ids = [e.id for e in outage.stored()]
    assert ids == list(range(1, len(ids) + 1))
    verdict = outage.verdict()
    assert verdict.ok, str(verdict)


@pytest.mark.parametrize("where", ["pooled connection", "new connection", "mid-transaction"])
def test_an_append_into_a_black_hole_fails_within_its_deadline(
    event_outage: EventOutage, where: str
) -> None:
    log = event_outage.events
    log.append("command", "acme", source="t", source_id="before")
    if where == "new connection":
        event_outage.engine.dispose()  # nothing pooled: the connect itself goes into the hole
    if where == "mid-transaction":
        event_outage.arm(lambda kind, _subject: kind == "restore.step")
    else:
        event_outage.blackhole()

    took, error = timed(lambda: log.append("restore.step", "acme", source="t", source_id="lost"))

    assert isinstance(error, EventLogUnavailable), error
    assert DEADLINE_S - 0.05 <= took < DEADLINE_S + SLACK
    if where != "new connection":  # a connect is not abortable: it ends at connect_timeout
        assert wait_until(lambda: not workers_in_the_driver(), timeout=SLACK), (
            workers_in_the_driver()
        )
    event_outage.heal()
    event_outage.wait_for_log()
    log.append("command", "acme", source="t", source_id="after")
    assert_chain(event_outage, ["before", "after"])  # the lost one was never committed


def test_queued_events_fail_together_within_the_deadline_not_one_by_one(
    event_outage: EventOutage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The production deadline, and the production case: four Slack workers appending at once.
    log = event_outage.group_log(deadline=APPEND_DEADLINE_S)
    log.append("command", "acme")
    transactions: list[float] = []

    run = log._run

    def counted(*args: Any, **kwargs: Any) -> Any:
        transactions.append(time.monotonic())
        return run(*args, **kwargs)

    monkeypatch.setattr(log, "_run", counted)
    event_outage.blackhole()
    start = threading.Barrier(5)
    ended: dict[int, tuple[float, BaseException | None]] = {}

    def worker(i: int) -> None:
        start.wait()
        ended[i] = timed(lambda: log.append("command", "acme", {"i": i}))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(timeout=60)

    assert len(ended) == 4
    assert all(isinstance(err, EventLogUnavailable) for _, err in ended.values()), ended
    times = sorted(took for took, _ in ended.values())
    assert times[-1] < APPEND_DEADLINE_S + SLACK, times  # was 50 s
    assert times[-1] - times[0] < SLACK, times  # together
    # One transaction into the hole; events the writer had not taken yet fail with it (their
    # deadline has come, or the breaker is open), and none is retried on its own.
    assert len(transactions) == 1, transactions


@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
def test_appends_fail_at_once_while_the_database_is_known_down(
    event_outage: EventOutage, fault: str
) -> None:
    log, group = event_outage.events, event_outage.group_log()
    log.append("command", "acme")
    getattr(event_outage, fault)()
    took, error = timed(lambda: log.append("command", "acme"))
    assert isinstance(error, EventLogUnavailable)
    if fault == "refuse":
        assert took < FAST  # a refused connection is news at once

    slowest = 0.0
    for _ in range(20):
        for one in (log, group):
            took, error = timed(lambda one=one: one.append("command", "acme"))
            assert isinstance(error, EventLogUnavailable), error
            assert error.retry_after is not None and 0 < error.retry_after <= 1.0
            slowest = max(slowest, took)
    assert slowest < FAST
    future = group.submit("message.sent", "acme")
    assert future.done() and isinstance(future.exception(), EventLogUnavailable)


@pytest.mark.parametrize("kind", ["plain", "group commit"])
@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
def test_the_log_comes_back_by_itself(event_outage: EventOutage, kind: str, fault: str) -> None:
    log = event_outage.events if kind == "plain" else event_outage.group_log()
    written: list[str] = []

    def append(source_id: str) -> bool:
        try:
            log.append("command", "acme", source="t", source_id=source_id)
        except EventLogUnavailable:
            return False
        written.append(source_id)
        return True

    assert append("e0")
    getattr(event_outage, fault)(seconds=3.0)  # heals itself
    n, back_at = 1, None
    while back_at is None:
        assert n < 2000, "the log never came back"
        if append(f"e{n}") and n > 1:
            back_at = time.monotonic()
        n += 1
        time.sleep(0.02)
    healed_for = back_at - event_outage.proxy.changed_at
    # Back once the back-off running when the database returned is over (1 s, doubled by each
    # failed probe up to BREAKER_LONGEST_S), plus a probe's deadline if one was under way.
    assert healed_for < BREAKER_LONGEST_S + DEADLINE_S + SLACK, healed_for
    for i in range(5):
        assert append(f"after{i}")
    assert written[0] == "e0" and len(written) >= 6
    assert_chain(event_outage, written)


def test_a_backend_left_holding_the_writers_lock_lets_go(
    event_outage: EventOutage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route dies mid-append: the server's backend sits in the transaction holding the lock
    (a black hole resets nothing). Another process with a working route gets the lock once the
    backend's idle-in-transaction timeout ends it, not when TCP gives up hours later."""
    monkeypatch.setattr(storage.events, "PG_IDLE_IN_APPEND_MS", 2000)
    event_outage.events.append("command", "acme")
    event_outage.arm(lambda kind, _s: kind == "restore.step")  # a black hole, until the end
    with pytest.raises(EventLogUnavailable):
        event_outage.events.append("restore.step", "acme")
    other = EventLog(event_outage.direct, deadline=DEADLINE_S)
    took = event_outage.wait_for_log(other, timeout=20)
    assert took < 2.0 + DEADLINE_S + 1.0 + SLACK  # the idle timeout, then a back-off at most
    assert event_outage.proxy.mode == "blackhole"
    assert [e.kind for e in event_outage.stored()] == ["command", "probe"]
    assert event_outage.verdict().ok


def test_a_bad_event_still_fails_alone_on_postgres(event_outage: EventOutage) -> None:
    log = event_outage.group_log()
    futures = [
        log.submit("command", "acme", {"n": n}, source="t", source_id=f"g{n}") for n in range(2)
    ]
    bad = log.submit("command", "acme\x00", source="t", source_id="bad")  # PostgreSQL refuses NUL
    futures += [
        log.submit("command", "acme", {"n": n}, source="t", source_id=f"g{n}") for n in (2, 3)
    ]
    assert [f.result(10).payload["n"] for f in futures] == [0, 1, 2, 3]
    with pytest.raises(EventLogUnavailable, match="refused this event"):
        bad.result(10)
    assert not log.breaker.is_open  # the database answered: not an outage
    log.append("command", "acme", source="t", source_id="g4")
    assert_chain(event_outage, ["g0", "g1", "g2", "g3", "g4"])


@pytest.mark.parametrize("kind", ["plain", "group commit"])
def test_sqlite_waits_for_its_write_lock_no_longer_than_the_deadline(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "dbops.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    log: EventLog = (
        EventLog(engine, deadline=1.0) if kind == "plain" else GroupCommitLog(engine, deadline=1.0)
    )
    try:
        log.append("command", "acme", source="t", source_id="before")
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process writing, for longer than 30 s
        took, error = timed(lambda: log.append("command", "acme", source="t", source_id="lost"))
        assert isinstance(error, EventLogUnavailable), error
        assert 0.95 <= took < 1.0 + SLACK  # not SQLite's 30 s busy timeout
        holder.execute("ROLLBACK")
        holder.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                log.append("command", "acme", source="t", source_id="after")
                break
            except EventLogUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with engine.connect() as conn:  # other transactions keep the usual busy timeout
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        stored = list(EventLog(engine).iter_all())
        assert [e.source_id for e in stored] == ["before", "after"]
        assert EventLog(engine).verify().ok
    finally:
        if isinstance(log, GroupCommitLog):
            log.close()
        engine.dispose()


def test_an_in_memory_sqlite_log_stays_on_its_callers_thread() -> None:
    # SQLAlchemy gives each thread its own in-memory database: a worker thread would see none.
    engine = make_engine("sqlite://")
    upgrade(engine)
    log = EventLog(engine, deadline=1.0)
    assert [log.append("command", "acme").id for _ in range(3)] == [1, 2, 3]
    assert log.verify().ok
