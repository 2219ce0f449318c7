"""Provisioning (SOP-103) on the sandbox over SSH, with a real SMTP server on loopback.

The password must reach the customer once, in the welcome email, and nowhere else: not the
event log, not a message to the channel, not an error, not the application log, not the
PostgreSQL server log. A run that fails half-way is finished by running it again: one role,
one database, one welcome email.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message as MailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller
from psycopg import sql
from sqlalchemy import Engine

from core.customers import Customer, get_customer, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.notify import Message, RecordingNotifier
from core.provisioning import (
    ForeignEntry,
    Provisioner,
    pgbouncer_with_database,
    read_remote_file,
    rewrite_remote_file,
    scram_sha256_secret,
    userlist_with,
)
from core.remote import RunnerPool
from storage.events import EventLog, canonical
from storage.models_billing import billing_account
from tests.pgserver import free_port
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    admin,
    drop_everything,
    query,
    restore_server_logs,
)
from tests.test_pgbouncer import forget, registrations

CAROL = "U0CAROL"  # the admin who presses Provision
OPS = "#db-ops"


@dataclass
class Inbox:
    messages: list[MailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.original_content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, str]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, f"smtp://127.0.0.1:{port}?from=jeremy@costplusdb.example"
    finally:
        controller.stop()


@pytest.fixture
def pool(sandbox_fleet: Fleet, sqlite_engine: Engine) -> Iterator[RunnerPool]:
    events = EventLog(sqlite_engine)
    with RunnerPool(
        sandbox_fleet, record=lambda k, s, p: events.append(k, s, p, actor="dbops")
    ) as runners:
        yield runners


@pytest.fixture
def sandbox_customers(sandbox: dict[str, Any], sqlite_engine: Engine) -> None:
    upsert_customers(
        sqlite_engine,
        [
            Customer(c["name"], c["server"], c["database"], c["role"], c["plan"], c["email"])
            for c in sandbox["customers"]
        ],
    )


@pytest.fixture
def newcomer(sandbox: dict[str, Any], sandbox_fleet: Fleet) -> Iterator[str]:
    """A name for a new customer; whatever provisioning made of it is dropped afterwards
    (its pgBouncer entry and auth_file line too)."""
    name = f"newco_{secrets.token_hex(3)}"
    yield name
    for spec in sandbox["servers"]:
        forget(sandbox_fleet.server(spec["name"]), name)
        drop_everything(admin(sandbox, spec["name"]), name)
        shutil.rmtree(Path(spec["backup_path"]) / name, ignore_errors=True)


def through_pgbouncer(fleet: Fleet, server: str, name: str, password: str) -> str:
    """The customer's connection as the welcome email gives it: pgBouncer's port."""
    port = fleet.server(server).pgbouncer_port
    return f"host=127.0.0.1 port={port} dbname={name} user={name} password={password}"


def provisioner(
    engine: Engine, fleet: Fleet, pool: RunnerPool, smtp_url: str | None
) -> Provisioner:
    return Provisioner(engine, EventLog(engine), fleet, pool, smtp_url=smtp_url)


def body_of(msg: MailMessage) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def emailed_password(msg: MailMessage) -> str:
    found = re.search(r"^Password: (\S+)\r?$", body_of(msg), re.MULTILINE)
    assert found, body_of(msg)
    return found.group(1)


def scram_matches(secret: str, password: str) -> bool:
    """RFC 5802 checked independently of the code under test: StoredKey = H(HMAC(salted,
    "Client Key")), salted = PBKDF2-HMAC-SHA256(password, salt, iterations)."""
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", secret)
    assert m, secret
    iterations, salt, stored = int(m[1]), base64.b64decode(m[2]), base64.b64decode(m[3])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hashlib.sha256(client).digest() == stored


def server_state(sandbox: dict[str, Any], server: str, name: str) -> dict[str, Any]:
    root = admin(sandbox, server)
    roles = query(
        root,
        "SELECT rolpassword, rolconnlimit, rolcanlogin FROM pg_authid WHERE rolname = %s",
        name,
    )
    dbs = query(
        root,
        "SELECT pg_get_userbyid(datdba), has_database_privilege('public', oid, 'CONNECT'),"
        " has_database_privilege('dbops_monitor', oid, 'CONNECT') FROM pg_database"
        " WHERE datname = %s",
        name,
    )
    public_postgres = query(root, "SELECT has_database_privilege('public', 'postgres', 'CONNECT')")[
        0
    ][0]
    return {"roles": roles, "dbs": dbs, "public_postgres": public_postgres}


def test_scram_secret_is_what_postgresql_computes(sandbox: dict[str, Any]) -> None:
    """PostgreSQL hashes a password itself; our function, given its salt, gives the same."""
    root = admin(sandbox, "vps1")
    name = f"scram_{secrets.token_hex(3)}"
    try:
        query(root, sql.SQL("CREATE ROLE {} PASSWORD 'correct horse'").format(sql.Identifier(name)))
        (stored,) = query(root, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", name)[0]
        salt = base64.b64decode(stored.split("$")[1].split(":")[1])
        assert scram_sha256_secret("correct horse", salt=salt) == stored
    finally:
        query(root, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_propose_server_picks_the_one_with_most_room(
    sqlite_engine: Engine, sandbox_fleet: Fleet, pool: RunnerPool, sandbox_customers: None
) -> None:
    p = provisioner(sqlite_engine, sandbox_fleet, pool, None)
    proposal = p.propose_server("small")
    assert [c.reachable for c in proposal.candidates] == [True, True, True]
    # One machine under all three, so the plans promised decide: vps1 holds small + large,
    # vps2 small + medium, vps3 small + medium; a tie goes to the first by name.
    committed = {
        c.server: (c.committed_ram_mb, c.committed_storage_gb) for c in proposal.candidates
    }
    assert committed == {"vps1": (5120, 70), "vps2": (3072, 35), "vps3": (3072, 35)}
    assert proposal.server == "vps2" and proposal.candidates[0].server == "vps2"
    loads = {c.server: c.load_after for c in proposal.candidates}
    assert loads["vps2"] == min(loads.values()) < loads["vps1"]  # type: ignore[operator]

    huge = sandbox_fleet.model_copy(
        update={
            "plans": {
                **sandbox_fleet.plans,
                "huge": sandbox_fleet.plans["small"].model_copy(update={"ram_mb": 10**8}),
            }
        }
    )
    none = provisioner(sqlite_engine, huge, pool, None).propose_server("huge")
    assert none.server is None and "no server has room" in none.reason and "RAM" in none.reason


def test_provision_twice_after_a_failure_makes_one_of_each_and_leaks_no_password(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    sandbox_customers: None,
    newcomer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    inbox, url = smtp
    channel = RecordingNotifier()  # what the Slack surface would post as the steps go by
    p = provisioner(sqlite_engine, sandbox_fleet, pool, url)

    def progress(step: str, detail: str) -> None:
        channel.post(OPS, Message(f"{newcomer}: {step} {detail}".strip()))

    log_path = Path(next(s for s in sandbox["servers"] if s["name"] == "vps2")["log_path"])
    log_start = log_path.stat().st_size
    p.failpoints.add("after:role")
    with pytest.raises(DbopsError, match="stopped at role") as first:
        p.provision(
            newcomer, "small", "vps2", email="ops@newco.example.com", actor=CAROL,
            stripe_customer="cus_NewCo01", progress=progress,
        )  # fmt: skip
    halfway = server_state(sandbox, "vps2", newcomer)
    assert len(halfway["roles"]) == 1 and halfway["dbs"] == [] and inbox.messages == []
    first_secret = halfway["roles"][0][0]

    p.failpoints.clear()
    result = p.provision(
        newcomer, "small", "vps2", email="ops@newco.example.com", actor=CAROL,
        stripe_customer="cus_NewCo01", progress=progress,
    )  # fmt: skip
    again = p.provision(newcomer, "small", "vps2", email="ops@newco.example.com", actor=CAROL)

    assert result.resumed and not result.already_done and again.already_done
    assert result.port == again.port == sandbox_fleet.server("vps2").pgbouncer_port
    assert result.steps[-1] == "welcome" and set(result.steps) >= {"role", "database", "pgbouncer"}
    # One role (SCRAM, the plan's connection limit), one database owned by it, closed to PUBLIC.
    state = server_state(sandbox, "vps2", newcomer)
    ((secret, limit, login),) = state["roles"]
    assert secret.startswith("SCRAM-SHA-256$") and limit == 20 and login
    assert state["dbs"] == [(newcomer, False, True)]
    assert state["public_postgres"] is False
    # One welcome email, in SOP-102's words, with a password that is the role's password now
    # (not the first run's, which nobody ever saw).
    (mail,) = inbox.messages
    assert mail["To"] == "ops@newco.example.com"
    assert mail["Subject"] == "Sandbox Hosting: your database is ready"  # fleet's [business]
    # The sandbox's clusters and pgBouncers offer no SSL: the email says so, and its connection
    # string does not ask for it (sslmode=require would fail there).
    assert "\nSSL: not offered by this server\n" in body_of(mail).replace("\r\n", "\n")
    assert "sslmode" not in body_of(mail)
    password = emailed_password(mail)
    assert scram_matches(secret, password) and not scram_matches(first_secret, password)
    # SOP-103 step 6: the customer connects through pgBouncer (the port the email gives), with
    # the emailed password, after provisioning registered the database and reloaded it.
    bouncer = sandbox_fleet.server("vps2").pgbouncer_port
    assert f"postgresql://{newcomer}:{password}@127.0.0.1:{bouncer}/" in body_of(mail)
    with psycopg.connect(through_pgbouncer(sandbox_fleet, "vps2", newcomer, password)) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            newcomer,
            newcomer,
        )
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(through_pgbouncer(sandbox_fleet, "vps2", newcomer, password + "x"))
    assert registrations(sandbox_fleet.server("vps2"), newcomer) == (1, 1)
    port = next(s for s in sandbox["servers"] if s["name"] == "vps2")["port"]
    with psycopg.connect(
        f"host=127.0.0.1 port={port} dbname={newcomer} user={newcomer} password={password}"
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (newcomer,)
    # Backups and monitoring on: the customer row, a first backup; the Stripe link for credits.
    c = get_customer(sqlite_engine, newcomer)
    assert (c.server, c.plan, c.status) == ("vps2", "small", "active")
    assert (
        Path(next(s for s in sandbox["servers"] if s["name"] == "vps2")["backup_path"]) / newcomer
    ).is_dir()
    account = billing_account(sqlite_engine, newcomer)
    assert account is not None and account.stripe_customer == "cus_NewCo01"
    job = p.job(newcomer)
    assert job is not None and (job.status, job.welcome, job.attempts) == ("done", "sent", 2)

    # The password went nowhere else.
    events = EventLog(sqlite_engine)
    stored = [canonical(e.as_json()) for e in events.iter_all()]
    assert len(stored) > 20
    messages = [s.message.text for s in channel.sent]
    assert any("welcome" in m for m in messages)
    leaks = {
        "event log": stored,
        "channel messages": messages,
        "first error": [str(first.value)],
        "result": [json.dumps(result.as_json()), result.summary()],
        # Every log record but the test SMTP server's own (it logs the DATA it receives).
        "application log": [r.getMessage() for r in caplog.records if r.name != "mail.log"],
        "server log": [log_path.read_bytes()[log_start:].decode("utf-8", "replace")],
    }
    for where, texts in leaks.items():
        for text in texts:
            assert password not in text, f"password found in the {where}"
            assert secret.split("$", 1)[1] not in text, f"SCRAM secret found in the {where}"
    assert [e.kind for e in events.query(kind="email.sent", limit=5)] == ["email.sent"]
    assert events.query(kind="provision.failed", limit=5)[0].payload["step"] == "role"


def test_a_rerun_after_pgbouncer_registration_keeps_one_entry_with_the_new_password(
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    newcomer: str,
) -> None:
    inbox, url = smtp
    vps1 = sandbox_fleet.server("vps1")
    p = provisioner(sqlite_engine, sandbox_fleet, pool, url)
    p.failpoints.add("after:connection_test")  # registered, reloaded, logged in through it
    with pytest.raises(DbopsError, match="stopped at connection_test"):
        p.provision(newcomer, "small", "vps1", email="x@newco.example.com", actor=CAROL)
    assert registrations(vps1, newcomer) == (1, 1)
    ini_before = Path(vps1.pgbouncer_ini or "").read_text()

    p.failpoints.clear()
    result = p.provision(newcomer, "small", "vps1", email="x@newco.example.com", actor=CAROL)

    # The entry is there once, as it was; the auth_file line now holds the new password's
    # secret, and pgBouncer took it on reload: the emailed password gets in through it.
    assert result.port == vps1.pgbouncer_port
    assert registrations(vps1, newcomer) == (1, 1)
    assert Path(vps1.pgbouncer_ini or "").read_text() == ini_before
    (mail,) = inbox.messages
    password = emailed_password(mail)
    with psycopg.connect(through_pgbouncer(sandbox_fleet, "vps1", newcomer, password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (newcomer,)


def test_smtp_down_then_up_sends_one_email_with_a_fresh_password(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    newcomer: str,
) -> None:
    inbox, url = smtp
    down = provisioner(sqlite_engine, sandbox_fleet, pool, f"smtp://127.0.0.1:{free_port()}")
    with pytest.raises(DbopsError, match="stopped at welcome"):
        down.provision(newcomer, "medium", "vps1", email="dba@newco.example.com", actor=CAROL)
    job = down.job(newcomer)
    assert job is not None and job.welcome == "failed" and inbox.messages == []

    up = provisioner(sqlite_engine, sandbox_fleet, pool, url)
    up.provision(newcomer, "medium", "vps1", email="dba@newco.example.com", actor=CAROL)
    (mail,) = inbox.messages
    ((secret, limit, _),) = server_state(sandbox, "vps1", newcomer)["roles"]
    assert scram_matches(secret, emailed_password(mail)) and limit == 50


def test_a_run_that_died_while_sending_does_not_send_blindly(
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    newcomer: str,
) -> None:
    inbox, url = smtp
    p = provisioner(sqlite_engine, sandbox_fleet, pool, url)
    p.failpoints.add("after:first_backup")
    with pytest.raises(DbopsError):
        p.provision(newcomer, "small", "vps3", email="x@newco.example.com", actor=CAROL)
    p._update(newcomer, welcome="sending")  # as if the process died mid-send
    p.failpoints.clear()
    with pytest.raises(DbopsError, match="may have been delivered"):
        p.provision(newcomer, "small", "vps3", email="x@newco.example.com", actor=CAROL)
    assert inbox.messages == []
    p.provision(
        newcomer, "small", "vps3", email="x@newco.example.com", actor=CAROL, resend_welcome=True
    )
    assert len(inbox.messages) == 1


def test_a_role_not_made_by_dbops_is_left_alone(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    smtp: tuple[Inbox, str],
    newcomer: str,
) -> None:
    root = admin(sandbox, "vps1")
    query(root, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(newcomer)))
    p = provisioner(sqlite_engine, sandbox_fleet, pool, smtp[1])
    with pytest.raises(DbopsError, match="already has a role named"):
        p.provision(newcomer, "small", "vps1", email="x@newco.example.com", actor=CAROL)
    ((secret, _, login),) = server_state(sandbox, "vps1", newcomer)["roles"]
    assert secret is None and login is False  # untouched


def test_existing_customer_and_changed_arguments_are_refused(
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,
    sandbox_customers: None,
    newcomer: str,
) -> None:
    p = provisioner(sqlite_engine, sandbox_fleet, pool, None)
    with pytest.raises(DbopsError, match="already a customer"):
        p.provision("acme", "small", "vps1", email="x@acme.example.com", actor=CAROL)
    with pytest.raises(DbopsError, match="not an email"):
        p.provision(newcomer, "small", "vps1", email="nope", actor=CAROL)
    with pytest.raises(DbopsError, match="no plan"):
        p.provision(newcomer, "gigantic", "vps1", email="x@n.example.com", actor=CAROL)
    p.failpoints.add("after:names")
    with pytest.raises(DbopsError):
        p.provision(newcomer, "small", "vps1", email="x@n.example.com", actor=CAROL)
    with pytest.raises(DbopsError, match="started on vps1, not vps2"):
        p.provision(newcomer, "small", "vps2", email="x@n.example.com", actor=CAROL)


# --- pgBouncer ---------------------------------------------------------------------------------

INI = """;; pgbouncer.ini
[databases]
acme = host=127.0.0.1 port=5432 dbname=acme

