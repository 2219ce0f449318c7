"""Customers never read one another's data or backups (DESIGN.md, "Trust boundaries").

On the sandbox over SSH: backups are 0600 in 0700 directories, owned by the server's OS user
(who runs pg_dump and reads them back for restore tests and restores); an open backup an older
dbops left is closed by the next run, and ``backup_perms`` warns while one stays open. A
customer's role cannot even connect to another customer's database: the sandbox's, one just
provisioned (with the password from its welcome email), or one just restored.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from core import health
from core.backups import GLOBALS, Backups
from core.customers import customer_from_mapping
from core.fleet import Fleet, Server
from core.health import Check
from core.remote import CommandResult, LocalRunner, RunnerPool
from tests import test_backups, test_provisioning
from tests.test_backups import Seeded
from tests.test_provisioning import Inbox, emailed_password, provisioner

# The backup and provisioning tests' fixtures, as they are (restore_server_logs is autouse).
alerts, backups, customer = test_backups.alerts, test_backups.backups, test_backups.customer
pool, restore_server_logs = test_backups.pool, test_backups.restore_server_logs
smtp, newcomer = test_provisioning.smtp, test_provisioning.newcomer
sandbox_customers = test_provisioning.sandbox_customers

ALICE = "U0ALICE"  # the operator who runs /db backup
CAROL = "U0CAROL"  # the admin who restores and provisions
DENIED = "permission denied for database"


def modes(root: Path) -> dict[Path, int]:
    """``root`` and everything under it, with its permission bits."""
    return {p: p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def too_open(tree: dict[Path, int]) -> dict[str, str]:
    """What is not 0700 (a directory) or 0600 (a file): shown with its mode."""
    return {str(p): oct(m) for p, m in tree.items() if m != (0o700 if p.is_dir() else 0o600)}


def os_user(fleet: Fleet, server: str) -> str:
    """Who runs the server's commands (pg_dump among them): run_as, else the SSH user."""
    s = fleet.server(server)
    return s.run_as or s.ssh_user or getpass.getuser()


