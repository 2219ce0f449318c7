"""The pgbouncer check against the sandbox's real pgBouncers (one per server, Debian's binary).

Healthy: every customer database registered, nobody waiting. The ``pgbouncer-down`` fault makes
it crit and heal makes it ok again; a customer database missing from [databases] is named;
clients queued for a server connection warn. A server without pgBouncer configured has no
pgbouncer check at all. The verdict rules themselves are checked on fixed console output at
the end.

``registered`` (used by the provisioning and restore tests too) puts a database and its role's
password in a server's pgBouncer for the length of a test, as provisioning does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from core import health, sandbox
from core.customers import Customer, customer_from_mapping
from core.fleet import Fleet, Server, parse_fleet
from core.health import Check, PgBouncerStats, ServerHealth
from core.provisioning import (
    INI_MARK,
    pgbouncer_with_database,
    scram_sha256_secret,
    userlist_with,
)
from core.remote import LocalRunner, RunnerPool
from core.sandbox import PGBOUNCER_POOL_SIZE, customer_conninfo
from tests.test_backups import restore_server_logs  # noqa: F401  (autouse: ghost_db's FATALs)
from tests.test_health_checks import fleet_for

Breaker = Callable[[str, str], dict[str, Any]]
DEFAULTS = ((5, 20), ("5s", "30s"))  # pgb_pool_cl_waiting, pgb_pool_maxwait


# --- helpers other tests share ------------------------------------------------------------------


def _auth_file(server: Server) -> Path:
    assert server.pgbouncer_ini
    for line in Path(server.pgbouncer_ini).read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "auth_file":
            return Path(value.strip())
    raise AssertionError("the sandbox's pgbouncer.ini has no auth_file")


def reload_pgbouncer(server: Server) -> None:
    """The fleet's own reload command (SIGHUP), as provisioning and restores send it."""
    LocalRunner(server.name, run_as=server.run_as).run(
        server.argv(server.pgbouncer_reload_command)
    ).check()


def forget(server: Server, name: str) -> None:
    """Take ``name`` (database and role, dbops's marks too) out of the server's pgBouncer files,
    reload, and wait for pgBouncer to close its pooled server connections to that database:
    dropping it under them would put FATAL lines in the server log that the health tests read."""
    assert server.pgbouncer_ini
    ini, users = Path(server.pgbouncer_ini), _auth_file(server)
    ini_text, users_text = ini.read_text(), users.read_text()
    kept_ini = [
        ln
        for ln in ini_text.splitlines()
        if ln.partition("=")[0].strip() != name and ln.strip() != INI_MARK.format(name=name)
    ]
    kept_users = [ln for ln in users_text.splitlines() if not ln.startswith(f'"{name}" ')]
    if len(kept_ini) == len(ini_text.splitlines()) and kept_users == users_text.splitlines():
        return
    ini.write_text("\n".join(kept_ini) + "\n")  # written in place: owner and mode stay
    users.write_text("\n".join(kept_users) + "\n")
    reload_pgbouncer(server)
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
    deadline = time.monotonic() + 5
    with psycopg.connect(server.admin_dsn or server.dsn, autocommit=True) as admin:
        while admin.execute(sessions, (name,)).fetchone() != (0,):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)


@contextlib.contextmanager
def registered(server: Server, name: str, password: str) -> Iterator[str]:
    """Database ``name`` in the server's [databases] and role ``name`` with ``password`` in its
    auth_file, reloaded; yields the conninfo through pgBouncer. Taken out again afterwards."""
    assert server.pgbouncer_ini
    admin = conninfo_to_dict(server.admin_dsn or server.dsn)
    ini = Path(server.pgbouncer_ini)
    entry = f"host={admin['host']} port={admin['port']} dbname={name}"
    changed = pgbouncer_with_database(ini.read_text(), name, entry)
    if changed is not None:
        ini.write_text(changed)
    users = _auth_file(server)
    users.write_text(userlist_with(users.read_text(), name, scram_sha256_secret(password)))
    reload_pgbouncer(server)
    try:
        yield (
            f"host={admin['host']} port={server.pgbouncer_port} dbname={name} user={name}"
            f" password={password} connect_timeout=5"
        )
    finally:
        forget(server, name)


def registrations(server: Server, name: str) -> tuple[int, int]:
    """How many [databases] lines and auth_file lines ``name`` has in the server's pgBouncer."""
    assert server.pgbouncer_ini
    ini = Path(server.pgbouncer_ini).read_text().splitlines()
    users = _auth_file(server).read_text().splitlines()
    return (
        sum(1 for ln in ini if ln.partition("=")[0].strip() == name),
        sum(1 for ln in users if ln.startswith(f'"{name}" ')),
    )


# --- against the sandbox -------------------------------------------------------------------------


