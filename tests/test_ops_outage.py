"""A restore, a provisioning and a restart, each cut off from the event log at every event it
writes (issue 15).

The event log's PostgreSQL sits behind a proxy (tests/event_outage.py); the line is cut just
before the INSERT of one chosen event of the operation, inside its transaction, and stays cut
until the operation has returned: the event database restarting under it. Events after a side
effect are written best-effort into the spool (storage/spool.py), so the operation must end
done, never half-done: the customer's database restored (its data the backup's, open, a real
connection through pgBouncer lands in it, the replaced one kept closed and nothing else left
behind), provisioned (role, database, pgBouncer entries once each, a login with the emailed
password), or the server restarted and answering. Its message says what state it reached and
that its record comes later. Once the log is back, every event of it is there exactly once, in
the order it happened, and the chain verifies.

Each parametrised list is built from the code (``RESTORE_STEPS``, ``STEPS``) and checked against
what a run actually stored, so a step added to an operation without a test here fails.

The operations run on the session sandbox (real clusters, sshds, pgBouncers) and leave it as
they found it.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, event

from bot.commands.catalog import build_registry
from bot.commands.provision import provisioned_reply
from bot.commands.restart import restarted_reply
from bot.commands.restore import _done_reply
from core.backups import RESTORE_STEPS, Backups, RestoreFailed, RestoreResult
from core.customers import Customer, customer_from_mapping, upsert_customers
from core.fleet import Fleet
from core.incidents import Incidents
from core.ops import Ops
from core.provisioning import STEPS, Provisioner, scram_sha256_secret
from core.restarts import Restarts
from core.sandbox import customer_conninfo
from core.settings import load_settings
from storage.db import make_engine
from storage.events import EventLog, StoredEvent, breaker_for
from storage.migrate import upgrade
from storage.spool import RECORD_LATER, Spool, flush_spool, record, use_spool
from tests.event_outage import EventOutage
from tests.pgserver import wait_until
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    EXPECTED_ROWS,
    Seeded,
    admin,
    drop_everything,
    live_counts,
    query,
    restore_server_logs,
    seeded_customer,
)
from tests.test_health_checks import fleet_for
from tests.test_pgbouncer import forget, registered, registrations
from tests.test_provisioning import Inbox, emailed_password, smtp  # noqa: F401  (fixture)

pytestmark = pytest.mark.postgres

CAROL, ALICE = "U0CAROL", "U0ALICE"  # the admin who restores and provisions; the operator
RESTORE_SERVER, PROVISION_SERVER, RESTART_SERVER = "vps3", "vps2", "vps2"
COMMAND = "remote.command"  # every command an operation runs on a server is one


# --- cutting the line at one event ---------------------------------------------------------------


def cut_at(outage: EventOutage, kind: str, step: str | None = None, mode: str = "refuse") -> Any:
    """Cut the event log's line just before the first INSERT of ``kind`` (with payload
    ``step``, when given), until ``heal``; the returned flag is set once it has been cut."""
    fired = threading.Event()
    if mode == "refuse":
        # A refused connection costs nothing: probe the log often, so that the test does not
        # wait out the production back-off once it is healed (a black hole keeps it: each
        # probe into one waits for the log's deadline).
        quick = breaker_for(outage.engine)
        quick.first = quick.longest = 0.1

    def before(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if fired.is_set() or not statement.startswith("INSERT INTO events"):
            return
        columns = [c.strip() for c in statement.split("(", 1)[1].split(")", 1)[0].split(",")]
        at_kind, at_payload = columns.index("kind"), columns.index("payload")
        for row in params if isinstance(params, list) else [params]:
            if row[at_kind] != kind:
                continue
            if step is not None and json.loads(row[at_payload]).get("step") != step:
                continue
            fired.set()
            if mode == "refuse":
                outage.refuse()  # the database restarting: refused, open connections reset
            else:
                outage.blackhole()  # nothing answers: the append waits for its deadline
            return

    event.listen(outage.engine, "before_cursor_execute", before)
    return fired


@dataclass
class Logged:
    outage: EventOutage
    log: EventLog
    spool: Spool

    def back(self) -> list[StoredEvent]:
        """Heal the line, let the spool empty into the log; what the log holds (no probes)."""
        self.outage.heal()
        self.outage.wait_for_log(self.log)
        flush_spool(self.log)
        assert len(self.spool) == 0 and self.spool.refused() == []
        verdict = self.outage.verdict()
        assert verdict.ok, str(verdict)
        return [e for e in self.outage.stored() if e.kind != "probe"]


@pytest.fixture
def logged(event_outage: EventOutage, tmp_path: Path) -> Logged:
    """The event log that will be cut, with its spool in a file of the test's own."""
    spool = use_spool(event_outage.engine, Spool(tmp_path / "state" / "events.spool"))
    return Logged(event_outage, event_outage.events, spool)


