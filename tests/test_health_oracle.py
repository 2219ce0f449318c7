"""check_postgres is the oracle: on the same cluster, in the same state, with the same thresholds,
our verdict for connection, backends, txn_idle, locks, prepared_txns and last_vacuum is the one
`check_postgres --action=X` gives (exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).

Each state is a sandbox fault on acme's server (or none); the fault is healed afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core import health, sandbox
from core.fleet import Fleet, Server, parse_fleet

CHECK_POSTGRES = shutil.which("check_postgres") or "/usr/bin/check_postgres"
VERDICTS = {0: "ok", 1: "warn", 2: "crit", 3: "unknown"}

# (action, warning, critical); the connection action takes no thresholds.
THRESHOLDS: dict[str, tuple[str, str] | None] = {
    "connection": None,
    "backends": ("90%", "95%"),
    "txn_idle": ("1s", "1h"),
    "locks": ("2", "100"),
    "prepared_txns": ("1", "30"),
    "last_vacuum": ("1d", "2d"),
}
# Ours leaves the system catalogs out of last_vacuum (see health.check_last_vacuum); this is how
# check_postgres is told the same.
OPTIONS: dict[str, list[str]] = {"last_vacuum": ["--exclude=pg_catalog."]}

pytestmark = pytest.mark.skipif(
    not Path(CHECK_POSTGRES).exists(), reason="check_postgres (Debian check-postgres) missing"
)


def oracle(
    port: int, action: str, dbname: str = "postgres", limits: tuple[str, str] | None = None
) -> tuple[str, str]:
    argv = [CHECK_POSTGRES, "--no-check_postgresrc", f"--action={action}", "--host=127.0.0.1",
            f"--port={port}", "--dbuser=dbops_monitor", f"--dbname={dbname}",
            "--timeout=10", *OPTIONS.get(action, [])]  # fmt: skip
    limits = limits or THRESHOLDS[action]
    if limits is not None:
        argv += [f"--warning={limits[0]}", f"--critical={limits[1]}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return VERDICTS.get(done.returncode, f"exit {done.returncode}"), done.stdout + done.stderr


def ours(fleet: Fleet, server: Server, action: str, dbname: str = "postgres") -> health.Check:
    if action == "connection" and dbname != "postgres":
        return health.check_database_connection(
            health.probe_database(server, dbname, health.Limits())
        )
    return next(c for c in health.check_cluster(server, fleet) if c.name == action)


@pytest.fixture(scope="module")
def fleet(sandbox_fleet: Fleet) -> Fleet:
    data = sandbox_fleet.model_dump(exclude={"base_dir"})
    data["thresholds"] = {
        name: {"warn": pair[0], "crit": pair[1]}
        for name, pair in THRESHOLDS.items()
        if pair is not None
    }
    return parse_fleet(data, base_dir=sandbox_fleet.base_dir)


@pytest.fixture(scope="module")
def acme(sandbox: dict[str, Any], fleet: Fleet) -> tuple[Server, int]:
    name = next(c["server"] for c in sandbox["customers"] if c["name"] == "acme")
    port = next(s["port"] for s in sandbox["servers"] if s["name"] == name)
    return fleet.server(name), int(port)


def agree(fleet: Fleet, server: Server, port: int, actions: list[tuple[str, str]]) -> list[str]:
    """Each (action, database) judged by both; returns the verdicts, failing on a disagreement."""
    verdicts = []
    for action, dbname in actions:
        mine = ours(fleet, server, action, dbname)
        theirs, said = oracle(port, action, dbname)
        assert mine.verdict == theirs, f"{action} on {dbname}: ours {mine}, check_postgres {said}"
        verdicts.append(mine.verdict)
    return verdicts


CLUSTER = [("backends", "postgres"), ("txn_idle", "postgres"), ("locks", "postgres"),
           ("prepared_txns", "postgres")]  # fmt: skip
CONNECT = [("connection", "postgres"), ("connection", "acme")]


def test_healthy_cluster(fleet: Fleet, acme: tuple[Server, int]) -> None:
    assert agree(fleet, *acme, CONNECT + CLUSTER) == ["ok"] * 6


@pytest.mark.parametrize(
    ("fault", "on_server", "actions", "expected"),
    [
        ("db-down", False, CONNECT, ["ok", "crit"]),
        ("connections", True, [("backends", "postgres")], ["crit"]),
        ("lock", False, [("locks", "postgres")], ["warn"]),
        ("server-down", True, CONNECT + CLUSTER, ["crit", "crit", *["unknown"] * 4]),
    ],
)
def test_broken_cluster(
    fleet: Fleet,
    acme: tuple[Server, int],
    sandbox_break: Callable[[str, str], dict[str, Any]],
    sandbox_dir: Path,
    fault: str,
    on_server: bool,
    actions: list[tuple[str, str]],
    expected: list[str],
) -> None:
    server, port = acme
    sandbox_break(fault, server.name if on_server else "acme")
    assert agree(fleet, server, port, actions) == expected
    sandbox.heal(sandbox_dir)
    assert set(agree(fleet, server, port, actions)) == {"ok"}


def test_idle_transaction(
    fleet: Fleet,
    acme: tuple[Server, int],
    sandbox_break: Callable[[str, str], dict[str, Any]],
    sandbox_dir: Path,
) -> None:
    server, port = acme
    sandbox_break("idle-txn", "acme")
    deadline = time.monotonic() + 5
    while ours(fleet, server, "txn_idle").verdict == "ok" and time.monotonic() < deadline:
        time.sleep(0.2)
    # check_postgres looks a moment later, when the transaction is only older.
    assert agree(fleet, server, port, [("txn_idle", "postgres")]) == ["warn"]
    sandbox.heal(sandbox_dir)
    assert agree(fleet, server, port, [("txn_idle", "postgres")]) == ["ok"]


def test_prepared_transaction(fleet: Fleet, acme: tuple[Server, int]) -> None:
    server, port = acme
    admin = psycopg.conninfo.make_conninfo(server.admin_dsn or server.dsn, dbname="acme")
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('max_prepared_transactions')::int").fetchone()
        if not row or row[0] < 1:
            pytest.skip("the sandbox clusters have max_prepared_transactions = 0")
        gid = f"dbops_oracle_{int(time.time() * 1000)}"
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM accounts")
        conn.execute(f"PREPARE TRANSACTION '{gid}'")
        try:
            deadline = time.monotonic() + 5
            while ours(fleet, server, "prepared_txns").verdict == "ok":
                assert time.monotonic() < deadline, "the prepared transaction never aged"
                time.sleep(0.2)
            assert agree(fleet, server, port, [("prepared_txns", "postgres")]) == ["warn"]
        finally:
            conn.execute(f"ROLLBACK PREPARED '{gid}'")
    assert agree(fleet, server, port, [("prepared_txns", "postgres")]) == ["ok"]


# --- last_vacuum: per database, on the probe's connection --------------------------------------


def our_last_vacuum(server: Server, dbname: str, limits: tuple[str, str]) -> health.Check:
    """As a sweep has it: the database's probe, with what the cluster's views say of it (when
    its statistics were reset), read once per server."""
    probe = health.probe_database(server, dbname, health.Limits())
    db = health.fetch_cluster(server, health.Limits()).databases.get(dbname)
    vac = health.with_cluster_stats(probe.vacuum, db)
    return health.check_last_vacuum(vac, *limits, error=probe.vacuum_error or probe.error)


def agree_last_vacuum(server: Server, port: int, dbname: str, limits: tuple[str, str]) -> str:
    mine = our_last_vacuum(server, dbname, limits)
    theirs, said = oracle(port, "last_vacuum", dbname, limits)
    assert mine.verdict == theirs, f"last_vacuum on {dbname}: ours {mine}, check_postgres {said}"
    return mine.verdict


def vacuum_acme(server: Server, *statements: str) -> None:
    admin = psycopg.conninfo.make_conninfo(server.admin_dsn or server.dsn, dbname="acme")
    with psycopg.connect(admin, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def aged(server: Server, limits: tuple[str, str], seconds: int, verdict: str = "") -> health.Check:
    """Poll ours until acme's oldest vacuum is ``seconds`` old (and, given one, at ``verdict``)."""
    deadline = time.monotonic() + seconds + 5
    while True:
        got = our_last_vacuum(server, "acme", limits)
        old = isinstance(got.value, int) and got.value >= seconds
        if old and (not verdict or got.verdict == verdict):
            return got
        assert time.monotonic() < deadline, f"acme's last vacuum never aged: {got}"
        time.sleep(0.2)


