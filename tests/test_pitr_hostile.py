"""A hostile tenant gains nothing from a point-in-time restore of its database (DESIGN.md,
"Trust boundaries"; issue 17).

On the session sandbox's vps1 (pgBackRest archiving), a throwaway customer turns hostile
(core.hostile_tenant.plant: shadowed functions and operators, a CHECK constraint, a domain, a
default, a generated column, an index expression, a trigger, a policy, a materialized view, each
noting who runs it with a ``RAISE LOG`` and escalating from wherever it stands), writes more, a
time T is noted, and it writes again. ``Backups.restore_to_time`` brings the database back as it
was at T: a scratch instance recovered to T, dumped from, removed; then the safe swap.

The planted code must never run as anyone but the tenant, in either of the two PostgreSQL logs
that see it: the live cluster's (the swap's pg_restore evaluates the CHECK constraints on load)
and the scratch instance's, which lives in the scratch directory and goes with it, so it is read
just before ``core.pitr.cleanup`` removes it. A probe run there as the tenant shows that log is
the right one and is read. The restore brings back exactly T, and the other customers of the
server (another throwaway one and the sandbox's own) keep their databases, the same objects.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine

from core import hostile_tenant, pitr
from core.backups import Backups
from core.customers import Customer, upsert_customers
from core.fleet import Fleet, Server
from core.remote import Runner, RunnerPool
from core.sandbox import ADMIN_ROLE, MONITOR_ROLE, customer_conninfo
from storage.events import EventLog
from tests.test_backups import (  # noqa: F401  (pool: a fixture; restore_server_logs: autouse)
    Seeded,
    admin,
    pool,
    query,
    restore_server_logs,
    seeded_customer,
)
from tests.test_hostile_tenant import foreign_runs, tenant_counts
from tests.test_pitr import _scratch_dirs, _scratch_processes

SERVER = "vps1"
CAROL = "U0CAROL"
PROBE = "pitr scratch probe"


@dataclass(frozen=True)
class ScratchSeen:
    """What a scratch instance's log said by the time dbops removed it."""

    scratch: str
    log: str


def _scratch_port(scratch: str) -> str:
    """The scratch instance's port, from the settings core.pitr appended (the last wins)."""
    conf = Path(scratch, "data", "postgresql.auto.conf").read_text(encoding="utf-8")
    ports = [ln.split("=", 1)[1].strip() for ln in conf.splitlines() if ln.startswith("port =")]
    return ports[-1]


def _server_log(path: Path) -> str:
    """The live cluster's log, with what the tests' log keepers (restore_server_logs, heal) have
    moved to ``<log>.1`` meanwhile: another test file's teardown may cut the log while this one
    runs. The tag of the planted code is this test's alone, so the whole of both is read."""
    kept = path.with_name(path.name + ".1")
    parts = [p.read_bytes() for p in (kept, path) if p.exists()]
    return b"".join(parts).decode("utf-8", "replace")


def _objects(root: str, names: list[str]) -> dict[str, int]:
    """Database name -> oid, for ``names`` and whatever a restore leaves named after them."""
    rows = query(
        root,
        "SELECT datname, oid::int FROM pg_database WHERE datname = ANY(%s)"
        " OR EXISTS (SELECT 1 FROM unnest(%s::text[]) n"
        "            WHERE datname LIKE replace(n, '_', '\\_') || '\\_%%')",
        names,
        names,
    )
    return {str(name): int(oid) for name, oid in rows}


@pytest.fixture
def tenant_and_neighbour(
    sandbox: dict[str, Any], sqlite_engine: Engine
) -> Iterator[tuple[Seeded, Seeded]]:
    """Two throwaway customers on vps1; the first turns hostile. Whatever a role gained is taken
    back before both are dropped (with their databases, kept copies and backups)."""
    root = admin(sandbox, SERVER)
    with psycopg.connect(root, autocommit=True) as conn:
        roles = hostile_tenant.snapshot_roles(conn)
    with (
        seeded_customer(sandbox, SERVER, prefix="pitrh") as tenant,
        seeded_customer(sandbox, SERVER, prefix="pitrh") as neighbour,
    ):
        upsert_customers(
            sqlite_engine,
            [Customer(c.name, SERVER, c.name, c.name, "small") for c in (tenant, neighbour)],
        )
        try:
            yield tenant, neighbour
        finally:
            with psycopg.connect(root, autocommit=True) as conn:
                hostile_tenant.restore_roles(conn, roles)