@pytest.fixture(params=["ssh", "local"])
def fleet(request: pytest.FixtureRequest, sandbox_fleet: Fleet) -> Fleet:
    return fleet_for(sandbox_fleet, request.param)


@pytest.fixture(scope="module")
def customers(sandbox: dict[str, Any]) -> list[Customer]:
    return [customer_from_mapping(c) for c in sandbox["customers"]]


@pytest.fixture
def sweep(fleet: Fleet, customers: list[Customer]) -> Iterator[Callable[..., ServerHealth]]:
    """sweep(server, fleet=..., customers=...) -> that server's health now."""
    pool = RunnerPool(fleet)

    def run(
        server: str, fleet: Fleet = fleet, customers: list[Customer] = customers
    ) -> ServerHealth:
        (result,) = health.check_fleet(fleet, customers, pool, deadline_s=8, servers=[server])
        return result

    yield run
    pool.close()


def pgbouncer_check(where: ServerHealth) -> Check:
    found = where.check("pgbouncer")
    assert found is not None, [c.name for c in where.checks]
    return found


def test_every_server_has_a_pgbouncer_that_answers(
    sweep: Callable[..., ServerHealth], sandbox: dict[str, Any]
) -> None:
    for spec in sandbox["servers"]:
        mine = sum(1 for c in sandbox["customers"] if c["server"] == spec["name"])
        got = pgbouncer_check(sweep(spec["name"]))
        assert (got.verdict, got.value, got.warn, got.crit) == ("ok", 0, 5, 20), got
        assert got.detail == f"{mine} customer databases registered, no client waiting"


def test_pgbouncer_down_is_crit_then_ok(
    sweep: Callable[..., ServerHealth], sandbox_break: Breaker, sandbox_dir: Path
) -> None:
    sandbox_break("pgbouncer-down", "vps2")
    where = sweep("vps2")
    got = pgbouncer_check(where)
    assert got.verdict == "crit", got
    assert got.detail == "pgBouncer not answering: connection refused (is pgBouncer running?)"
    conn = where.check("connection")  # PostgreSQL itself is fine, and says so
    assert conn is not None and conn.verdict == "ok"
    sandbox.heal(sandbox_dir)
    assert pgbouncer_check(sweep("vps2")).verdict == "ok"


def test_a_customer_database_missing_from_pgbouncer_is_named(
    sweep: Callable[..., ServerHealth], customers: list[Customer]
) -> None:
    ghost = Customer("ghost", "vps1", "ghost_db", "ghost", "small")
    got = pgbouncer_check(sweep("vps1", customers=[*customers, ghost]))
    assert got.verdict == "crit" and got.detail == "not registered: ghost_db", got


def test_clients_waiting_for_a_server_connection_warn(
    sweep: Callable[..., ServerHealth], fleet: Fleet, sandbox: dict[str, Any]
) -> None:
    """The pool holds PGBOUNCER_POOL_SIZE server connections per database; one client more
    has to wait for one of them."""
    through = customer_conninfo(sandbox, "acme", pgbouncer=True)
    holders = [psycopg.connect(through, autocommit=True) for _ in range(PGBOUNCER_POOL_SIZE)]
    for conn in holders:
        conn.execute("SELECT 1")  # session pooling: each keeps its server connection
    answered: list[Any] = []

    def late_client() -> None:
        with psycopg.connect(through, autocommit=True) as conn:
            answered.append(conn.execute("SELECT 1").fetchone())

    waiter = threading.Thread(target=late_client, daemon=True)
    waiter.start()
    try:
        strict = fleet_for(
            fleet,
            fleet.servers[0].transport,
            {"pgb_pool_cl_waiting": {"warn": 1, "crit": 3}, "pgb_pool_maxwait": {"crit": "1h"}},
        )
        got = pgbouncer_check(sweep("vps1", fleet=strict))
        for _ in range(20):  # the late client may not have reached the queue yet
            if got.verdict != "ok":
                break
            got = pgbouncer_check(sweep("vps1", fleet=strict))
        assert (got.verdict, got.value, got.warn, got.crit) == ("warn", 1, 1, 3), got
        assert got.detail.startswith("clients waiting for a server connection: acme: 1 waiting")
    finally:
        for conn in holders:
            conn.close()
        waiter.join(10)
    assert answered == [(1,)]  # served as soon as a server connection was free
    # Leave no idle server connections behind (closed by pgBouncer: nothing in the server log).
    vps1 = fleet.server("vps1")
    console = conninfo_to_dict(vps1.admin_dsn or "")
    with psycopg.connect(
        host=console["host"], port=vps1.pgbouncer_port, user=console["user"], dbname="pgbouncer",
        autocommit=True,
    ) as admin:  # fmt: skip
        admin.execute("RECONNECT acme")


