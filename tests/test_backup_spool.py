"""A backup's events that the event log refused outlive the process that took it.

Backups keeps what the log cannot take in the log's spool (storage.spool), a file in
production: a process that dies during an outage leaves them there, and the next one (a new
engine, a new ``Spool`` on the same file, a new ``Backups``) stores them once the log is back,
each exactly once and with the time it happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from core.backups import Backups
from core.customers import Customer, upsert_customers
from core.fleet import Fleet
from storage.db import make_engine
from storage.events import EventLog, breaker_for
from storage.spool import Spool, use_spool
from tests.event_outage import DEADLINE_S, EventOutage
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    Seeded,
    restore_server_logs,
    seeded_customer,
)
from tests.test_health_checks import fleet_for

pytestmark = pytest.mark.postgres

CAROL = "U0CAROL"  # the admin who takes the backup


@pytest.fixture
def customer(sandbox: dict[str, Any], sqlite_engine: Engine) -> Iterator[Seeded]:
    with seeded_customer(sandbox, "vps2", prefix="spl") as seeded:
        upsert_customers(
            sqlite_engine, [Customer(seeded.name, "vps2", seeded.name, seeded.name, "small")]
        )
        yield seeded


def test_a_backups_events_kept_in_an_outage_survive_a_restart_and_are_stored_once(
    event_outage: EventOutage,
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    customer: Seeded,
    tmp_path: Path,
) -> None:
    # The commands run on this machine: what is cut here is the event log, not SSH.
    fleet = fleet_for(sandbox_fleet, "local")
    path = tmp_path / "state" / "events.spool"
    log = event_outage.events
    first = use_spool(event_outage.engine, Spool(path))
    # This process dies before anything flushes its spool: its recovery must not do it.
    breaker_for(event_outage.engine).on_recovery.remove(first.flush_soon)
    backups = Backups(sqlite_engine, log, fleet)
    cut = event_outage.arm(lambda kind, _subject: kind == "backup.taken", mode="refuse")

    taken = backups.take_backup(customer.name, CAROL)

    # The backup was taken, whatever the log did; its record, and what came after, are kept
    # on disk, not stored.
    assert cut.is_set() and taken.complete
    kept = first.pending()
    assert kept and kept[0].kind == "backup.taken" and kept[0].subject == customer.name
    assert kept[0].payload["backup"] == taken.stamp
    assert backups.flush_unrecorded() == [(e.kind, e.subject) for e in kept]  # still down
    assert not [e for e in event_outage.stored() if e.kind == "backup.taken"]
    # The log comes back as the process dies, mid-flush: the flush stored the first event
    # and died before forgetting it.
    event_outage.heal()
    event_outage.wait_for_log(log)
    log.append_many(kept[:1])
    backups.runners.close()
    first.close()
    del backups, first

    # The next process: its own engine, spool object and Backups, on the same file.
    engine = make_engine(event_outage.engine.url.render_as_string(hide_password=False))
    try:
        spool = use_spool(engine, Spool(path))
        assert [e.source_id for e in spool.pending()] == [e.source_id for e in kept]
        again = Backups(sqlite_engine, EventLog(engine, deadline=DEADLINE_S), fleet)
        flushed_at = datetime.now(UTC)

        assert again.flush_unrecorded() == []

        assert len(spool) == 0 and spool.refused() == []
        stored = [e for e in event_outage.stored() if e.kind != "probe"]
        keys = [(e.source, e.source_id) for e in stored]
        assert len(keys) == len(set(keys)), "an event was stored twice"
        by_key = {(e.source, e.source_id): e for e in stored}
        for e in kept:  # each stored once, as kept, at the time it happened (not the flush's)
            found = by_key[(e.source, e.source_id)]
            assert (found.kind, found.subject, found.actor) == (e.kind, e.subject, e.actor)
            assert found.ts < flushed_at
        (record,) = [e for e in stored if e.kind == "backup.taken"]
        assert record.subject == customer.name and record.actor == CAROL
        assert record.payload["backup"] == taken.stamp
        assert event_outage.verdict().ok
    finally:
        engine.dispose()