def test_a_point_in_time_restore_runs_nothing_of_a_hostile_tenant_as_anyone_else(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    sqlite_engine: Engine,
    pool: RunnerPool,  # noqa: F811
    tenant_and_neighbour: tuple[Seeded, Seeded],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant, neighbour = tenant_and_neighbour
    role = tenant.name
    root = admin(sandbox, SERVER)
    spec = next(s for s in sandbox["servers"] if s["name"] == SERVER)
    server = next(s for s in sandbox_fleet.servers if s.name == SERVER)
    with psycopg.connect(root, autocommit=True) as conn:
        roles_before = hostile_tenant.snapshot_roles(conn)

    planted = hostile_tenant.plant(tenant.conninfo, role, ADMIN_ROLE, MONITOR_ROLE)
    assert planted.databases == [role]  # no other database let it in
    # More of the tenant's own work, then T, then work that the restore must undo.
    query(tenant.conninfo, "CREATE TABLE public.ledger (id int PRIMARY KEY, note text)")
    query(tenant.conninfo, "INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 60) g")
    at_t = tenant_counts(tenant.conninfo)
    assert at_t["public.dbops_hostile_data"] == hostile_tenant.DATA_ROWS
    assert at_t["public.ledger"] == 60
    target = datetime.now(UTC)
    time.sleep(0.01)  # what follows commits strictly after T
    pinned = hostile_tenant.pinned(tenant.conninfo)
    query(pinned, "DROP TABLE public.ledger")
    query(pinned, "INSERT INTO public.dbops_hostile_data (id, v, t) VALUES (1000, 'late', 'late')")
    query(neighbour.conninfo, "INSERT INTO accounts (email) VALUES ('after-t@example.com')")

    # The other customers of the server, as they stand before the restore.
    others = [neighbour.name] + [c["name"] for c in sandbox["customers"] if c["server"] == SERVER]
    others_conninfo = {neighbour.name: neighbour.conninfo} | {
        name: customer_conninfo(sandbox, name) for name in others[1:]
    }
    others_before = {name: tenant_counts(c) for name, c in others_conninfo.items()}
    objects_before = _objects(root, others)
    assert set(objects_before) == set(others)

    # The scratch instance's log goes with its directory: read it first, after a probe that
    # runs the planted code there as the tenant (its line shows this is the log it writes to).
    seen: list[ScratchSeen] = []
    real_cleanup = pitr.cleanup

    def read_log_then_clean_up(runner: Runner, srv: Server, scratch: str) -> None:
        try:
            probe = make_conninfo(
                host=f"{scratch}/run", port=_scratch_port(scratch), user=role, dbname=role
            )
            with psycopg.connect(hostile_tenant.pinned(probe), autocommit=True) as conn:
                conn.execute("SELECT public.dbops_hostile(%s)", (PROBE,))
        finally:
            log = Path(scratch, "postgresql.log").read_text(encoding="utf-8", errors="replace")
            seen.append(ScratchSeen(scratch, log))
            real_cleanup(runner, srv, scratch)

    monkeypatch.setattr(pitr, "cleanup", read_log_then_clean_up)

    backups = Backups(sqlite_engine, EventLog(sqlite_engine), sandbox_fleet, pool)
    result = backups.restore_to_time(role, target.isoformat(), role, CAROL)

    live = hostile_tenant.runs_in_log(_server_log(Path(spec["log_path"])), planted.tag)
    (scratch,) = seen
    in_scratch = hostile_tenant.runs_in_log(scratch.log, planted.tag)

    # The scratch instance: it is the one that recovered to T, the probe ran there as the
    # tenant, and nothing of the tenant's ran there as anyone else (dbops's dump included).
    assert "starting point-in-time recovery to" in scratch.log, scratch.log[-2000:]
    assert any(r.via == PROBE and r.current_user == role for r in in_scratch), in_scratch
    foreign = sorted({(r.via, r.current_user, r.session_user, r.app) for r in
                      foreign_runs(in_scratch, role)})  # fmt: skip
    assert foreign == [], "\n".join(map(str, foreign))
    assert result.pitr is not None and result.pitr["steps"][-1] == "cleaned"
    assert not Path(scratch.scratch).exists() and _scratch_dirs(server) == []
    assert _scratch_processes(server) == []

    # The live cluster: the swap's load (into <db>_restore_<time>) evaluated the CHECK
    # constraints, and nothing of the tenant's ran as anyone else there, before or since.
    loaded = [r for r in live if r.database.startswith(f"{role}_restore_")]
    assert any("check constraint" in r.via for r in loaded), live
    foreign = sorted({(r.via, r.current_user, r.session_user, r.app) for r in
                      foreign_runs(live, role)})  # fmt: skip
    assert foreign == [], "\n".join(map(str, foreign))
    # No role gained anything; the restored database recorded no run as another role.
    with psycopg.connect(root, autocommit=True) as conn:
        assert hostile_tenant.gained(roles_before, hostile_tenant.snapshot_roles(conn)) == []
    assert query(pinned, "SELECT count(*) FROM public.dbops_hostile_log") == [(0,)]

    # The restore worked: the database is exactly as it was at T.
    assert "swapped" in result.steps and result.target == target
    assert tenant_counts(tenant.conninfo) == at_t
    assert query(pinned, "SELECT count(*) FROM public.dbops_hostile_data WHERE id = 1000") == [(0,)]
    # The other customers: the same databases (same oids, none added beside them), same rows.
    assert _objects(root, others) == objects_before
    assert {name: tenant_counts(c) for name, c in others_conninfo.items()} == others_before
    late = "SELECT count(*) FROM accounts WHERE email = 'after-t@example.com'"
    assert query(neighbour.conninfo, late) == [(1,)]
    # The tenant's database as it was before the restore is kept aside, under its own name.
    kept = query(root, "SELECT count(*) FROM pg_database WHERE datname = %s", result.kept_as)
    assert kept == [(1,)] and result.kept_as.startswith(role + "_")
