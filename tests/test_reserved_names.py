"""A customer never takes a name that is someone else's, and provisioning touches only the
pgBouncer entries it made itself.

A Stripe business name "PgBouncer" once became customer `pgbouncer`, with a role of that name
and a line in pgBouncer's auth_file beside its admin user's; an existing [databases] alias was
silently pointed at the new database. Here, on the sandbox's real clusters and pgBouncers over
SSH: PostgreSQL's and pgBouncer's own names (`pgbouncer`, `postgres`, `template*`, `pg_*`), the
fleet's monitoring and admin roles, and whatever a server's pgBouncer files hold that dbops did
not write ([databases] aliases, auth_file users, admin_users, stats_users) are refused with a
message that says what to do, before anything is made; entries written by hand stay byte for
byte as they were when another customer is provisioned beside them.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import Engine

from bot.commands.catalog import build_registry
from bot.commands.provision import onboarding_reply
from core.billing import Billing
from core.errors import DbopsError
from core.fleet import Fleet
from core.remote import RunnerPool
from tests import test_billing, test_provisioning
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    admin,
    drop_everything,
    query,
    restore_server_logs,
)
from tests.test_billing import checkout_session, event, sign
from tests.test_pgbouncer import _auth_file, reload_pgbouncer
from tests.test_provisioning import (
    CAROL,
    Inbox,
    emailed_password,
    provisioner,
    through_pgbouncer,
)

# Fixtures shared with the provisioning and billing tests.
pool, smtp = test_provisioning.pool, test_provisioning.smtp
billing, stub, fleet = test_billing.billing, test_billing.stub, test_billing.fleet

EMAIL = "dba@newco.example.com"


def hand_name(prefix: str = "hand") -> str:
    return f"{prefix}_{secrets.token_hex(3)}"


def pgbouncer_files(where: Fleet, server: str) -> dict[Path, bytes]:
    """The server's pgbouncer.ini and auth_file, byte for byte."""
    s = where.server(server)
    assert s.pgbouncer_ini
    ini = Path(s.pgbouncer_ini)
    return {ini: ini.read_bytes(), _auth_file(s): _auth_file(s).read_bytes()}


def roles_and_databases(sandbox: dict[str, Any], server: str) -> set[str]:
    return {
        name
        for (name,) in query(
            admin(sandbox, server),
            "SELECT rolname FROM pg_roles UNION SELECT datname FROM pg_database",
        )
    }


@pytest.fixture
def put_back(sandbox: dict[str, Any], sandbox_fleet: Fleet) -> Iterator[None]:
    """Whatever a test does to the sandbox is undone: every server's pgBouncer files back byte
    for byte (reloaded), and the roles, databases and backups it made dropped."""
    servers = [spec["name"] for spec in sandbox["servers"]]
    files = {server: pgbouncer_files(sandbox_fleet, server) for server in servers}
    had = {server: roles_and_databases(sandbox, server) for server in servers}
    yield
    for server in servers:
        for path, content in files[server].items():
            if path.read_bytes() != content:
                path.write_bytes(content)  # in place: owner and mode stay
        reload_pgbouncer(sandbox_fleet.server(server))
        for name in roles_and_databases(sandbox, server) - had[server]:
            drop_everything(admin(sandbox, server), name)
        spec = next(s for s in sandbox["servers"] if s["name"] == server)
        for name in Path(spec["backup_path"]).iterdir():
            if name.is_dir() and name.name.startswith(("newco_", "hand_", "pgbouncer")):
                shutil.rmtree(name, ignore_errors=True)


def refused(excinfo: pytest.ExceptionInfo[DbopsError]) -> str:
    """What the person sees: the message and what to do."""
    return f"{excinfo.value.message} {excinfo.value.hint or ''}"


# --- names reserved everywhere --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("pgbouncer", "pgBouncer's own admin user"),
        ("postgres", "PostgreSQL's superuser"),
        ("template1", "template databases"),
        ("pg_foo", "start with pg_"),
    ],
)
def test_reserved_names_are_refused_before_anything_is_made(
    name: str,
    why: str,
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    put_back: None,
) -> None:
    before = pgbouncer_files(sandbox_fleet, "vps1")
    had = roles_and_databases(sandbox, "vps1")
    p = provisioner(sqlite_engine, sandbox_fleet, pool, smtp[1])
    with pytest.raises(DbopsError) as err:
        p.provision(name, "small", "vps1", email=EMAIL, actor=CAROL)
    said = refused(err)
    assert f"`{name}` is reserved" in said and why in said, said
    assert "choose another customer name" in said and "/db provision <name>" in said, said
    assert p.job(name) is None  # nothing started: no job, no role, no pgBouncer line
    assert roles_and_databases(sandbox, "vps1") == had
    assert pgbouncer_files(sandbox_fleet, "vps1") == before
    assert smtp[0].messages == []


