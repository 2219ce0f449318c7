"""Restores on the sandbox over SSH, called as the restore modal's submit calls them.

A customer database of the test's own is backed up, then changed (rows added, a table
dropped) as a bad deploy would; a restore must bring back the backup's data and keep the
changed database aside. A failure at any step, including between the two renames of the swap,
must leave the customer's database as it was: the same database (same OID), open to
connections, its data untouched.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine

from core.backups import Backups, RestoreFailed
from core.customers import Customer, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.provisioning import scram_sha256_secret
from core.remote import RunnerPool
from storage.events import EventLog
from storage.models_billing import acquire_lock
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    EXPECTED_ROWS,
    Seeded,
    live_counts,
    query,
    restore_server_logs,
    seeded_customer,
)
from tests.test_pgbouncer import registered

CAROL = "U0CAROL"  # the admin who confirms the restore


@pytest.fixture
def backups(sandbox_fleet: Fleet, sqlite_engine: Engine) -> Iterator[Backups]:
    events = EventLog(sqlite_engine)
    with RunnerPool(
        sandbox_fleet, record=lambda k, s, p: events.append(k, s, p, actor="dbops")
    ) as pool:
        yield Backups(sqlite_engine, events, sandbox_fleet, pool)


@pytest.fixture
def customer(sandbox: dict[str, Any], sqlite_engine: Engine) -> Iterator[Seeded]:
    with seeded_customer(sandbox, "vps3", prefix="rst") as seeded:
        upsert_customers(
            sqlite_engine, [Customer(seeded.name, "vps3", seeded.name, seeded.name, "small")]
        )
        yield seeded


def bad_deploy(c: Seeded) -> None:
    """What the restore is for: rows that should not be there, a table gone."""
    query(c.conninfo, "INSERT INTO accounts (email) VALUES ('oops@example.com')")
    query(c.conninfo, "DROP TABLE app.child")


def database(c: Seeded, name: str | None = None) -> dict[str, Any] | None:
    rows = query(
        c.admin,
        "SELECT oid, datallowconn, has_database_privilege('public', oid, 'CONNECT'),"
        " has_database_privilege(%s, oid, 'CONNECT'), pg_get_userbyid(datdba)"
        " FROM pg_database WHERE datname = %s",
        c.name,
        name or c.name,
    )
    if not rows:
        return None
    oid, allow, public, own, owner = rows[0]
    return {"oid": oid, "allow": allow, "public": public, "own": own, "owner": owner}


def databases_named_like(c: Seeded) -> list[str]:
    return sorted(
        r[0]
        for r in query(
            c.admin,
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            c.name.replace("_", "\\_") + "%",
        )
    )


def test_restore_end_to_end_as_the_modal_submits_it(backups: Backups, customer: Seeded) -> None:
    taken = backups.take_backup(customer.name, CAROL)
    assert backups.verify(customer.name, actor="scheduler").verification.ok
    bad_deploy(customer)
    before = database(customer)
    # A session of the customer's application, open across the restore.
    app = psycopg.connect(customer.conninfo, autocommit=True)

    preview = backups.restore_preview(customer.name)  # what the modal shows
    assert preview.backup.stamp == taken.stamp and preview.backup.verified
    assert preview.age_s >= 0 and preview.warnings == []
    assert [c.stamp for c in preview.choices] == [taken.stamp]
    shown = preview.as_json()
    assert shown["verified"] is True and shown["choices"][0]["backup"] == taken.stamp

    result = backups.restore(customer.name, preview.backup.stamp, customer.name, CAROL)

    assert result.backup == taken.stamp and result.rows == sum(EXPECTED_ROWS.values())
    assert result.steps == [
        "checked", "created", "restored", "verified", "analyzed", "settings_copied",
        "connections_ended", "swapped", "pgbouncer_reloaded",
    ]  # fmt: skip
    assert result.pgbouncer_reloaded
    # The customer's database is the backup's again, under its own name, for its own role.
    assert live_counts(customer.conninfo) == EXPECTED_ROWS
    # ...vacuumed and analyzed: the planner has statistics from the first query on.
    stats = query(
        customer.conninfo,
        "SELECT relname, last_vacuum IS NOT NULL, last_analyze IS NOT NULL"
        " FROM pg_stat_user_tables WHERE relname IN ('accounts', 'orders') ORDER BY 1",
    )
    assert stats == [("accounts", True, True), ("orders", True, True)]
    now = database(customer)
    assert now is not None and before is not None
    assert now["oid"] != before["oid"] and now["allow"] and now["owner"] == customer.name
    assert now["own"] and not now["public"]  # CONNECT as before: the customer, not PUBLIC
    # The database of the bad deploy is kept, renamed, closed to connections.
    kept = database(customer, result.kept_as)
    assert kept is not None and kept["oid"] == before["oid"] and not kept["allow"]
    assert databases_named_like(customer) == sorted([customer.name, result.kept_as])
    # The application's old session was ended; a new one lands in the restored data.
    with pytest.raises(psycopg.OperationalError):
        app.execute("SELECT 1")
    app.close()
    # Each step is an event, in order, with who did it.
    kinds = [
        (e.kind, e.payload.get("step"))
        for e in sorted(backups.events.about([customer.name], limit=100), key=lambda e: e.id)
        if e.kind.startswith("restore.")
    ]
    assert kinds == [
        ("restore.started", None),
        *[("restore.step", s) for s in result.steps],
        ("restore.done", None),
    ]
    assert {e.actor for e in backups.events.query(kind="restore.step", limit=20)} == {CAROL}


def test_the_customer_connects_through_pgbouncer_after_the_swap(
    backups: Backups, customer: Seeded, sandbox_fleet: Fleet
) -> None:
    """The application's way in (pgBouncer, with its password) leads to the restored data."""
    password = secrets.token_urlsafe(16)
    query(
        customer.admin,
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(customer.name), sql.Literal(scram_sha256_secret(password))
        ),
    )
    with registered(sandbox_fleet.server("vps3"), customer.name, password) as through:
        taken = backups.take_backup(customer.name, CAROL)
        bad_deploy(customer)
        # The bad deploy, seen through pgBouncer (which keeps that server connection pooled).
        assert query(through, "SELECT count(*) FROM accounts") == [(121,)]

        result = backups.restore(customer.name, taken.stamp, customer.name, CAROL)

        assert result.pgbouncer_reloaded and result.steps[-1] == "pgbouncer_reloaded"
        assert live_counts(through) == EXPECTED_ROWS


