"""A hostile tenant gains nothing from what dbops does on its server (DESIGN.md, "Trust
boundaries"; issue 12).

On the session sandbox over SSH, `dbops sandbox break hostile initech` plants, as initech's own
role, code that tries every route to run as someone else (core/hostile_tenant.py says which)
and records whoever runs it. Then dbops does its daily work on initech's server: the morning
report, `/db status initech`, a backup, the restore test, a real restore, and provisioning of
another customer there. Afterwards no role on the server has gained anything (attributes,
memberships), the planted code never ran as anyone but initech (PostgreSQL's own autovacuum
aside: it runs index expressions as the table's owner, in a sandbox no code can leave), and the
restore brought initech's data back.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine

from bot.commands.router import Router
from bot.shell import Shell
from core import hostile_tenant
from core import sandbox as sandbox_mod
from core.backups import RestoreFailed, RestoreResult
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import Fleet
from core.provisioning import Provisioner
from core.sandbox import customer_conninfo
from tests.bot_kit import ALICE, CAROL, ROLES, make_router, runtime
from tests.test_backups import admin, query, restore_server_logs  # noqa: F401  (autouse)
from tests.test_pgbouncer import forget
from tests.test_provisioning import Inbox, smtp  # noqa: F401  (the smtp fixture)

TENANT, SERVER = "initech", "vps3"  # the sandbox's customer that turns hostile, and its server
HOSTILE_TABLES = ("public.dbops_hostile_data", "public.dbops_hostile_log")


def tenant_counts(conninfo: str) -> dict[str, int]:
    """Rows per table of the tenant's database, counted as the tenant (search_path pinned)."""
    pinned = hostile_tenant.pinned(conninfo)
    tables = query(
        pinned,
        "SELECT pg_catalog.format('%I.%I', n.nspname::text, c.relname::text)"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND n.nspname OPERATOR(pg_catalog.=) 'public'",
    )
    count = "SELECT pg_catalog.count(*) FROM ONLY {}"
    return {t: query(pinned, sql.SQL(count).format(sql.SQL(t)))[0][0] for (t,) in tables}


def foreign_runs(runs: list[hostile_tenant.Run], role: str) -> list[hostile_tenant.Run]:
    """Runs of the tenant's code as anyone but the tenant, by a client session (dbops's)."""
    return [
        r
        for r in runs
        if r.backend != "autovacuum worker" and (r.current_user, r.session_user) != (role, role)
    ]


@pytest.fixture
def router(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, sqlite_engine: Engine
) -> Iterator[Router]:
    # dbops's own event database plays no part in what the tenant's code runs as (the day was
    # run on SQLite and PostgreSQL alike until both took the same ~20 s for the same answer).
    engine = sqlite_engine
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    rt = runtime(engine, sandbox_fleet, timezone="UTC")
    yield make_router(rt, ROLES)
    rt.close()