def test_the_fleets_monitoring_and_admin_roles_are_refused(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    put_back: None,
) -> None:
    monitor = str(conninfo_to_dict(sandbox_fleet.server("vps1").dsn)["user"])
    # Another server's admin role (fleet.toml's admin_dsn) is refused on vps1 as well.
    vps2 = sandbox_fleet.server("vps2")
    admin_role = hand_name("ops_admin")
    renamed = vps2.model_copy(
        update={"admin_dsn": make_conninfo(vps2.admin_dsn or vps2.dsn, user=admin_role)}
    )
    servers = [renamed if s.name == "vps2" else s for s in sandbox_fleet.servers]
    before = pgbouncer_files(sandbox_fleet, "vps1")
    p = provisioner(
        sqlite_engine, sandbox_fleet.model_copy(update={"servers": servers}), pool, smtp[1]
    )
    for name, what in ((monitor, "monitoring role"), (admin_role, "admin role")):
        with pytest.raises(DbopsError) as err:
            p.provision(name, "small", "vps1", email=EMAIL, actor=CAROL)
        said = refused(err)
        assert f"`{name}` is reserved" in said and what in said and "fleet.toml" in said, said
        assert "choose another customer name" in said
        assert p.job(name) is None
    assert admin_role not in roles_and_databases(sandbox, "vps1")
    assert pgbouncer_files(sandbox_fleet, "vps1") == before


# --- names a server's pgBouncer already has -----------------------------------------------------


def _add_by_hand(sandbox_fleet: Fleet, where: str, name: str) -> None:
    """Put ``name`` in vps1's pgBouncer files as an operator would by hand, dbops unaware."""
    server = sandbox_fleet.server("vps1")
    assert server.pgbouncer_ini
    ini, users = Path(server.pgbouncer_ini), _auth_file(server)
    pg = conninfo_to_dict(server.admin_dsn or server.dsn)
    if where == "databases":
        text = ini.read_text()
        alias = f"{name} = host=127.0.0.1 port={pg['port']} dbname=postgres pool_size=2\n"
        ini.write_text(text.replace("[databases]\n", f"[databases]\n{alias}", 1))
    elif where == "include":  # an alias in a file pgbouncer.ini includes
        extra = ini.with_name(f"{name}.ini")
        extra.write_text(
            f"[databases]\n{name} = host=127.0.0.1 port={pg['port']} dbname=postgres\n"
        )
        shutil.chown(extra, "postgres", "postgres")
        ini.write_text(ini.read_text() + f"%include {extra}\n")
    elif where == "auth_file":
        users.write_text(users.read_text() + f'"{name}" "md5{"0" * 32}"\n')
    else:  # admin_users, stats_users: a console user of someone's
        lines = ini.read_text().splitlines(keepends=True)
        at = next(i for i, ln in enumerate(lines) if ln.startswith(f"{where} ="))
        lines[at] = lines[at].rstrip("\n") + f", {name}\n"
        ini.write_text("".join(lines))


@pytest.mark.parametrize(
    ("where", "said_of_it"),
    [
        ("databases", "[databases] entry in"),
        ("include", "[databases] entry in"),
        ("auth_file", "auth_file"),
        ("admin_users", "admin_users"),
        ("stats_users", "stats_users"),
    ],
)
def test_a_name_in_the_servers_pgbouncer_is_refused(
    where: str,
    said_of_it: str,
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    put_back: None,
) -> None:
    name = hand_name()
    _add_by_hand(sandbox_fleet, where, name)
    before = pgbouncer_files(sandbox_fleet, "vps1")
    p = provisioner(sqlite_engine, sandbox_fleet, pool, smtp[1])
    with pytest.raises(DbopsError) as err:
        p.provision(name, "small", "vps1", email=EMAIL, actor=CAROL)
    said = refused(err)
    assert f"`{name}` is taken on vps1" in said and said_of_it in said, said
    assert "not made by dbops" in said and "choose another customer name" in said, said
    assert p.job(name) is None and name not in roles_and_databases(sandbox, "vps1")
    assert pgbouncer_files(sandbox_fleet, "vps1") == before
    assert smtp[0].messages == []
    Path(sandbox_fleet.server("vps1").pgbouncer_ini or "").with_name(f"{name}.ini").unlink(
        missing_ok=True
    )


@pytest.mark.parametrize("where", ["databases", "auth_file"])
def test_an_entry_made_by_hand_mid_job_is_never_repointed(
    where: str,
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    put_back: None,
) -> None:
    """The names were checked, then someone added the customer's alias (or auth_file user) by
    hand before pgBouncer's step: the run stops there and leaves that line alone."""
    name = hand_name("newco")
    p = provisioner(sqlite_engine, sandbox_fleet, pool, smtp[1])
    p.failpoints.add("after:privileges")
    with pytest.raises(DbopsError, match="stopped at privileges"):
        p.provision(name, "small", "vps1", email=EMAIL, actor=CAROL)
    _add_by_hand(sandbox_fleet, where, name)
    before = pgbouncer_files(sandbox_fleet, "vps1")
    p.failpoints.clear()
    with pytest.raises(DbopsError) as err:
        p.provision(name, "small", "vps1", email=EMAIL, actor=CAROL)
    said = refused(err)
    assert "stopped at pgbouncer" in said and "not made by dbops" in said, said
    assert pgbouncer_files(sandbox_fleet, "vps1") == before
    assert smtp[0].messages == []