[pgbouncer]
listen_port = 6432
auth_type = scram-sha-256
auth_file = /etc/pgbouncer/userlist.txt
"""


def test_pgbouncer_entry_is_added_once_marked_and_only_ours_is_replaced() -> None:
    added = pgbouncer_with_database(INI, "newco", "host=127.0.0.1 port=5432 dbname=newco")
    assert added is not None
    assert added.splitlines()[1:5] == [
        "[databases]",
        "acme = host=127.0.0.1 port=5432 dbname=acme",
        "; dbops: newco",  # the entry is dbops's: the only kind it ever rewrites
        "newco = host=127.0.0.1 port=5432 dbname=newco",
    ]
    ours = "; dbops: newco\nnewco = host=127.0.0.1 port=5432 dbname=newco\n"
    assert added.replace(ours, "") == INI  # every other byte as it was
    assert pgbouncer_with_database(added, "newco", "host=127.0.0.1 port=5432 dbname=newco") is None
    moved = pgbouncer_with_database(added, "newco", "host=127.0.0.1 port=5433 dbname=newco")
    assert moved is not None and moved.count("newco =") == 1 and "port=5433" in moved
    assert moved.count("; dbops: newco") == 1
    bare = pgbouncer_with_database("[pgbouncer]\nlisten_port = 6432\n", "x1", "dbname=x1")
    assert bare is not None and "[databases]\n; dbops: x1\nx1 = dbname=x1" in bare
    # acme's entry was not made by dbops: never repointed.
    with pytest.raises(ForeignEntry, match="did not make"):
        pgbouncer_with_database(added, "acme", "host=127.0.0.1 port=5433 dbname=acme")

    users = userlist_with('"acme" "SCRAM-SHA-256$a"\n\n', "newco", "SCRAM-SHA-256$b")
    assert users == '"acme" "SCRAM-SHA-256$a"\n\n"newco" "SCRAM-SHA-256$b" ; dbops\n'
    again = userlist_with(users, "newco", "SCRAM-SHA-256$c")
    assert again == '"acme" "SCRAM-SHA-256$a"\n\n"newco" "SCRAM-SHA-256$c" ; dbops\n'
    with pytest.raises(ForeignEntry, match="did not make"):
        userlist_with(users, "acme", "SCRAM-SHA-256$d")


def test_remote_rewrite_keeps_owner_and_mode(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, pool: RunnerPool
) -> None:
    spec = next(s for s in sandbox["servers"] if s["name"] == "vps1")
    path = Path(spec["backup_path"]).parent / f"pgbouncer-{secrets.token_hex(3)}.ini"
    path.write_text(INI)
    shutil.chown(path, "postgres", "postgres")
    path.chmod(0o640)
    try:
        runner = pool.get("vps1")
        text = read_remote_file(runner, str(path))
        changed = pgbouncer_with_database(text, "newco", "host=127.0.0.1 port=5432 dbname=newco")
        assert changed is not None
        rewrite_remote_file(runner, str(path), changed)
        assert path.read_text() == changed
        assert path.stat().st_mode & 0o777 == 0o640 and path.owner() == "postgres"
    finally:
        path.unlink(missing_ok=True)