@pytest.fixture
def newcomer(sandbox: dict[str, Any], sandbox_fleet: Fleet) -> Iterator[str]:
    """The customer provisioned beside the tenant; removed afterwards with all it has."""
    name = "hostile_neighbour"
    yield name
    server = sandbox_fleet.server(SERVER)
    forget(server, name)
    root = admin(sandbox, SERVER)
    for (db,) in query(root, "SELECT datname FROM pg_database WHERE datname = %s", name):
        query(root, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
    query(root, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    spec = next(s for s in sandbox["servers"] if s["name"] == SERVER)
    shutil.rmtree(Path(spec["backup_path"]) / name, ignore_errors=True)


@pytest.fixture
def kept_databases(sandbox: dict[str, Any]) -> Iterator[None]:
    """The databases a restore of the tenant keeps aside (its pre-restore copy) are dropped."""
    yield
    root = admin(sandbox, SERVER)
    pattern = TENANT + r"\_%"
    for (db,) in query(root, "SELECT datname FROM pg_database WHERE datname LIKE %s", pattern):
        query(root, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def test_a_hostile_tenant_gains_nothing_from_a_day_of_dbops_on_its_server(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    sandbox_break: Any,
    sandbox_backups_kept: None,
    kept_databases: None,
    router: Router,
    smtp: tuple[Inbox, str],  # noqa: F811
    newcomer: str,
) -> None:
    spec = next(s for s in sandbox["servers"] if s["name"] == SERVER)
    log = Path(spec["log_path"])
    root = admin(sandbox, SERVER)
    with psycopg.connect(root, autocommit=True) as conn:
        roles_before = hostile_tenant.snapshot_roles(conn)
    since = log.stat().st_size

    fault = sandbox_break("hostile", TENANT)
    tenant = customer_conninfo(sandbox, TENANT)
    data_before = tenant_counts(tenant)
    assert data_before["public.dbops_hostile_data"] == hostile_tenant.DATA_ROWS

    # The morning report and /db status, as an operator runs them.
    out = io.StringIO()
    Shell(router, ALICE, out).loop(["/db report", f"/db status {TENANT}"])
    shown = out.getvalue()
    # A backup, its restore test, and a real restore of it (as the modal submits it).
    backups = router.rt.backups
    taken = backups.take_backup(TENANT, CAROL)
    tested = backups.verify(TENANT, taken.stamp, actor="scheduler").verification
    try:
        restored: RestoreResult | RestoreFailed = backups.restore(
            TENANT, taken.stamp, TENANT, CAROL
        )
    except RestoreFailed as exc:
        restored = exc
    # Another customer provisioned on the same server.
    _, url = smtp
    provisioner = Provisioner(
        router.ops.engine, router.ops.events, sandbox_fleet, router.ops.runners, smtp_url=url
    )
    provisioner.provision(newcomer, "small", SERVER, email="ops@neighbour.example", actor=CAROL)

    # No role on the server gained anything.
    with psycopg.connect(root, autocommit=True) as conn:
        after = hostile_tenant.snapshot_roles(conn)
    escalated = hostile_tenant.gained(roles_before, after)
    assert escalated == [], escalated
    assert not any(after[newcomer][flag] for flag in hostile_tenant.ROLE_FLAGS)
    assert after[newcomer]["member_of"] == []
    # The planted code ran (the restore evaluated its CHECK constraints on load), and only
    # ever as the tenant.
    text = log.read_bytes()[since:].decode("utf-8", "replace")
    runs = hostile_tenant.runs_in_log(text, fault["tag"])
    assert any("check constraint" in r.via for r in runs)
    foreign = sorted(
        {(r.via, r.current_user, r.session_user, r.app) for r in foreign_runs(runs, TENANT)}
    )
    assert foreign == [], "\n".join(map(str, foreign))
    # Nor did it record a run as another role in its own table.
    recorded = query(hostile_tenant.pinned(tenant), "SELECT count(*) FROM public.dbops_hostile_log")
    assert recorded == [(0,)]

    # And dbops's work was done: reported, tested, restored with every row back.
    assert f"{TENANT} is online on {SERVER}" in shown, shown
    assert tested.ok, tested.detail
    assert isinstance(restored, RestoreResult), restored
    assert restored.rows == sum(data_before.values())
    assert tenant_counts(tenant) == data_before


def test_heal_takes_the_hostile_tenant_back_out(sandbox: dict[str, Any], sandbox_dir: Path) -> None:
    tenant = customer_conninfo(sandbox, TENANT)
    before = tenant_counts(tenant)
    fault = sandbox_mod.break_fault(sandbox_dir, "hostile", TENANT)
    try:
        assert fault["databases"] == [TENANT]  # no other database let it in
        settings = query(
            admin(sandbox, SERVER),
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d"
            " ON d.oid = s.setdatabase WHERE d.datname = %s AND s.setrole = 0",
            TENANT,
        )
        assert settings == [(["search_path=public, pg_catalog"],)]
    finally:
        sandbox_mod.heal(sandbox_dir)
    assert tenant_counts(tenant) == before
    assert query(
        tenant,
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
    ) == [(0,)]
    assert query(
        admin(sandbox, SERVER),
        "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
        " WHERE d.datname = %s",
        TENANT,
    ) == [(0,)]