def test_entries_made_by_hand_are_untouched_byte_for_byte(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    put_back: None,
) -> None:
    server = sandbox_fleet.server("vps1")
    assert server.pgbouncer_ini
    ini, users = Path(server.pgbouncer_ini), _auth_file(server)
    pg = conninfo_to_dict(server.admin_dsn or server.dsn)
    seeded = next(c for c in sandbox["customers"] if c["server"] == "vps1")
    alias = hand_name("reporting")
    # An operator's own alias (to a seeded customer's database), with comments and spacing of
    # their own; an auth_file with a comment, a blank line and a line with trailing text.
    ini.write_text(
        ini.read_text().replace(
            "[databases]\n",
            "[databases]\n"
            "; reporting replica alias, added by hand (ticket OPS-12)\n"
            f"{alias}   =   host=127.0.0.1 port={pg['port']} dbname={seeded['database']}"
            " pool_size=3\n",
            1,
        )
    )
    users.write_text(f'{users.read_text()}\n; added by hand\n"ops_readonly" "md5{"1" * 32}" x\n')
    reload_pgbouncer(server)
    ini_before, users_before = ini.read_bytes(), users.read_bytes()

    name = hand_name("newco")
    inbox, url = smtp
    result = provisioner(sqlite_engine, sandbox_fleet, pool, url).provision(
        name, "small", "vps1", email=EMAIL, actor=CAROL
    )
    assert result.port == server.pgbouncer_port

    # Only dbops's own lines were added: take them out and the files are as they were.
    ini_after, users_after = ini.read_bytes(), users.read_bytes()
    kept = ini_before.splitlines(keepends=True)
    ours_ini = [ln for ln in ini_after.splitlines(keepends=True) if ln not in kept]
    assert [ln.decode() for ln in ours_ini] == [
        f"; dbops: {name}\n",
        f"{name} = host={pg['host']} port={pg['port']} dbname={name}\n",
    ]
    assert ini_after.replace(b"".join(ours_ini), b"", 1) == ini_before
    ours_users = [
        ln for ln in users_after.splitlines(keepends=True) if ln.startswith(f'"{name}" '.encode())
    ]
    assert len(ours_users) == 1 and ours_users[0].rstrip().endswith(b"; dbops")
    assert users_after.replace(ours_users[0], b"", 1) == users_before

    # Both work through pgBouncer: the new customer with the emailed password, and the alias
    # made by hand, still pointing where its owner put it.
    (mail,) = inbox.messages
    conninfo = through_pgbouncer(sandbox_fleet, "vps1", name, emailed_password(mail))
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (name,)
    by_hand = (
        f"host=127.0.0.1 port={server.pgbouncer_port} dbname={alias} user={seeded['role']}"
        " connect_timeout=5"
    )
    with psycopg.connect(by_hand) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (seeded["database"],)


# --- names from Stripe -------------------------------------------------------------------------


def test_a_stripe_business_named_pgbouncer_is_not_proposed_as_pgbouncer(billing: Billing) -> None:
    details = {**checkout_session()["customer_details"], "business_name": "PgBouncer"}
    session = checkout_session(
        id="cs_test_pgb", customer_details=details, metadata={"plan": "small"}
    )
    body = event("checkout.session.completed", session, "evt_pgbouncer")
    p = billing.handle_webhook(body, sign(body)).proposal
    assert p is not None
    assert p.customer != "pgbouncer" and p.customer == "jenny_rosen"  # the next hint
    (warning,) = [w for w in p.warnings if "reserved" in w]
    assert "`pgbouncer`" in warning and "business name" in warning
    assert "pgBouncer's own admin user" in warning

    card = onboarding_reply(p, build_registry())
    message = str(card.message())
    assert "pgBouncer's own admin user" in message
    assert "provision pgbouncer " not in message  # no button carries it


def test_a_stripe_checkout_with_only_reserved_names_says_the_name_must_be_chosen(
    billing: Billing,
) -> None:
    details = {
        **checkout_session()["customer_details"],
        "business_name": "PgBouncer",
        "name": "Postgres",
        "email": "template1@gmail.com",
    }
    session = checkout_session(
        id="cs_test_pgb2", customer_details=details, metadata={"plan": "small"}
    )
    body = event("checkout.session.completed", session, "evt_pgbouncer2")
    p = billing.handle_webhook(body, sign(body)).proposal
    assert p is not None and p.customer is None and not p.ready
    reserved = [w for w in p.warnings if "reserved" in w]
    assert len(reserved) == 3, p.warnings
    card = onboarding_reply(p, build_registry())
    assert not [b for b in card.message()["blocks"] if b["type"] == "actions"]  # no Provision
    assert "type `/db provision <customer> --plan <plan> --email <address>`" in str(card.message())