def test_typed_name_must_match(backups: Backups, customer: Seeded) -> None:
    taken = backups.take_backup(customer.name, CAROL)
    before = database(customer)
    with pytest.raises(DbopsError, match="does not match"):
        backups.restore(customer.name, taken.stamp, customer.name.upper(), CAROL)
    assert database(customer) == before
    assert backups.events.query(kind="restore.refused", limit=5)
    assert backups.events.query(kind="restore.started", limit=5) == []


@pytest.mark.parametrize(
    ("failpoint", "step", "original"),
    [
        ("restore.between_renames", "swap", "untouched"),
        ("restore.after_swap", "pgbouncer", "swapped back"),
        ("restore.after_pg_restore", "pg_restore", "untouched"),
    ],
)
def test_failure_leaves_the_original_database_serving(
    backups: Backups, customer: Seeded, failpoint: str, step: str, original: str
) -> None:
    taken = backups.take_backup(customer.name, CAROL)
    bad_deploy(customer)
    before = database(customer)
    data_before = query(customer.conninfo, "SELECT count(*) FROM accounts")

    backups.failpoints.add(failpoint)
    with pytest.raises(RestoreFailed) as failed:
        backups.restore(customer.name, taken.stamp, customer.name, CAROL)

    assert (failed.value.step, failed.value.original) == (step, original)
    assert f"The customer's database is {original}." in failed.value.message
    # The same database as before (same OID), open, with the data it had.
    assert database(customer) == before
    assert query(customer.conninfo, "SELECT count(*) FROM accounts") == data_before
    assert query(customer.conninfo, "SELECT to_regclass('app.child')") == [(None,)]
    # Nothing left behind: no restored copy, no renamed original.
    assert databases_named_like(customer) == [customer.name]
    (event,) = backups.events.query(kind="restore.failed", limit=5)
    assert event.payload["step"] == step and event.payload["original"] == original

    # And once the cause is gone, the same restore goes through.
    backups.failpoints.clear()
    backups.restore(customer.name, taken.stamp, customer.name, CAROL)
    assert live_counts(customer.conninfo) == EXPECTED_ROWS


def test_a_database_closed_before_stays_closed_when_the_restore_fails(
    backups: Backups, customer: Seeded
) -> None:
    taken = backups.take_backup(customer.name, CAROL)
    ident = sql.Identifier(customer.name)
    query(customer.admin, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident))
    backups.failpoints.add("restore.between_renames")
    with pytest.raises(RestoreFailed):
        backups.restore(customer.name, taken.stamp, customer.name, CAROL)
    state = database(customer)
    assert state is not None and state["allow"] is False


def test_a_corrupted_backup_is_refused_before_anything_changes(
    backups: Backups, customer: Seeded
) -> None:
    taken = backups.take_backup(customer.name, CAROL)
    with open(taken.dump, "r+b") as dump:
        dump.seek(100)
        dump.write(b"\x00" * 16)
    before = database(customer)
    with pytest.raises(RestoreFailed, match="sha256 mismatch") as failed:
        backups.restore(customer.name, taken.stamp, customer.name, CAROL)
    assert failed.value.step == "check" and database(customer) == before
    assert databases_named_like(customer) == [customer.name]


def test_one_restore_at_a_time(backups: Backups, customer: Seeded) -> None:
    taken = backups.take_backup(customer.name, CAROL)
    from datetime import timedelta

    acquire_lock(
        backups.engine, f"restore:{customer.name}", "other", lease=timedelta(hours=1),
        holder="U0ALICE",
    )  # fmt: skip
    with pytest.raises(DbopsError, match=r"already running \(by U0ALICE"):
        backups.restore(customer.name, taken.stamp, customer.name, CAROL)
    assert databases_named_like(customer) == [customer.name]


def test_preview_warns_about_an_untested_backup_and_lists_the_choices(
    backups: Backups, customer: Seeded
) -> None:
    older = backups.take_backup(customer.name, CAROL)
    backups.verify(customer.name, older.stamp)
    newer = backups.take_backup(customer.name, CAROL)
    preview = backups.restore_preview(customer.name)
    assert preview.backup.stamp == older.stamp  # the newest restore-tested one
    assert any(newer.stamp in w and "not restore-tested" in w for w in preview.warnings)
    assert [c.stamp for c in preview.choices] == [newer.stamp, older.stamp]
    picked = backups.restore_preview(customer.name, newer.stamp)
    assert picked.backup.stamp == newer.stamp
    assert any("has not been restore-tested" in w for w in picked.warnings)
    with pytest.raises(DbopsError, match="not a backup name"):
        backups.restore_preview(customer.name, "yesterday")