def loosen(root: Path) -> None:
    """What an older dbops left: directories 0755, files 0644."""
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def connect_as(sandbox: dict[str, Any], server: str, user: str, dbname: str, **kw: str) -> None:
    port = next(s["port"] for s in sandbox["servers"] if s["name"] == server)
    with psycopg.connect(
        host="127.0.0.1", port=port, user=user, dbname=dbname, connect_timeout=5, **kw
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


def neighbours(sandbox: dict[str, Any], server: str) -> list[dict[str, Any]]:
    return [c for c in sandbox["customers"] if c["server"] == server]


# --- backups ------------------------------------------------------------------------------------


def test_backups_over_ssh_are_0600_in_0700_directories_owned_by_the_server_user(
    backups: Backups,
    customer: Seeded,
    sandbox_fleet: Fleet,
    sandbox_backups_kept: None,
) -> None:
    server = sandbox_fleet.server(customer.server)
    assert server.transport == "ssh"
    info = backups.take_backup(customer.name, ALICE)
    assert backups.verify(customer.name, actor=ALICE).verification.ok  # writes `verified`
    globals_run = backups.backup_globals(customer.server, ALICE)
    assert globals_run.ok and globals_run.backup

    root = Path(server.backup_path)
    tree = {
        **modes(customer.backup_root),
        **modes(root / GLOBALS),
    }
    assert root / customer.name / info.stamp / "verified" in tree
    assert root / GLOBALS / globals_run.backup / "globals.sql" in tree
    assert too_open(tree) == {}
    assert root.stat().st_mode & 0o777 == 0o700
    # Readable by the one who reads them back for restores, and only by them.
    assert {p.owner() for p in tree} == {os_user(sandbox_fleet, customer.server)}


def test_an_open_backup_left_by_an_older_dbops_is_closed_by_the_next_run(
    backups: Backups, customer: Seeded, sandbox_fleet: Fleet
) -> None:
    first = backups.take_backup(customer.name, ALICE)
    root = Path(sandbox_fleet.server(customer.server).backup_path)
    loosen(customer.backup_root)
    root.chmod(0o755)
    try:
        assert too_open(modes(customer.backup_root))  # the state it starts from
        second = backups.take_backup(customer.name, ALICE)
        tree = modes(customer.backup_root)
        assert {customer.backup_root / first.stamp, customer.backup_root / second.stamp} <= set(
            tree
        )
        assert too_open(tree) == {}
        assert root.stat().st_mode & 0o777 == 0o700
    finally:
        root.chmod(0o700)


def test_the_sandbox_backups_are_closed_from_the_start(sandbox: dict[str, Any]) -> None:
    for spec in sandbox["servers"]:
        tree = modes(Path(spec["backup_path"]))
        assert too_open(tree) == {}
        assert any(p.name.endswith(".dump") for p in tree)


# --- the backup_perms check ---------------------------------------------------------------------


def result(stdout: str = "", stderr: str = "", exit_code: int = 0) -> CommandResult:
    return CommandResult("vps1", ["find"], exit_code, stdout, stderr, 0.01)


def test_backup_perms_reads_what_find_found() -> None:
    ok = health.check_backup_perms(result(), "/var/backups/postgresql")
    assert (ok.name, ok.verdict, ok.value) == ("backup_perms", "ok", 0)
    found = health.check_backup_perms(
        result(
            "755 /var/backups/postgresql\n"
            "644 /var/backups/postgresql/acme/20261122T080000Z/acme.dump\n"
            "644 /var/backups/postgresql/acme/20261122T080000Z/status\n"
        ),
        "/var/backups/postgresql",
    )
    assert (found.verdict, found.value) == ("warn", 3)
    assert "/var/backups/postgresql/acme/20261122T080000Z/acme.dump (644)" in found.detail
    assert "chmod -R go-rwx /var/backups/postgresql" in found.detail
    missing = health.check_backup_perms(
        result(stderr="find: '/srv/b': No such file or directory\n", exit_code=1), "/srv/b"
    )
    assert missing.verdict == "unknown" and "No such file" in missing.detail


def test_backup_perms_runs_one_find_that_a_path_cannot_turn_into_options(tmp_path: Path) -> None:
    root = tmp_path / "-delete"  # a find expression, were it not an argument
    (root / "acme" / "20261122T080000Z").mkdir(parents=True)
    (root / "acme" / "20261122T080000Z" / "acme.dump").write_bytes(b"PGDMP")
    for p in [root, *root.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    server = Server(name="vps1", dsn="host=127.0.0.1", backup_path=str(root))
    runner = LocalRunner("vps1")
    assert health.check_backup_perms(runner.run(health.backup_perms_argv(server)), str(root)) == (
        Check("backup_perms", "ok", 0, 1, None, f"nothing in {root} is open to group or others")
    )
    (root / "acme").chmod(0o750)
    found = health.check_backup_perms(runner.run(health.backup_perms_argv(server)), str(root))
    assert (found.verdict, found.value) == ("warn", 1) and f"{root}/acme (750)" in found.detail
    assert (root / "acme" / "20261122T080000Z" / "acme.dump").exists()


@pytest.fixture
def sweep(sandbox: dict[str, Any], sandbox_fleet: Fleet) -> Iterator[Any]:
    people = [customer_from_mapping(c) for c in sandbox["customers"]]
    with RunnerPool(sandbox_fleet) as runners:

        def run(server: str) -> Check:
            (where,) = health.check_fleet(
                sandbox_fleet, people, runners, deadline_s=8, servers=[server]
            )
            return next(c for c in where.checks if c.name == "backup_perms")

        yield run


def test_backup_perms_warns_while_a_backup_is_readable_by_others(
    sandbox: dict[str, Any], sweep: Any
) -> None:
    acme = next(c for c in sandbox["customers"] if c["name"] == "acme")
    root = Path(next(s for s in sandbox["servers"] if s["name"] == acme["server"])["backup_path"])
    dump = next((root / "acme").glob("*/acme.dump"))
    assert sweep(acme["server"]).verdict == "ok"
    dump.chmod(0o644)
    try:
        found = sweep(acme["server"])
        assert (found.verdict, found.value) == ("warn", 1)
        assert f"{dump} (644)" in found.detail
    finally:
        dump.chmod(0o600)
    assert sweep(acme["server"]).verdict == "ok"


# --- CONNECT ------------------------------------------------------------------------------------


def test_a_sandbox_customer_cannot_connect_to_another_customers_database(
    sandbox: dict[str, Any],
) -> None:
    for spec in sandbox["servers"]:
        mine = neighbours(sandbox, spec["name"])
        assert len(mine) >= 2
        for c in mine:
            connect_as(sandbox, spec["name"], c["role"], c["database"])
            connect_as(sandbox, spec["name"], "dbops_monitor", c["database"])
            for other in mine:
                if other is not c:
                    with pytest.raises(psycopg.OperationalError, match=DENIED):
                        connect_as(sandbox, spec["name"], c["role"], other["database"])
            with pytest.raises(psycopg.OperationalError, match=DENIED):
                connect_as(sandbox, spec["name"], c["role"], "postgres")


def test_a_provisioned_customer_and_its_neighbours_cannot_connect_to_each_other(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    sandbox_customers: None,
    newcomer: str,
) -> None:
    inbox, url = smtp
    provisioner(sqlite_engine, sandbox_fleet, pool, url).provision(
        newcomer, "small", "vps1", email="ops@newco.example.com", actor=CAROL
    )
    (mail,) = inbox.messages
    password = emailed_password(mail)
    connect_as(sandbox, "vps1", newcomer, newcomer, password=password)
    for other in neighbours(sandbox, "vps1"):
        with pytest.raises(psycopg.OperationalError, match=DENIED):
            connect_as(sandbox, "vps1", newcomer, other["database"], password=password)
        with pytest.raises(psycopg.OperationalError, match=DENIED):
            connect_as(sandbox, "vps1", other["role"], newcomer)
    with pytest.raises(psycopg.OperationalError, match=DENIED):
        connect_as(sandbox, "vps1", newcomer, "postgres", password=password)
    # Its first backup, taken by provisioning, is closed like every other.
    backup_root = Path(sandbox_fleet.server("vps1").backup_path) / newcomer
    tree = modes(backup_root)
    assert any(p.name == f"{newcomer}.dump" for p in tree)
    assert too_open(tree) == {}


def test_a_restored_database_stays_closed_to_other_customers(
    sandbox: dict[str, Any], backups: Backups, customer: Seeded
) -> None:
    taken = backups.take_backup(customer.name, CAROL)
    backups.restore(customer.name, taken.stamp, customer.name, CAROL)
    connect_as(sandbox, customer.server, customer.name, customer.name)
    for other in neighbours(sandbox, customer.server):
        with pytest.raises(psycopg.OperationalError, match=DENIED):
            connect_as(sandbox, customer.server, other["role"], customer.name)
        with pytest.raises(psycopg.OperationalError, match=DENIED):
            connect_as(sandbox, customer.server, customer.name, other["database"])
