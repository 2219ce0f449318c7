"""The nightly backup run under faults, on the session sandbox over SSH: one customer's dump
failing, an SSH connection dropping, the event log down for a stretch in the middle, and a
backup path without the free space a dump needs.

The event-log outage is ``EventLog.append`` refusing every event (EventLogUnavailable, what the
log raises while its database restarts) for a second, starting partway into the run; the
runners record their commands through the same log, the way the scheduler's do, so the outage
also fails whatever command it catches.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

import core.backups as backups_mod
import core.backups.dump
import core.backups.service
from core.backups import GLOBALS, HEADROOM_MAX_BYTES, Backups, SpaceCheck
from core.customers import Customer, customer_from_mapping, upsert_customers
from core.errors import Unreachable
from core.fleet import Fleet, Server
from core.remote import Runner, RunnerPool
from storage.events import EventLog, EventLogUnavailable
from storage.models_billing import OpLock
from tests.blackhole import Mode
from tests.event_outage import EventOutage
from tests.test_backups import restore_server_logs  # noqa: F401  (autouse: server logs kept)

MiB = 1 << 20
GHOST = "ghost_co"  # a customer whose database is gone: its dump fails every time


class Outage:
    """EventLog.append refuses every event for ``seconds``, from its ``after``-th call on."""

    def __init__(self, after: int, seconds: float) -> None:
        self.after, self.seconds = after, seconds
        self.calls = self.refused = 0
        self.until: float | None = None
        self._lock = threading.Lock()

    def down(self) -> bool:
        with self._lock:
            self.calls += 1
            if self.until is None and self.calls > self.after:
                self.until = time.monotonic() + self.seconds
            down = self.until is not None and time.monotonic() < self.until
            self.refused += down
            return down

    def wait_until_healed(self, _retry_after_s: float) -> None:
        """The run's wait before its retry: exactly until the log is back, no longer."""
        if self.until is not None:
            time.sleep(max(0.0, self.until - time.monotonic()))


@pytest.fixture
def pool(sandbox_fleet: Fleet, sqlite_engine: Engine) -> Iterator[RunnerPool]:
    """Runners that record every command in the event log, as the scheduler's do: when the
    log is down, a command that ran is reported failed."""
    events = EventLog(sqlite_engine)

    def record(kind: str, subject: str, payload: dict[str, Any]) -> None:
        events.append(kind, subject, payload, actor="dbops")

    with RunnerPool(sandbox_fleet, record=record) as runners:
        yield runners


@pytest.fixture
def backups(sandbox_fleet: Fleet, sqlite_engine: Engine, pool: RunnerPool) -> Backups:
    return Backups(sqlite_engine, EventLog(sqlite_engine), sandbox_fleet, pool)


def test_nightly_run_goes_on_past_a_failed_dump_a_dropped_ssh_and_an_event_log_outage(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    backups: Backups,
    monkeypatch: pytest.MonkeyPatch,
    sandbox_backups_kept: None,
) -> None:
    customers = [customer_from_mapping(c) for c in sandbox["customers"]]
    upsert_customers(
        sqlite_engine, [*customers, Customer(GHOST, "vps2", f"{GHOST}_gone", GHOST, "small")]
    )
    # The SSH connection of one customer's first dump drops.
    dropped = customers[1]
    real_write_backup = backups_mod.write_backup
    tries: dict[str, int] = {}

    def write_backup(runner: Runner, server: Server, customer: str, *a: Any, **kw: Any) -> Any:
        tries[customer] = tries.get(customer, 0) + 1
        if customer == dropped.name and tries[customer] == 1:
            raise Unreachable(f"the SSH connection to {server.name} was closed.")
        return real_write_backup(runner, server, customer, *a, **kw)

    monkeypatch.setattr(core.backups.service, "write_backup", write_backup)  # where it is called
    # The event log goes down for a second, a dozen events into the run.
    outage = Outage(after=12, seconds=1.0)
    real_append = EventLog.append

    def append(log: EventLog, *args: Any, **kwargs: Any) -> Any:
        if outage.down():
            raise EventLogUnavailable("the event database is restarting")
        return real_append(log, *args, **kwargs)

    monkeypatch.setattr(EventLog, "append", append)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        outage.wait_until_healed(seconds)

    backups.sleep = sleep

    run = backups.backup_all(parallel=True, actor="scheduler")

    assert outage.refused > 0 and waits == [backups.retry_after_s]
    by_name = {o.customer: o for o in run.outcomes}
    # Everyone else backed up; the ghost's failure recorded, as crit, and not the run's end.
    assert [o.customer for o in run.failed] == [GHOST]
    ghost = by_name[GHOST]
    assert ghost.verdict == "crit" and ghost.error and "does not exist" in ghost.error
    assert all(by_name[c.name].ok for c in customers) and run.ok == len(customers)
    assert all(g.ok for g in run.globals) and len(run.globals) == 3
    # Infrastructure failures (the dropped SSH, commands whose record the outage refused) were
    # retried once, after the first pass; nothing else was.
    assert by_name[dropped.name].attempts == 2 and tries[dropped.name] == 2
    assert all(o.attempts <= 2 for o in [*run.outcomes, *run.globals])
    for o in run.outcomes:
        assert tries[o.customer] == o.attempts
    # Every customer's new backup is complete on its server.
    for c in customers:
        found = [b for b in backups.list_backups(c.name) if b.stamp == by_name[c.name].backup]
        assert found and found[0].complete
    # Everything was recorded once the log was back: nothing kept, nothing twice.
    monkeypatch.setattr(EventLog, "append", real_append)
    assert run.unrecorded == [] and backups.flush_unrecorded() == []
    events = backups.events
    taken = events.query(kind="backup.taken", limit=100)
    assert sorted(e.subject or "" for e in taken) == sorted(c.name for c in customers)
    assert {e.subject: e.payload["backup"] for e in taken} == {
        c.name: by_name[c.name].backup for c in customers
    }
    failed = events.query(kind="backup.failed", limit=100)
    first_tries = {e.subject for e in failed if e.payload["attempt"] == 1}
    retried = {o.customer for o in run.outcomes if o.attempts == 2}
    assert dropped.name in retried and retried <= first_tries
    # A retried customer's first try failed for the infrastructure. (The ghost's first try may
    # be one the outage caught; its retry then fails for its own reason, recorded as such.)
    first_failed = [e for e in failed if e.subject in retried and e.payload["attempt"] == 1]
    assert {e.subject for e in first_failed} == retried
    assert all(e.payload["infrastructure"] for e in first_failed)
    assert sorted(e.payload["attempt"] for e in failed if e.subject == GHOST) == list(
        range(1, ghost.attempts + 1)
    )
    assert any(e.subject == GHOST and not e.payload["infrastructure"] for e in failed)
    (summary,) = events.query(kind="backup.run", limit=5)
    assert summary.payload["failed"] == [GHOST]
    assert sorted(summary.payload["retried"]) == sorted(o.customer for o in run.retried)
    assert len(events.query(kind="backup.globals", limit=10)) == 3
    assert not [o for o in run.globals if o.customer != GLOBALS]


