"""Backups on the sandbox over SSH: the format, restore tests that catch bad dumps, retention.

Each test works on a customer database of its own (``seeded_customer``), created on a sandbox
server and dropped afterwards with its backups, so the shared sandbox is left as it was (its
customers keep exactly their one backup). The database has what trips up row counting: a
quoted mixed-case name, inheritance, an empty table, text with newlines and tabs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine

from core.alerts import Alert
from core.backups import (
    BackupInfo,
    Backups,
    backup_files_argv,
    backup_verified_check,
    parse_backup_files,
    plan_retention,
)
from core.customers import Customer, upsert_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet
from core.remote import RunnerPool
from storage.events import EventLog

ALICE = "U0ALICE"  # the operator who runs /db backup
EXPECTED_ROWS = {
    "public.accounts": 120,
    "public.orders": 333,
    "public.empty_table": 0,
    'app."Mixed Case"': 7,
    "app.parent": 3,
    "app.child": 4,
}


def _spec(sandbox: dict[str, Any], server: str) -> dict[str, Any]:
    return next(s for s in sandbox["servers"] if s["name"] == server)


def admin(sandbox: dict[str, Any], server: str, dbname: str = "postgres") -> str:
    port = _spec(sandbox, server)["port"]
    return f"host=127.0.0.1 port={port} user=postgres dbname={dbname}"


def query(conninfo: str, text: str | sql.Composable, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(text, params or None)
        return cur.fetchall() if cur.description else []


def seed(conninfo: str) -> None:
    """The customer's data (connected as the customer, into their own database)."""
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " email text NOT NULL UNIQUE)"
        )
        conn.execute(
            "INSERT INTO accounts (email) SELECT 'u' || g || '@example.com'"
            " FROM generate_series(1, 120) g"
        )
        conn.execute(
            "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " account_id bigint NOT NULL REFERENCES accounts, note text)"
        )
        conn.execute(
            "INSERT INTO orders (account_id, note) SELECT 1 + g % 120,"
            " CASE WHEN g % 3 = 0 THEN E'two\\nlines\\tand a tab \\\\ and \\\\.' ELSE 'n' || g END"
            " FROM generate_series(1, 333) g"
        )
        conn.execute("CREATE TABLE empty_table (id int)")
        conn.execute("CREATE SCHEMA app")
        conn.execute('CREATE TABLE app."Mixed Case" (v text)')
        conn.execute("INSERT INTO app.\"Mixed Case\" SELECT '\\.' FROM generate_series(1, 7)")
        conn.execute("CREATE TABLE app.parent (id int)")
        conn.execute("CREATE TABLE app.child () INHERITS (app.parent)")
        conn.execute("INSERT INTO app.parent VALUES (1), (2), (3)")
        conn.execute("INSERT INTO app.child VALUES (4), (5), (6), (7)")


@dataclass
class Seeded:
    name: str
    server: str
    admin: str  # superuser conninfo to the server's postgres database
    conninfo: str  # the customer's own connection
    backup_root: Path