def test_a_server_without_pgbouncer_has_no_pgbouncer_check(
    sweep: Callable[..., ServerHealth], fleet: Fleet
) -> None:
    data = fleet.model_dump(exclude={"base_dir"})
    for server in data["servers"]:
        server["pgbouncer_ini"] = None
    plain = parse_fleet(data, base_dir=fleet.base_dir)
    where = sweep("vps3", fleet=plain)
    no_history = "disk_runway"  # the sweep is given no measurement history
    assert [c.name for c in where.checks] == [
        n for n in health.SERVER_CHECKS if n not in ("pgbouncer", no_history)
    ]


def test_a_fleet_file_without_pgbouncer_is_valid_and_has_debians_defaults() -> None:
    fleet = parse_fleet({"servers": [{"name": "vps1", "dsn": "host=10.0.0.11 user=m"}]})
    (vps1,) = fleet.servers
    assert vps1.pgbouncer_ini is None and vps1.pgbouncer_port == 6432
    assert vps1.pgbouncer_reload_command == "systemctl reload pgbouncer"
    assert fleet.threshold("pgb_pool_cl_waiting") == {"warn": 5, "crit": 20}
    assert fleet.threshold("pgb_pool_maxwait") == {"warn": "5s", "crit": "30s"}


def test_console_conninfo_is_the_monitoring_dsn_on_pgbouncers_port() -> None:
    server = Server(
        name="vps1", dsn="host=10.0.0.11 port=5432 user=m dbname=postgres options='-c x=1'"
    )
    got = conninfo_to_dict(health.pgbouncer_conninfo(server, health.Limits()))
    assert got == {
        "host": "10.0.0.11", "port": "6432", "user": "m", "dbname": "pgbouncer",
        "application_name": "dbops", "connect_timeout": "3",
    }  # fmt: skip


# --- fixed console output --------------------------------------------------------------------


def console(
    databases: list[str], pools: list[tuple[str, int, int]], **flags: dict[str, int]
) -> PgBouncerStats:
    """SHOW DATABASES names (with paused/disabled flags by name), SHOW POOLS as
    (database, cl_waiting, maxwait seconds); plus the console's own pool."""
    rows = {
        name: {"name": name, "paused": flags.get("paused", {}).get(name, 0),
               "disabled": flags.get("disabled", {}).get(name, 0)}
        for name in [*databases, "pgbouncer"]
    }  # fmt: skip
    return PgBouncerStats(
        rows,
        [{"database": "pgbouncer", "user": "pgbouncer", "cl_waiting": 0, "maxwait": 0,
          "maxwait_us": 0}]
        + [{"database": d, "user": d, "cl_waiting": n, "maxwait": s, "maxwait_us": 0}
           for d, n, s in pools],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("waiting", "maxwait", "verdict"),
    [(0, 0, "ok"), (4, 4, "ok"), (5, 0, "warn"), (1, 5, "warn"), (20, 0, "crit"), (1, 30, "crit")],
)
def test_waiting_thresholds(waiting: int, maxwait: int, verdict: str) -> None:
    stats = console(["acme", "globex"], [("acme", waiting, maxwait), ("globex", 0, 0)])
    got = health.check_pgbouncer(stats, ["acme", "globex"], *DEFAULTS)
    assert (got.verdict, got.value, got.warn, got.crit) == (verdict, waiting, 5, 20)
    if waiting:
        assert got.detail == (
            f"clients waiting for a server connection: acme: {waiting} waiting, longest {maxwait}s"
        )
    else:
        assert got.detail == "2 customer databases registered, no client waiting"


def test_missing_disabled_and_paused_databases_are_named() -> None:
    stats = console(
        ["acme", "globex", "initech"], [("acme", 0, 0)],
        disabled={"globex": 1}, paused={"initech": 1},
    )  # fmt: skip
    got = health.check_pgbouncer(stats, ["acme", "globex", "initech", "newco"], *DEFAULTS)
    assert got.verdict == "crit"
    assert got.detail == "not registered: newco; disabled: globex; paused: initech"
    only_paused = health.check_pgbouncer(stats, ["initech"], *DEFAULTS)
    assert (only_paused.verdict, only_paused.detail) == ("warn", "paused: initech")


def test_a_long_list_of_missing_databases_is_cut_short() -> None:
    names = [f"db{i}" for i in range(8)]
    got = health.check_pgbouncer(console([], []), names, *DEFAULTS)
    assert got.detail == "not registered: db0, db1, db2, db3, db4 (+3 more)"


def test_not_answering_and_bad_thresholds() -> None:
    down = health.check_pgbouncer(None, ["acme"], *DEFAULTS, error="no answer within 8s")
    assert (down.verdict, down.detail) == ("crit", "pgBouncer not answering: no answer within 8s")
    bad = health.check_pgbouncer(console(["acme"], []), ["acme"], ("many", 20), DEFAULTS[1])
    assert bad.verdict == "unknown" and "pgb_pool_cl_waiting" in bad.detail