@pytest.fixture(scope="module")
def fleet(sandbox_fleet: Fleet) -> Fleet:
    """The session sandbox, its commands run on this machine rather than over SSH: the same
    commands, clusters and pgBouncers, a third of the time (what is cut here is the event
    log, not the way to the servers; tests/test_restore.py and its kin go over SSH)."""
    return fleet_for(sandbox_fleet, "local")


@pytest.fixture
def ops(fleet: Fleet, sqlite_engine: Engine, logged: Logged) -> Iterator[Ops]:
    """As the bot has it: runners whose every command is an event in the log that is cut."""
    ops = Ops(fleet, sqlite_engine, logged.log)
    yield ops
    ops.close()


def assert_cut_then_stored(
    logged: Logged, fired: threading.Event, kind: str, step: str | None
) -> list[StoredEvent]:
    """The chosen event really was cut off (not in the log while it was down, and what came
    after it kept), and once the log is back everything is there, each event once."""
    assert fired.is_set(), f"the operation wrote no {kind} {step or ''}"
    if kind != COMMAND:  # one of each: the one cut off is not in the log yet
        early = logged.outage.stored()
        assert not [e for e in early if e.kind == kind and e.payload.get("step") == step]
    assert len(logged.spool) > 0
    stored = logged.back()
    keys = [(e.source, e.source_id) for e in stored]
    assert len(keys) == len(set(keys)), "an event was stored twice"
    return stored


def last_id(outage: EventOutage) -> int:
    stored = outage.stored()
    return stored[-1].id if stored else 0


def sequence(stored: list[StoredEvent], prefix: str) -> list[tuple[str, str | None]]:
    return [(e.kind, e.payload.get("step")) for e in stored if e.kind.startswith(prefix)]


# --- restore ------------------------------------------------------------------------------------

RESTORE_EVENTS = [
    ("restore.started", None),
    *[("restore.step", step) for step in RESTORE_STEPS],
    ("restore.done", None),
]
RESTORE_CUTS = [
    *[pytest.param(kind, step, "refuse", id=f"{kind}:{step}" if step else kind)
      for kind, step in RESTORE_EVENTS],
    pytest.param(COMMAND, None, "refuse", id=COMMAND),
    # The issue's own case, in a black hole: the INSERT goes out and nothing ever answers.
    pytest.param("restore.step", "swapped", "blackhole", id="restore.step:swapped-blackhole"),
]  # fmt: skip


@dataclass
class Restorable:
    seeded: Seeded
    backup: str
    through_pgbouncer: str  # the application's way in


@pytest.fixture(scope="module")
def restorable(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Restorable]:
    """A customer of the module's own on RESTORE_SERVER, registered in its pgBouncer with a
    password, and one backup of it (every restore here is from that backup)."""
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('restorable') / 'dbops.db'}")
    upgrade(engine)
    with seeded_customer(sandbox, RESTORE_SERVER, prefix="out") as seeded:
        password = secrets.token_urlsafe(16)
        query(
            seeded.admin,
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(seeded.name), sql.Literal(scram_sha256_secret(password))
            ),
        )
        upsert_customers(engine, [customer_of(seeded)])
        server = sandbox_fleet.server(RESTORE_SERVER)
        with registered(server, seeded.name, password) as through:
            taken = Backups(engine, EventLog(engine), sandbox_fleet).take_backup(seeded.name, CAROL)
            yield Restorable(seeded, taken.stamp, through)
    engine.dispose()