@contextlib.contextmanager
def seeded_customer(sandbox: dict[str, Any], server: str, prefix: str = "dbt") -> Iterator[Seeded]:
    """A customer role and database on ``server``, seeded; everything of it dropped afterwards
    (renamed copies a restore leaves, its backups)."""
    name = f"{prefix}_{secrets.token_hex(3)}"
    ident = sql.Identifier(name)
    root = admin(sandbox, server)
    query(root, sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    query(root, sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(ident, ident))
    query(root, sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(ident))
    query(
        root,
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, dbops_monitor").format(ident, ident),
    )
    port = _spec(sandbox, server)["port"]
    own = f"host=127.0.0.1 port={port} user={name} dbname={name}"
    backups = Path(_spec(sandbox, server)["backup_path"]) / name
    try:
        seed(own)
        yield Seeded(name, server, root, own, backups)
    finally:
        drop_everything(root, name)
        shutil.rmtree(backups, ignore_errors=True)


def drop_everything(root: str, name: str) -> None:
    rows = query(
        root,
        "SELECT datname FROM pg_database WHERE datname = %s OR datname LIKE %s",
        name,
        name.replace("_", "\\_") + "\\_%",
    )
    for (db,) in rows:
        query(root, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
    query(root, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def live_counts(conninfo: str) -> dict[str, int]:
    return {
        "public.accounts": query(conninfo, "SELECT count(*) FROM accounts")[0][0],
        "public.orders": query(conninfo, "SELECT count(*) FROM orders")[0][0],
        "public.empty_table": query(conninfo, "SELECT count(*) FROM empty_table")[0][0],
        'app."Mixed Case"': query(conninfo, 'SELECT count(*) FROM app."Mixed Case"')[0][0],
        "app.parent": query(conninfo, "SELECT count(*) FROM ONLY app.parent")[0][0],
        "app.child": query(conninfo, "SELECT count(*) FROM app.child")[0][0],
    }


def scratch_left(root: str) -> list[str]:
    return [
        r[0]
        for r in query(root, "SELECT datname FROM pg_database WHERE datname LIKE 'dbops\\_verify%'")
    ]


@pytest.fixture(autouse=True)
def restore_server_logs(sandbox: dict[str, Any]) -> Iterator[None]:
    """Put each sandbox server's PostgreSQL log back as it was: these tests cause ERROR and
    FATAL lines on purpose (a failed dump, ended sessions), which the health tests that share
    the sandbox would read as problems. The lines move to ``<log>.1``, as the sandbox's heal
    does; PostgreSQL appends (O_APPEND), so cutting the file back is safe."""
    sizes = {spec["log_path"]: Path(spec["log_path"]).stat().st_size for spec in sandbox["servers"]}
    yield
    for path, size in sizes.items():
        log = Path(path)
        with open(log, "rb") as src, open(f"{path}.1", "ab") as kept:
            src.seek(size)
            shutil.copyfileobj(src, kept)
        os.truncate(log, min(size, log.stat().st_size))


@pytest.fixture
def pool(sandbox_fleet: Fleet, sqlite_engine: Engine) -> Iterator[RunnerPool]:
    events = EventLog(sqlite_engine)
    with RunnerPool(
        sandbox_fleet, record=lambda k, s, p: events.append(k, s, p, actor="dbops")
    ) as runners:
        yield runners


@pytest.fixture
def alerts() -> list[Alert]:
    return []


@pytest.fixture
def backups(
    sandbox_fleet: Fleet, sqlite_engine: Engine, pool: RunnerPool, alerts: list[Alert]
) -> Backups:
    return Backups(
        sqlite_engine, EventLog(sqlite_engine), sandbox_fleet, pool, on_alert=alerts.append
    )


@pytest.fixture
def customer(sandbox: dict[str, Any], sqlite_engine: Engine) -> Iterator[Seeded]:
    with seeded_customer(sandbox, "vps2") as seeded:
        upsert_customers(
            sqlite_engine, [Customer(seeded.name, "vps2", seeded.name, seeded.name, "small")]
        )
        yield seeded


# --- the format --------------------------------------------------------------------------------


def test_backup_writes_dump_checksum_rowcounts_then_status_over_ssh(
    backups: Backups, customer: Seeded
) -> None:
    info = backups.take_backup(customer.name, ALICE)

    path = Path(info.path)
    assert path.parent == customer.backup_root and info.state == "ok" and info.server == "vps2"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [f"{customer.name}.dump", f"{customer.name}.dump.sha256", "rowcounts.json", "status"]
    )
    dump = (path / f"{customer.name}.dump").read_bytes()
    digest = hashlib.sha256(dump).hexdigest()
    assert dump.startswith(b"PGDMP")
    assert (path / f"{customer.name}.dump.sha256").read_text() == (
        f"{digest}  {customer.name}.dump\n"
    )
    status = json.loads((path / "status").read_text())
    assert status["ok"] is True and status["sha256"] == digest == info.sha256
    assert status["size_bytes"] == len(dump)
    assert status["started_at"] <= status["finished_at"]
    # Counted from the dump, and they are what the database holds.
    counts = json.loads((path / "rowcounts.json").read_text())
    assert counts == EXPECTED_ROWS == live_counts(customer.conninfo)
    # The status file is the newest: written after everything else.
    assert (path / "status").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in path.iterdir())
    assert [b.stamp for b in backups.list_backups(customer.name)] == [info.stamp]
    (taken,) = backups.events.query(kind="backup.taken", limit=5)
    assert taken.actor == ALICE and taken.payload["rows"] == sum(EXPECTED_ROWS.values())
    commands = backups.events.query(kind="remote.command", limit=50)
    assert commands and all(c.payload["transport"] == "ssh" for c in commands)


def test_a_failed_backup_leaves_a_failed_status_and_no_dump(
    backups: Backups, customer: Seeded, sqlite_engine: Engine
) -> None:
    upsert_customers(
        sqlite_engine,
        [Customer(customer.name, "vps2", f"{customer.name}_gone", customer.name, "small")],
    )
    with pytest.raises(DbopsError, match=r"failed: the backup failed on vps2 \(exit 1\): pg_dump"):
        backups.take_backup(customer.name, ALICE)
    (failed,) = backups.list_backups(customer.name)
    assert failed.state == "failed" and failed.error and "does not exist" in failed.error
    assert sorted(p.name for p in Path(failed.path).iterdir()) == ["status"]
    assert backups.events.query(kind="backup.failed", limit=5)


def test_unknown_customer_is_not_found(backups: Backups) -> None:
    with pytest.raises(NotFound):
        backups.take_backup("nosuchcustomer", ALICE)
    with pytest.raises(DbopsError, match="not a valid customer"):
        backups.list_backups("acme; rm -rf /")


# --- restore tests -------------------------------------------------------------------------------


def test_corrupted_dump_is_caught_and_a_good_one_restores_with_equal_counts(
    backups: Backups, customer: Seeded, alerts: list[Alert]
) -> None:
    good = backups.take_backup(customer.name, ALICE)
    bad = backups.take_backup(customer.name, ALICE)
    assert bad.stamp > good.stamp
    dump = Path(bad.dump)
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: a bad disk, not a missing file
    dump.write_bytes(bytes(data))

    caught = backups.verify(customer.name, bad.stamp, actor=ALICE)
    passed = backups.verify(customer.name, good.stamp, actor=ALICE)

    v = caught.verification
    assert v.verdict == "crit" and not v.ok and "sha256 mismatch" in v.detail
    assert passed.verification.verdict == "ok"
    assert passed.verification.rows == sum(EXPECTED_ROWS.values())
    assert passed.verification.tables == len(EXPECTED_ROWS)
    # The result sits beside the status, for the health check and the restore modal.
    listed = {b.stamp: b for b in backups.list_backups(customer.name)}
    assert listed[bad.stamp].verification is not None
    assert not listed[bad.stamp].verified and listed[good.stamp].verified
    # An alert the incident desk can ingest, and an event; the good one clears it.
    assert [(a.status, a.dedupe_key, a.severity) for a in alerts] == [
        ("firing", f"check:backup_verified:{customer.name}", "P2"),
        ("resolved", f"check:backup_verified:{customer.name}", "P2"),
    ]
    assert backups.events.query(kind="backup.verify_failed", limit=5)
    assert scratch_left(customer.admin) == []


def test_truncated_dump_whose_checksum_matches_fails_pg_restore_as_crit(
    backups: Backups, customer: Seeded
) -> None:
    """A dump cut short when it was written (the sha256 was taken of the short file): only a
    real restore finds that out."""
    info = backups.take_backup(customer.name, ALICE)
    dump = Path(info.dump)
    short = dump.read_bytes()[: dump.stat().st_size * 2 // 3]
    dump.write_bytes(short)
    digest = hashlib.sha256(short).hexdigest()
    Path(f"{dump}.sha256").write_text(f"{digest}  {dump.name}\n")
    status_path = Path(info.path) / "status"
    status = json.loads(status_path.read_text())
    status_path.write_text(json.dumps({**status, "sha256": digest, "size_bytes": len(short)}))

    v = backups.verify(customer.name, actor=ALICE).verification
    assert v.verdict == "crit" and "pg_restore failed" in v.detail
    assert scratch_left(customer.admin) == []


def test_verify_all_reports_each_customer(
    backups: Backups, customer: Seeded, sqlite_engine: Engine
) -> None:
    upsert_customers(sqlite_engine, [Customer("nobackups", "vps1", "nobackups", "nobackups")])
    backups.take_backup(customer.name, ALICE)
    got = {o.customer: o.verification.verdict for o in backups.verify_all(actor="scheduler")}
    assert got == {customer.name: "ok", "nobackups": "crit"}


def test_backup_verified_check_reads_the_newest_restore_test() -> None:
    now = datetime(2026, 3, 18, 9, 0, tzinfo=UTC)
    root = "/b"

    def files(*items: tuple[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        text = "".join(
            "".join(
                f"{root}/acme/{path}:{line}\n" for line in json.dumps(data, indent=2).split("\n")
            )
            for path, data in items
        )
        return parse_backup_files(text, root)

    ok_status = {"ok": True, "finished_at": "2026-03-18T02:05:00+00:00", "database": "acme"}
    passed = {"ok": True, "verdict": "ok", "verified_at": "2026-03-18T04:00:00+00:00",
              "detail": "restored; row counts match", "tables": 2, "rows": 400}  # fmt: skip
    failed = {**passed, "ok": False, "verdict": "crit", "detail": "sha256 mismatch"}

    never = files(("20260318T020000Z/status", ok_status))
    assert backup_verified_check(never, root, "acme", now)["verdict"] == "unknown"
    good = files(("20260318T020000Z/status", ok_status), ("20260318T020000Z/verified", passed))
    check = backup_verified_check(good, root, "acme", now)
    assert check["verdict"] == "ok" and check["value"] == 5 * 3600
    assert "20260318T020000Z" in check["detail"]
    bad = files(
        ("20260317T020000Z/status", ok_status),
        ("20260317T020000Z/verified", passed),
        ("20260318T020000Z/status", ok_status),
        ("20260318T020000Z/verified", failed),
    )
    check = backup_verified_check(bad, root, "acme", now)
    assert check["verdict"] == "crit" and "sha256 mismatch" in check["detail"]
    stale = backup_verified_check(good, root, "acme", now + timedelta(days=9))
    assert stale["verdict"] == "warn"
    assert backup_verified_check({}, root, "acme", now)["verdict"] == "unknown"
    assert set(check) == {"name", "verdict", "value", "warn", "crit", "detail"}


def test_backup_files_argv_is_one_grep_of_status_and_verified(sandbox_fleet: Fleet) -> None:
    argv = backup_files_argv(sandbox_fleet.server("vps1"), ["acme", "hooli"])
    assert argv[:5] == ["grep", "-r", "-H", "--include=status", "--include=verified"]
    with pytest.raises(DbopsError):
        backup_files_argv(sandbox_fleet.server("vps1"), ["../etc"])


# --- retention -----------------------------------------------------------------------------------


def _info(stamp: str, state: str = "ok") -> BackupInfo:
    return BackupInfo("acme", "vps1", stamp, f"/b/acme/{stamp}", state)  # type: ignore[arg-type]


def test_retention_counts_complete_backups_only() -> None:
    now = datetime(2026, 3, 18, 2, 0, tzinfo=UTC)
    # Three weeks of nightly backups that all failed since the 10th: the last complete ones
    # stay however old, the failed ones older than the newest complete go.
    good = [_info(f"202603{d:02d}T020000Z") for d in range(1, 10)]
    failing = [_info(f"202603{d:02d}T020000Z", "failed") for d in range(10, 18)]
    kept, delete = plan_retention(good + failing, keep_daily=3, keep_weekly=2, now=now)
    kept_ok = [b.stamp[:8] for b in kept if b.complete]
    # daily: the 9th, 8th, 7th; weekly (ISO weeks): week of the 2nd-8th -> 8th, of 9th -> 9th.
    assert kept_ok == ["20260309", "20260308", "20260307"]
    assert [b.stamp[:8] for b in kept if not b.complete] == [f"202603{d}" for d in range(17, 9, -1)]
    assert {b.stamp[:8] for b in delete} == {f"2026030{d}" for d in range(1, 7)}


def test_retention_on_the_server_keeps_7_daily_and_4_weekly(
    backups: Backups, customer: Seeded, sandbox_fleet: Fleet
) -> None:
    """Old backups made by copying a real one under older names; then tonight's backup
    (2026-03-18, a Wednesday, with the clock set) prunes them by the fleet's policy."""
    assert (sandbox_fleet.backups.keep_daily, sandbox_fleet.backups.keep_weekly) == (7, 4)
    first = backups.take_backup(customer.name, ALICE)
    src = Path(first.path)
    days = [datetime(2026, 2, 20, 2, 0, tzinfo=UTC) + timedelta(days=n) for n in range(26)]
    stamps = [d.strftime("%Y%m%dT%H%M%SZ") for d in days]  # 02-20 .. 03-17
    extra = {"20260317T030000Z": "failed", "20260225T050000Z": "incomplete",
             "20260318T010000Z": "incomplete"}  # fmt: skip
    for stamp in [*stamps, *extra]:
        dest = customer.backup_root / stamp
        shutil.copytree(src, dest)
        if extra.get(stamp) == "incomplete":
            (dest / "status").unlink()
        elif extra.get(stamp) == "failed":
            (dest / "status").write_text(json.dumps({"ok": False, "error": "disk full"}))
        if os.geteuid() == 0:  # copied as root; the backups are the postgres user's alone (0600)
            for path in [dest, *dest.rglob("*")]:
                shutil.chown(path, "postgres", "postgres")
    shutil.rmtree(src)

    backups.clock = lambda: datetime(2026, 3, 18, 2, 0, tzinfo=UTC)
    tonight = backups.take_backup(customer.name, ALICE, prune=True)

    assert tonight.stamp == "20260318T020000Z"
    left = sorted(p.name for p in customer.backup_root.iterdir())
    daily = ["20260312", "20260313", "20260314", "20260315", "20260316", "20260317", "20260318"]
    weekly = ["20260301", "20260308"]  # ISO weeks 9 and 10; weeks 11 and 12 are in daily
    assert left == sorted(
        [f"{d}T020000Z" for d in daily + weekly] + ["20260318T010000Z"]  # still being written?
    )
    (event,) = [
        e
        for e in backups.events.query(kind="backup.taken", limit=5)
        if e.payload["backup"] == tonight.stamp
    ]
    assert (
        "20260317T030000Z" in event.payload["pruned"]
        and "20260225T050000Z" in event.payload["pruned"]
    )


# --- the nightly run -----------------------------------------------------------------------------


def test_backup_all_runs_servers_side_by_side_and_dumps_globals(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, sqlite_engine: Engine, backups: Backups
) -> None:
    with contextlib.ExitStack() as stack:
        made = [stack.enter_context(seeded_customer(sandbox, s)) for s in ("vps1", "vps2", "vps3")]
        upsert_customers(
            sqlite_engine, [Customer(m.name, m.server, m.name, m.name, "small") for m in made]
        )
        globals_dirs = [Path(s.backup_path) / "_globals" for s in sandbox_fleet.servers]
        stack.callback(lambda: [shutil.rmtree(d, ignore_errors=True) for d in globals_dirs])

        run = backups.backup_all(parallel=True, actor="scheduler")

        assert run.ok == 3 and not run.failed and run.parallel
        assert sorted((g.server, g.ok) for g in run.globals) == [
            ("vps1", True), ("vps2", True), ("vps3", True)
        ]  # fmt: skip
        for d in globals_dirs:
            (stamp_dir,) = d.iterdir()
            sql_file = stamp_dir / "globals.sql"
            assert "CREATE ROLE dbops_monitor" in sql_file.read_text()
            assert sql_file.stat().st_mode & 0o777 == 0o600
            assert json.loads((stamp_dir / "status").read_text())["ok"] is True
        # Servers ran at the same time: their backups' intervals overlap.
        taken = backups.events.query(kind="backup.taken", limit=10)
        spans = {
            e.payload["server"]: (e.ts - timedelta(milliseconds=e.payload["duration_ms"]), e.ts)
            for e in taken
        }
        latest_start = max(start for start, _ in spans.values())
        earliest_end = min(end for _, end in spans.values())
        assert len(spans) == 3 and latest_start < earliest_end
        for m in made:
            (b,) = backups.list_backups(m.name)
            assert b.complete
        # No secret of any kind reached the event log through the commands run.
        for e in backups.events.query(kind="remote.command", limit=500):
            assert "password" not in e.payload["command"].lower()