OUTAGE_S = 30.0
CUT_AT_EVENT = 12  # the log goes down just before the 12th event of the run goes out


def _complete_stamps(sandbox: dict[str, Any], customer: Customer) -> set[str]:
    root = Path(next(s["backup_path"] for s in sandbox["servers"] if s["name"] == customer.server))
    return {
        p.parent.name
        for p in (root / customer.name).glob("*/status")
        if json.loads(p.read_text()).get("ok") is True
    }


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_nightly_run_goes_on_through_a_real_30_s_outage_of_the_event_log_database(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    event_outage: EventOutage,
    sandbox_backups_kept: None,
    mode: Mode,
) -> None:
    """The same run against the real thing: dbops' database (its state and its event log, one
    PostgreSQL database as in production) stops answering for 30 s a dozen events into the run,
    while one customer's dump fails. ``refuse``: connections refused and reset, as a restart
    does; ``blackhole``: a dropped route, where every call waits for its deadline.

    Time is moved, not waited: the run's wait before its retry pass (``Backups.sleep``) is
    where the 30 s run out, so that is where the database comes back. What is really waited for
    is the event log's breaker (storage.events.Breaker) closing after the database is back: it
    keeps time with time.monotonic and takes no clock, so that is up to BREAKER_LONGEST_S."""
    engine = event_outage.engine  # through the proxy: the only way this test reaches it
    customers = [customer_from_mapping(c) for c in sandbox["customers"]]
    ghost = Customer(GHOST, "vps2", f"{GHOST}_gone", GHOST, "small")
    upsert_customers(engine, [*customers, ghost])
    before = {c.name: _complete_stamps(sandbox, c) for c in customers}
    # Its own runners, recording every command through the same log, as the scheduler's do.
    backups = Backups(engine, event_outage.events, sandbox_fleet)
    backups.lock_deadline_s = event_outage.deadline  # the short deadline its log has here
    seen: list[str] = []
    cut_at: list[float] = []

    def nth_event(kind: str, subject: str | None) -> bool:
        seen.append(kind)
        if len(seen) == CUT_AT_EVENT:
            cut_at.append(time.monotonic())
            return True
        return False

    cut = event_outage.arm(nth_event, mode=mode, seconds=OUTAGE_S)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        """The wait before the retry pass, moved rather than slept: once the log has been down
        for OUTAGE_S by the end of it, the database is back (the proxy heals)."""
        waits.append(seconds)
        assert cut.is_set(), "the outage was meant to begin during the first pass"
        assert time.monotonic() - cut_at[0] + seconds >= OUTAGE_S
        event_outage.heal()
        breaker = event_outage.events.breaker
        deadline = time.monotonic() + 10
        while breaker.refusing() is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    backups.sleep = sleep
    started = time.monotonic()

    run = backups.backup_all(parallel=True, actor="scheduler")

    took = time.monotonic() - started
    print(f"\nnightly run through a {OUTAGE_S:g} s {mode} of dbops' database: {took:.1f} s")
    assert cut.is_set() and waits == [backups.retry_after_s]
    by_name = {o.customer: o for o in run.outcomes}
    # Every customer backed up but the ghost; its failure recorded as crit, for its own reason
    # (a first try the outage caught is retried, and fails the same way as ever).
    assert [o.customer for o in run.failed] == [GHOST]
    ghost_out = by_name[GHOST]
    assert ghost_out.verdict == "crit" and not ghost_out.infrastructure
    assert ghost_out.error is not None and "does not exist" in ghost_out.error
    assert all(by_name[c.name].ok for c in customers) and all(g.ok for g in run.globals)
    # The outage failed someone's first try (a lock on dbops' database); those, and only
    # those, were tried once more, after the first pass.
    retried = {o.customer for o in [*run.outcomes, *run.globals] if o.attempts == 2}
    assert retried and all(o.attempts <= 2 for o in [*run.outcomes, *run.globals])
    # Each customer has exactly one new complete backup on its server: the one reported (a
    # dump that was taken and reported failed would be a second).
    for c in customers:
        assert _complete_stamps(sandbox, c) - before[c.name] == {by_name[c.name].backup}
    # Everything recorded once the log was back, exactly once.
    assert run.unrecorded == [] and backups.flush_unrecorded() == []
    stored = [e for e in event_outage.stored() if e.kind.startswith("backup.")]
    taken = [e for e in stored if e.kind == "backup.taken"]
    assert sorted(e.subject or "" for e in taken) == sorted(c.name for c in customers)
    assert {e.subject: e.payload["backup"] for e in taken} == {
        c.name: by_name[c.name].backup for c in customers
    }
    failed = [e for e in stored if e.kind in ("backup.failed", "backup.globals_failed")]
    attempts = [(e.kind, e.subject, e.payload["attempt"]) for e in failed]
    assert len(attempts) == len(set(attempts))  # each failed try once
    first_tries = {e.subject for e in failed if e.payload["infrastructure"]}
    globals_retried = {o.server for o in run.globals if o.attempts == 2}
    assert first_tries == (retried - {GLOBALS}) | globals_retried
    ghost_tries = sorted(
        (e.payload["attempt"], e.payload["infrastructure"]) for e in failed if e.subject == GHOST
    )
    assert ghost_tries == ([(1, False)] if ghost_out.attempts == 1 else [(1, True), (2, False)])
    assert len([e for e in stored if e.kind == "backup.globals"]) == 3
    (summary,) = [e for e in stored if e.kind == "backup.run"]
    assert summary.payload["failed"] == [GHOST] and summary.payload["unrecorded"] == 0
    assert event_outage.verdict().ok
    # No backup lock outlived the run (one left would refuse `/db backup` for its lease, 3 h).
    with Session(event_outage.direct) as session:
        assert session.exec(select(OpLock.name)).all() == []