def customer_of(seeded: Seeded) -> Customer:
    return Customer(seeded.name, seeded.server, seeded.name, seeded.name, "small")


def databases_like(c: Seeded) -> list[str]:
    pattern = c.name.replace("_", "\\_") + "%"
    found = query(c.admin, "SELECT datname FROM pg_database WHERE datname LIKE %s", pattern)
    return sorted(r[0] for r in found)


def database_state(c: Seeded, name: str) -> tuple[int, bool] | None:
    rows = query(c.admin, "SELECT oid, datallowconn FROM pg_database WHERE datname = %s", name)
    return (int(rows[0][0]), bool(rows[0][1])) if rows else None


def accounts(conninfo: str) -> int:
    return int(query(conninfo, "SELECT count(*) FROM accounts")[0][0])


def bad_deploy(c: Seeded) -> None:
    """What is restored over: a row that should not be there, a table gone."""
    query(c.conninfo, "INSERT INTO accounts (email) VALUES ('oops@example.com')")
    query(c.conninfo, "DROP TABLE IF EXISTS app.child")


@pytest.fixture
def restore_target(restorable: Restorable, sqlite_engine: Engine) -> Iterator[Restorable]:
    """The customer as a bad deploy left it; afterwards only its own database remains."""
    upsert_customers(sqlite_engine, [customer_of(restorable.seeded)])
    bad_deploy(restorable.seeded)
    assert databases_like(restorable.seeded) == [restorable.seeded.name]
    yield restorable
    c = restorable.seeded
    for name in databases_like(c):
        if name != c.name:
            query(c.admin, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.parametrize(("kind", "step", "mode"), RESTORE_CUTS)
def test_a_restore_cut_off_from_the_log_at_any_step_ends_restored(
    logged: Logged,
    ops: Ops,
    sqlite_engine: Engine,
    fleet: Fleet,
    restore_target: Restorable,
    kind: str,
    step: str | None,
    mode: str,
) -> None:
    c = restore_target.seeded
    backups = Backups(sqlite_engine, logged.log, fleet, ops.runners)
    before = database_state(c, c.name)
    assert before is not None and accounts(c.conninfo) == EXPECTED_ROWS["public.accounts"] + 1
    fired = cut_at(logged.outage, kind, step, mode)

    result = backups.restore(c.name, restore_target.backup, c.name, CAROL)

    # Fully restored, whatever the log did: the backup's data under the customer's name, open,
    # reached by a real connection, straight and through pgBouncer.
    assert isinstance(result, RestoreResult) and result.steps == list(RESTORE_STEPS)
    now = database_state(c, c.name)
    assert now is not None and now[0] != before[0] and now[1] is True
    assert live_counts(c.conninfo) == EXPECTED_ROWS
    assert live_counts(restore_target.through_pgbouncer) == EXPECTED_ROWS
    # The replaced database kept, closed; nothing else (no restore copy, no failed swap).
    assert databases_like(c) == sorted([c.name, result.kept_as])
    assert database_state(c, result.kept_as) == (before[0], False)
    # It says what state it reached, and that its record comes when the log is back.
    assert not result.recorded and result.state == f"restored; {RECORD_LATER}"
    reply = _done_reply(result, CAROL)
    assert RECORD_LATER in reply.text and "Restored" in reply.text

    stored = assert_cut_then_stored(logged, fired, kind, step)
    assert sequence(stored, "restore.") == RESTORE_EVENTS  # all, once, in order
    assert {e.kind for e in stored} == {k for k, _ in RESTORE_EVENTS} | {COMMAND}
    assert {e.actor for e in stored if e.kind.startswith("restore.")} == {CAROL}


def test_a_restore_that_fails_after_the_swap_with_the_log_down_is_rolled_back(
    logged: Logged,
    ops: Ops,
    sqlite_engine: Engine,
    fleet: Fleet,
    restore_target: Restorable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a DbopsError (a bug, a library's own exception) after the swap, with the log cut
    off there: swapped back all the same, and the message says so."""
    c = restore_target.seeded
    backups = Backups(sqlite_engine, logged.log, fleet, ops.runners)
    before = database_state(c, c.name)
    rows_before = accounts(c.conninfo)
    fired = cut_at(logged.outage, "restore.step", "swapped")
    reload = backups._reload_pgbouncer

    def broken(runner: Any, server: Any) -> bool:
        if fired.is_set() and not broken.done:  # type: ignore[attr-defined]
            broken.done = True  # type: ignore[attr-defined]
            raise RuntimeError("a bug after the swap")
        return reload(runner, server)

    broken.done = False  # type: ignore[attr-defined]
    monkeypatch.setattr(backups, "_reload_pgbouncer", broken)

    with pytest.raises(RestoreFailed) as failed:
        backups.restore(c.name, restore_target.backup, c.name, CAROL)

    error = failed.value
    assert (error.step, error.original, error.rolled_back, error.recorded) == (
        "pgbouncer", "swapped back", True, False,
    )  # fmt: skip
    assert error.state.startswith("rolled back: the restored copy was swapped out again")
    assert RECORD_LATER in error.state
    assert isinstance(error.__cause__, RuntimeError)
    # Exactly as before: the same database, open, its data, nothing else left behind.
    assert database_state(c, c.name) == before
    assert accounts(c.conninfo) == rows_before
    assert query(c.conninfo, "SELECT to_regclass('app.child')") == [(None,)]
    assert accounts(restore_target.through_pgbouncer) == rows_before
    assert databases_like(c) == [c.name]

    stored = assert_cut_then_stored(logged, fired, "restore.step", "swapped")
    (done,) = [e for e in stored if e.kind == "restore.failed"]
    assert done.payload["original"] == "swapped back" and done.payload["step"] == "pgbouncer"
    last = [("restore.step", "swapped"), ("restore.failed", "pgbouncer")]
    assert sequence(stored, "restore.")[-2:] == last


# --- provisioning -------------------------------------------------------------------------------

PROVISION_EVENTS = [
    ("provision.started", None),
    *[("provision.step", step) for step in STEPS],
    ("provision.done", None),
]
# Besides its own: the commands it runs, the welcome email, the first backup.
PROVISION_OTHERS = [COMMAND, "email.sent", "backup.taken"]
PROVISION_CUTS = [
    *[pytest.param(kind, step, id=f"{kind}:{step}" if step else kind)
      for kind, step in PROVISION_EVENTS],
    *[pytest.param(kind, None, id=kind) for kind in PROVISION_OTHERS],
]  # fmt: skip


@pytest.fixture
def newcomer(sandbox: dict[str, Any], sandbox_fleet: Fleet, sqlite_engine: Engine) -> Iterator[str]:
    """A name for a new customer; whatever provisioning made of it is removed afterwards."""
    upsert_customers(sqlite_engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    name = f"outage_{secrets.token_hex(3)}"
    yield name
    spec = next(s for s in sandbox["servers"] if s["name"] == PROVISION_SERVER)
    forget(sandbox_fleet.server(PROVISION_SERVER), name)
    drop_everything(admin(sandbox, PROVISION_SERVER), name)
    shutil.rmtree(Path(spec["backup_path"]) / name, ignore_errors=True)


@pytest.mark.parametrize(("kind", "step"), PROVISION_CUTS)
def test_provisioning_cut_off_from_the_log_at_any_step_ends_provisioned(
    logged: Logged,
    ops: Ops,
    sqlite_engine: Engine,
    sandbox: dict[str, Any],
    fleet: Fleet,
    smtp: tuple[Inbox, str],  # noqa: F811  (the fixture, imported)
    newcomer: str,
    kind: str,
    step: str | None,
) -> None:
    inbox, url = smtp
    inbox.messages.clear()
    p = Provisioner(sqlite_engine, logged.log, fleet, ops.runners, smtp_url=url)
    fired = cut_at(logged.outage, kind, step)

    result = p.provision(newcomer, "small", PROVISION_SERVER, email="ops@outage.example.com",
                         actor=CAROL)  # fmt: skip

    # Fully provisioned: one role, one database (open, closed to PUBLIC), one pgBouncer entry
    # and auth_file line, the customer row, one email whose password logs in through pgBouncer.
    assert result.steps == list(STEPS) and not result.warnings, result.warnings
    root = admin(sandbox, PROVISION_SERVER)
    assert query(root, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", newcomer) == [(True,)]
    like = newcomer.replace("_", "\\_") + "%"
    assert query(root, "SELECT datname, datallowconn, has_database_privilege('public', oid,"
                 " 'CONNECT') FROM pg_database WHERE datname LIKE %s", like) == [
        (newcomer, True, False)
    ]  # fmt: skip
    assert registrations(fleet.server(PROVISION_SERVER), newcomer) == (1, 1)
    (mail,) = inbox.messages
    password = emailed_password(mail)
    port = fleet.server(PROVISION_SERVER).pgbouncer_port
    with psycopg.connect(
        f"host=127.0.0.1 port={port} dbname={newcomer} user={newcomer} password={password}",
        connect_timeout=5,
    ) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            newcomer,
            newcomer,
        )
    job = p.job(newcomer)
    assert job is not None and (job.status, job.welcome, job.attempts) == ("done", "sent", 1)
    # It says what state it reached, and that its record comes when the log is back.
    assert not result.recorded and result.state == f"provisioned; {RECORD_LATER}"
    assert RECORD_LATER in result.summary()
    assert RECORD_LATER in str(provisioned_reply(result, build_registry()).message()["blocks"])

    # The first backup's events wait in the same spool as the rest: stored with them, so the
    # nightly run's flush finds nothing left.
    stored = assert_cut_then_stored(logged, fired, kind, step)
    assert p.backups.flush_unrecorded() == []
    stored = [e for e in logged.outage.stored() if e.kind != "probe"]
    keys = [(e.source, e.source_id) for e in stored]
    assert len(keys) == len(set(keys)), "an event was stored twice"
    assert sequence(stored, "provision.") == PROVISION_EVENTS  # all, once, in order
    assert {e.kind for e in stored} == {k for k, _ in PROVISION_EVENTS} | set(PROVISION_OTHERS)
    assert password not in json.dumps([e.as_json() for e in stored])


# --- restart ------------------------------------------------------------------------------------

RESTART_EVENTS = [COMMAND, "server.restart"]  # the look before, the restart, the re-check
ON_AN_INCIDENT = ["incident.acknowledged", "incident.restart", "incident.recovered"]
RESTART_CUTS = [
    *[pytest.param(kind, False, id=kind) for kind in RESTART_EVENTS],
    *[pytest.param(kind, True, id=f"incident:{kind}") for kind in ON_AN_INCIDENT],
]


def databases_on(sandbox: dict[str, Any], server: str) -> list[str]:
    return sorted(r[0] for r in query(admin(sandbox, server), "SELECT datname FROM pg_database"))


@pytest.mark.parametrize(("kind", "incident"), RESTART_CUTS)
def test_a_restart_cut_off_from_the_log_at_any_step_ends_restarted(
    logged: Logged,
    ops: Ops,
    sqlite_engine: Engine,
    sandbox: dict[str, Any],
    fleet: Fleet,
    sandbox_break: Any,
    kind: str,
    incident: bool,
) -> None:
    upsert_customers(sqlite_engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    on_it = sorted(c["name"] for c in sandbox["customers"] if c["server"] == RESTART_SERVER)
    databases = databases_on(sandbox, RESTART_SERVER)
    desk = Incidents(sqlite_engine, logged.log, fleet)
    restarts = Restarts(sqlite_engine, logged.log, fleet, ops.runners,
                        incidents=desk, recheck_s=30)  # fmt: skip
    sandbox_break("server-down", RESTART_SERVER)
    opened = None
    if incident:
        opened = desk.open(f"{RESTART_SERVER} postgres down", "P0", actor=ALICE,
                           server=RESTART_SERVER, customers=on_it)  # fmt: skip
    mark = last_id(logged.outage)
    fired = cut_at(logged.outage, kind)

    done = restarts.restart(RESTART_SERVER, ALICE)

    # Restarted and answering: every customer on it connects again, nothing else changed.
    assert done.result["ran"] and done.result["answering"], done.result
    for name in on_it:
        with psycopg.connect(customer_conninfo(sandbox, name), connect_timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        through = customer_conninfo(sandbox, name, pgbouncer=True)
        with psycopg.connect(through, connect_timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert databases_on(sandbox, RESTART_SERVER) == databases
    if opened is not None:
        assert done.incident is not None and done.incident.id == opened.id
        after = desk.get(opened.id)
        assert after.status == "acknowledged" and after.recovered_at is not None
    # It says what state it reached, and that its record comes when the log is back.
    assert not done.recorded and done.state == f"restarted; answering; {RECORD_LATER}"
    assert RECORD_LATER in restarted_reply(done, ALICE, in_thread=False).text

    stored = [e for e in assert_cut_then_stored(logged, fired, kind, None) if e.id > mark]
    kinds = [e.kind for e in stored]
    assert kinds.count("server.restart") == 1
    expected = set(RESTART_EVENTS) | (set(ON_AN_INCIDENT) if incident else set())
    # A command of the re-check may fail while PostgreSQL starts: recorded, as any command.
    assert expected <= set(kinds) <= expected | {"remote.error"}, set(kinds)
    if incident:
        assert [k for k in kinds if k in ON_AN_INCIDENT] == ON_AN_INCIDENT
    (restart,) = [e for e in stored if e.kind == "server.restart"]
    assert restart.actor == ALICE and restart.payload["answering"]


# --- the spool itself ---------------------------------------------------------------------------


def test_a_flush_that_died_before_forgetting_stores_nothing_twice(
    logged: Logged, tmp_path: Path
) -> None:
    """A flush stored a batch, then the process died before removing it from the spool: the
    next process's flush (the same file) stores nothing twice, and keeps the order."""
    log, outage = logged.log, logged.outage
    # This process "dies" before the log is back: its recovery must not flush for it.
    breaker_for(outage.engine).on_recovery.remove(logged.spool.flush_soon)
    outage.refuse()
    for i in range(5):
        assert record(log, "restore.step", "acme", {"i": i, "password": "hunter2"}) is False
    path = logged.spool.path
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"hunter2" not in path.read_bytes()  # redacted before it touches the disk
    outage.heal()
    outage.wait_for_log(log)
    kept = logged.spool.pending()
    log.append_many(kept[:3])  # what the dead flush stored before it died

    again = Spool(path)  # the next process
    assert again.flush(log) == 5
    stored = [e for e in outage.stored() if e.kind == "restore.step"]
    assert [e.payload["i"] for e in stored] == [0, 1, 2, 3, 4]
    assert len(again) == 0 and outage.verdict().ok


def test_events_kept_go_in_by_themselves_when_the_log_answers_again(logged: Logged) -> None:
    """The breaker's recovery flushes the spool: nobody has to ask."""
    log, outage = logged.log, logged.outage
    outage.refuse()
    assert record(log, "server.restart", "vps2", {"answering": True}) is False
    outage.heal()
    outage.wait_for_log(log)  # its probe finds the database back: the breaker closes
    assert wait_until(lambda: len(logged.spool) == 0, timeout=10)
    assert wait_until(lambda: len(outage.stored()) == 2, timeout=10)
    assert [e.kind for e in outage.stored() if e.kind != "probe"] == ["server.restart"]


def test_the_spool_lives_beside_a_sqlite_database_else_in_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer's clone with .env.example copied: DATABASE_URL's SQLite file, so the spool
    sits beside it (dbops.db* is ignored by git); PostgreSQL: the user's state directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    for name in ("DBOPS_SPOOL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    shutil.copy(Path(__file__).parents[1] / ".env.example", tmp_path / ".env")
    assert load_settings().spool_path == Path("dbops.db.spool")
    pg = load_settings(database_url="postgresql://dbops:pw@db.example:5433/dbops")
    assert pg.spool_path.parent == tmp_path / "home" / ".local" / "state" / "dbops"
    assert re.fullmatch(r"events-spool-dbops-[0-9a-f]{8}\.sqlite", pg.spool_path.name)
    assert "pw" not in str(pg.spool_path)
    monkeypatch.setenv("DBOPS_SPOOL", str(tmp_path / "elsewhere.spool"))
    assert load_settings().spool_path == tmp_path / "elsewhere.spool"
