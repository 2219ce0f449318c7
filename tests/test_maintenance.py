"""Maintenance windows: scheduling and its checks, what a window covers, overlaps, ending and
cancelling, and each window's end handled once however many schedulers look.

acme, globex and initech live on vps1; hooli on vps2. alice is the operator.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

import storage.models_maintenance  # noqa: F401  (the tables compared with the migration)
from core.customers import Customer, upsert_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet, parse_fleet
from core.maintenance import MAX_DURATION, Maintenance, parse_window_id
from core.units import parse_span, pretty_span
from storage.events import EventLog

ALICE = "U0ALICE"
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
MY_TABLES = {"maintenance_windows", "check_states"}


def make_fleet() -> Fleet:
    return parse_fleet(
        {
            "servers": [
                {"name": "vps1", "dsn": "host=127.0.0.1"},
                {"name": "vps2", "dsn": "host=127.0.0.2"},
            ]
        }
    )


def make_maintenance(engine: Engine) -> Maintenance:
    upsert_customers(
        engine,
        [
            Customer("acme", "vps1", "acme", "acme", "small", "ops@acme.example"),
            Customer("globex", "vps1", "globex", "globex", "small"),
            Customer("initech", "vps1", "initech", "initech", "small"),
            Customer("hooli", "vps2", "hooli", "hooli", "small"),
        ],
    )
    return Maintenance(engine, EventLog(engine), make_fleet(), clock=lambda: T0)


@pytest.fixture
def mw(sqlite_engine: Engine) -> Maintenance:
    return make_maintenance(sqlite_engine)


def kinds(m: Maintenance, prefix: str = "maintenance.") -> list[tuple[str, str | None]]:
    return [(e.kind, e.subject) for e in m.events.query(kind_prefix=prefix, limit=100)]


def test_the_migration_matches_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert [d for d in diffs if any(t in repr(d) for t in MY_TABLES)] == []


def test_the_database_itself_refuses_a_window_without_a_reason_or_an_end(
    sqlite_engine: Engine,
) -> None:
    insert = text(
        "INSERT INTO maintenance_windows (target_kind, target, starts_at, ends_at, reason, "
        "notify, created_by, created_at, seen) VALUES ('server', 'vps1', :s, :e, :r, false, "
        "'x', :s, '{}')"
    )
    for start, end, reason in (
        (T0, T0 + timedelta(hours=1), "   "),  # a blank reason
        (T0, T0, "kernel"),  # no time at all
        (T0, T0 - timedelta(hours=1), "kernel"),  # an end before its start
    ):
        with pytest.raises(IntegrityError), sqlite_engine.begin() as conn:
            conn.execute(insert, {"s": start, "e": end, "r": reason})


def test_durations_as_people_type_them() -> None:
    assert parse_span("30m") == timedelta(minutes=30)
    assert parse_span("2h") == timedelta(hours=2)
    assert parse_span("1h30m") == timedelta(minutes=90)
    assert parse_span(" 1D12H ") == timedelta(hours=36)
    assert pretty_span(timedelta(minutes=90)) == "1h30m"
    for bad in ("", "30", "0m", "30m1h", "1h 30m", "-5m", "1hh", "2 hours"):
        with pytest.raises(DbopsError):
            parse_span(bad)
    assert parse_window_id("mw-3") == parse_window_id("#3") == parse_window_id("3") == 3
    assert parse_window_id("vps1") is None and parse_window_id("mw-0") is None


def test_scheduling_checks_what_it_is_given(mw: Maintenance) -> None:
    with pytest.raises(NotFound, match="vps3") as err:
        mw.schedule("vps3", "1h", "kernel", actor=ALICE)
    assert "vps1" in str(err.value) or "vps2" in str(err.value), "it suggests the names it knows"
    with pytest.raises(DbopsError, match="not a duration"):
        mw.schedule("vps1", "an hour", "kernel", actor=ALICE)
    with pytest.raises(DbopsError, match="at most 7d"):
        mw.schedule("vps1", MAX_DURATION + timedelta(minutes=1), "kernel", actor=ALICE)
    with pytest.raises(DbopsError, match="needs a reason"):
        mw.schedule("vps1", "1h", "  \n ", actor=ALICE)
    with pytest.raises(DbopsError, match="in the past"):
        mw.schedule("vps1", "1h", "kernel", actor=ALICE, starts_at=T0 - timedelta(hours=1))
    with pytest.raises(DbopsError, match="SMTP"):
        mw.schedule("vps1", "1h", "kernel", actor=ALICE, notify=True)
    assert mw.windows() == [] and kinds(mw) == [], "nothing refused was kept"
    # A week exactly is fine, and a start given without a zone is read in the desk's zone.
    week = mw.schedule("vps2", "7d", "move hooli", actor=ALICE).window
    assert week.ends_at - week.starts_at == MAX_DURATION


def test_a_server_window_covers_the_server_and_its_customers_only_while_it_runs(
    mw: Maintenance,
) -> None:
    start = T0 + timedelta(minutes=30)
    window = mw.schedule(
        "vps1", "1h30m", "kernel  upgrade\n(reboot)", actor=ALICE, starts_at=start
    ).window
    assert (window.target_kind, window.target, window.reason) == (
        "server",
        "vps1",
        "kernel upgrade (reboot)",
    )
    assert window.ends_at == start + timedelta(minutes=90)
    ((kind, subject),) = kinds(mw)
    assert (kind, subject) == ("maintenance.created", "vps1")
    created = mw.events.query(kind="maintenance.created")[0]
    assert created.actor == ALICE and created.payload["window"] == window.ref
    assert created.payload["customers"] == ["acme", "globex", "initech"]

    assert mw.covering("vps1", None, T0) is None, "planned, not started"
    assert [w.id for w in mw.upcoming(T0)] == [window.id] and mw.active(T0) == []
    inside = start + timedelta(minutes=10)
    for server, customer in (("vps1", None), ("vps1", "acme"), (None, "globex")):
        cover = mw.covering(server, customer, inside)
        assert cover is not None and cover.until == window.ends_at, (server, customer)
        assert cover.as_json() == {
            "id": window.id,
            "ref": window.ref,
            "until": "2026-03-02T16:00:00Z",
            "reason": "kernel upgrade (reboot)",
        }
    assert mw.covering("vps2", None, inside) is None
    assert mw.covering("vps2", "hooli", inside) is None
    assert mw.covering("vps1", None, window.ends_at) is None, "its end is not inside it"
    assert [w.as_json(inside)["status"] for w in mw.windows(inside)] == ["active"]


def test_a_customer_window_covers_that_customer_not_its_server_nor_its_neighbours(
    mw: Maintenance,
) -> None:
    mw.schedule("acme", "1h", "moving acme to vps2", actor=ALICE)
    inside = T0 + timedelta(minutes=5)
    assert mw.covering("vps1", "acme", inside) is not None
    assert mw.covering(None, "acme", inside) is not None
    assert mw.covering("vps1", None, inside) is None, "the server is not in maintenance"
    assert mw.covering("vps1", "globex", inside) is None


def test_overlapping_windows_combine_until_the_latest_end(mw: Maintenance) -> None:
    first = mw.schedule("vps1", "1h", "kernel", actor=ALICE).window
    second = mw.schedule(
        "vps1", "1h30m", "minor release", actor=ALICE, starts_at=T0 + timedelta(minutes=30)
    ).window
    touching = mw.schedule("vps1", "30m", "reindex", actor=ALICE, starts_at=second.ends_at).window
    mw.schedule("vps1", "1h", "later work", actor=ALICE, starts_at=T0 + timedelta(hours=5))
    cover = mw.covering("vps1", None, T0 + timedelta(minutes=10))
    assert cover is not None
    assert [w.id for w in cover.windows] == [first.id]
    assert cover.until == touching.ends_at == T0 + timedelta(hours=2, minutes=30)
    # A customer window overlapping its server's extends the customer's cover only.
    mw.schedule("acme", "4h", "moving acme", actor=ALICE)
    acme = mw.covering("vps1", "acme", T0 + timedelta(minutes=10))
    assert acme is not None and acme.until == T0 + timedelta(hours=4)
    server = mw.covering("vps1", None, T0 + timedelta(minutes=10))
    assert server is not None and server.until == touching.ends_at


def test_end_ends_an_active_window_and_cancels_a_planned_one(mw: Maintenance) -> None:
    running = mw.schedule("vps1", "2h", "kernel", actor=ALICE).window
    planned = mw.schedule(
        "vps2", "1h", "disk swap", actor=ALICE, starts_at=T0 + timedelta(hours=3)
    ).window
    tomorrow = mw.schedule(
        "vps1", "1h", "minor release", actor=ALICE, starts_at=T0 + timedelta(days=1)
    ).window
    later = T0 + timedelta(minutes=20)
    (ended,) = mw.end("vps1", actor=ALICE, now=later)  # what runs now, not tomorrow's
    assert ended.id == running.id and ended.ended_at == later and ended.ended_by == ALICE
    assert ended.status(later) == "ended" and ended.end == later
    assert mw.covering("vps1", None, later) is None
    (cancelled,) = mw.end(planned.ref, actor=ALICE, now=later)
    assert cancelled.cancelled and cancelled.status(later) == "cancelled"
    assert mw.covering("vps2", None, planned.starts_at + timedelta(minutes=1)) is None
    assert [k for k, _ in kinds(mw)] == [
        "maintenance.created",
        "maintenance.created",
        "maintenance.created",
        "maintenance.ended",
        "maintenance.cancelled",
    ]
    with pytest.raises(DbopsError, match="already ended"):
        mw.end(str(running.id), actor=ALICE, now=later)
    (second,) = mw.end("vps1", actor=ALICE, now=later)  # nothing runs: the planned one
    assert second.id == tomorrow.id and second.cancelled
    with pytest.raises(NotFound, match="no maintenance window on vps1"):
        mw.end("vps1", actor=ALICE, now=later)
    with pytest.raises(NotFound, match="vps9"):
        mw.end("vps9", actor=ALICE, now=later)
    with pytest.raises(NotFound, match="mw-99"):
        mw.end("mw-99", actor=ALICE, now=later)


def test_each_windows_end_is_handled_once_with_two_schedulers(engine: Engine) -> None:
    mine = make_maintenance(engine)
    theirs = Maintenance(engine, EventLog(engine), make_fleet(), clock=lambda: T0)
    windows = [mine.schedule("vps1", "10m", f"work {i}", actor=ALICE).window for i in range(4)]
    early = mine.schedule("vps2", "1h", "swap", actor=ALICE).window
    mine.end(early.ref, actor=ALICE, now=T0 + timedelta(minutes=5))
    (closed,) = mine.expire(T0 + timedelta(minutes=9))  # ended early: its end has passed
    assert closed.id == early.id and closed.closed_at == T0 + timedelta(minutes=9)

    after = T0 + timedelta(minutes=11)
    got: dict[str, list[int]] = {}
    start = threading.Barrier(2)

    def claim(name: str, m: Maintenance) -> None:
        start.wait()
        got[name] = [w.id for w in m.expire(after)]

    threads = [
        threading.Thread(target=claim, args=("mine", mine)),
        threading.Thread(target=claim, args=("theirs", theirs)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = got["mine"] + got["theirs"]
    assert sorted(claimed) == sorted(w.id for w in windows), got
    assert mine.expire(after + timedelta(minutes=1)) == []
    expired = mine.events.query(kind="maintenance.expired")
    assert sorted(e.payload["window"] for e in expired) == sorted(w.ref for w in windows)
    assert all(e.subject == "vps1" for e in expired)
    # The window ended early has its own event, not an expiry.
    assert [e.payload["window"] for e in mine.events.query(kind="maintenance.ended")] == [early.ref]


def test_the_list_shows_active_planned_and_recently_ended_windows(mw: Maintenance) -> None:
    mw.schedule("vps1", "1h", "kernel", actor=ALICE)
    mw.schedule("acme", "2h", "move", actor=ALICE, starts_at=T0 + timedelta(hours=2))
    old = mw.schedule("vps2", "30m", "old work", actor=ALICE).window
    later = T0 + timedelta(minutes=45)
    listed = mw.list_json(later)["windows"]
    assert [(w["target"], w["status"]) for w in listed] == [
        ("vps1", "active"),
        ("vps2", "expired"),
        ("acme", "scheduled"),
    ]
    assert listed[1]["ref"] == old.ref and listed[1]["end"] == "2026-03-02T14:30:00Z"
    assert set(listed[0]) >= {
        "id", "ref", "target_kind", "target", "starts_at", "ends_at", "end", "reason",
        "notify", "created_by", "ended_at", "ended_by", "announcement", "status",
    }  # fmt: skip
    a_day_later = T0 + timedelta(hours=30)
    assert mw.windows(a_day_later) == []