def test_a_dump_without_the_free_space_it_needs_is_refused_as_crit_and_writes_nothing(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    backups: Backups,
    monkeypatch: pytest.MonkeyPatch,
    sandbox_backups_kept: None,
) -> None:
    acme = customer_from_mapping(sandbox["customers"][0])
    upsert_customers(sqlite_engine, [acme])
    root = Path(next(s["backup_path"] for s in sandbox["servers"] if s["name"] == acme.server))
    before = sorted(p.name for p in (root / acme.name).iterdir())
    # The backup path's filesystem: 100 MiB, 1 MiB of it free (what df would say).
    seen: list[str] = []

    def read_free_space(runner: Runner, server: Server, path: str) -> tuple[int, int]:
        seen.append(path)
        return 100 * MiB, 1 * MiB

    monkeypatch.setattr(core.backups.dump, "read_free_space", read_free_space)  # check_space's
    backups.sleep = lambda s: pytest.fail("a full disk is not retried")

    run = backups.backup_all(parallel=False, actor="scheduler")

    (refused,) = run.failed
    assert refused.customer == acme.name and refused.verdict == "crit"
    assert not refused.infrastructure and refused.attempts == 1
    assert refused.error is not None and refused.error.startswith(
        f"not enough free space on {acme.server}:{root}: need ~"
    )
    assert refused.error.endswith("have 1.0 MiB.")
    assert refused.space is not None
    assert refused.space["free_bytes"] == MiB and refused.space["ok"] is False
    assert refused.space["need_bytes"] == refused.space["database_bytes"] + 10 * MiB
    assert seen[0] == str(root)
    # No directory, no partial dump: the backups are as they were.
    assert sorted(p.name for p in (root / acme.name).iterdir()) == before
    (event,) = backups.events.query(kind="backup.failed", limit=5)
    assert event.subject == acme.name and event.payload["space"] == refused.space


def test_free_space_needed_is_the_database_size_plus_the_smaller_headroom() -> None:
    small = SpaceCheck("vps1", "/backups", 50 * MiB, total_bytes=1000 * MiB, free_bytes=0)
    assert small.need_bytes == 50 * MiB + 100 * MiB  # 10% of the filesystem
    big = SpaceCheck("vps1", "/backups", 50 * MiB, total_bytes=2 << 40, free_bytes=2 << 40)
    assert big.need_bytes == 50 * MiB + HEADROOM_MAX_BYTES and big.ok  # capped at 1 GiB