def test_last_vacuum_just_vacuumed_then_warn_then_crit(acme: tuple[Server, int]) -> None:
    server, port = acme
    defaults = THRESHOLDS["last_vacuum"]
    assert defaults is not None
    vacuum_acme(server, "VACUUM accounts, orders")
    # check_postgres --exclude calls an age that rounds to 0s unknown: a second, and it is ok.
    got = aged(server, defaults, 1)
    assert got.verdict == "ok" and "last vacuumed" in got.detail, got
    assert agree_last_vacuum(server, port, "acme", defaults) == "ok"
    assert agree_last_vacuum(server, port, "acme", ("1s", "1h")) == "warn"
    aged(server, ("1s", "2s"), 2, "crit")
    assert agree_last_vacuum(server, port, "acme", ("1s", "2s")) == "crit"


def test_last_vacuum_unknown_without_tables_or_after_a_stats_reset(
    acme: tuple[Server, int],
) -> None:
    server, port = acme
    limits = THRESHOLDS["last_vacuum"]
    assert limits is not None
    # The sandbox's postgres database holds no user tables.
    assert agree_last_vacuum(server, port, "postgres", limits) == "unknown"
    vacuum_acme(server, "SELECT pg_stat_reset()")
    try:
        got = our_last_vacuum(server, "acme", limits)
        assert got.verdict == "unknown" and "statistics were reset" in got.detail, got
        assert agree_last_vacuum(server, port, "acme", limits) == "unknown"
    finally:
        vacuum_acme(server, "VACUUM ANALYZE accounts, orders")  # as the sandbox seeded it
    aged(server, limits, 1)
    assert agree_last_vacuum(server, port, "acme", limits) == "ok"
