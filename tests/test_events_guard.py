"""The database itself keeps the event log append-only: triggers refuse UPDATE and DELETE (and
TRUNCATE) on both engines, whoever asks; and on PostgreSQL an app role with INSERT and SELECT
only (README's grants) runs every append, verify and checkpoint dbops does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from storage.db import make_engine
from storage.eventkeys import Keyring, generate
from storage.events import EventLog
from storage.migrate import check_schema, upgrade
from tests.pgserver import Databases

# README, "The event log's guard": the grants of the role dbops runs as.
APP_GRANTS = """
GRANT CONNECT ON DATABASE {db} TO {role};
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT ON alembic_version TO {role};
GRANT SELECT, INSERT ON events TO {role};
"""


def _refused(engine: Engine, statement: str) -> str:
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        conn.execute(text(statement))
    return str(caught.value.orig)


def test_update_and_delete_are_refused_by_the_database(engine: Engine) -> None:
    log = EventLog(engine)
    for i in range(3):
        log.append("command", "acme", {"i": i})
    assert "append-only" in _refused(engine, "UPDATE events SET subject = 'globex' WHERE id = 2")
    assert "append-only" in _refused(engine, "DELETE FROM events WHERE id = 3")
    assert "append-only" in _refused(engine, "DELETE FROM events")
    if engine.dialect.name == "postgresql":
        assert "append-only" in _refused(engine, "TRUNCATE events")
    assert [e.subject for e in log.tail(5)] == ["acme"] * 3
    assert log.verify().ok


@pytest.fixture
def app_role(pg_databases: Databases) -> Iterator[tuple[Engine, str]]:
    """A PostgreSQL database made by its owner (schema and all), seen by a role with README's
    grants only."""
    engine = make_engine(pg_databases.create())
    upgrade(engine)
    engine.dispose()
    role, password = f"dbops_app_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    db = engine.url.database
    with psycopg.connect(pg_databases.conninfo, autocommit=True, dbname=db) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        admin.execute(APP_GRANTS.format(db=db, role=role))
    app = make_engine(
        make_url(engine.url).set(username=role, password=password).render_as_string(False)
    )
    try:
        yield app, role
    finally:
        app.dispose()
        with psycopg.connect(pg_databases.conninfo, autocommit=True, dbname=db) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def test_app_role_with_insert_and_select_only_runs_dbops(
    app_role: tuple[Engine, str],
) -> None:
    app, _role = app_role
    check_schema(app)  # the start-up check reads alembic_version
    keys = Keyring.parse(generate())
    log = EventLog(app, keys=keys)
    for i in range(5):
        log.append("command", "acme", {"i": i}, actor="U_ALICE", source="slack", source_id=f"d{i}")
    again = log.append("command", "acme", {"i": 0}, source="slack", source_id="d0")
    assert again.id == 2  # the duplicate found by its look-up, as a retry is
    checkpoint = log.checkpoint()
    assert checkpoint.id == 6 and checkpoint.key_id == keys.keys[0].id
    verdict = log.verify([checkpoint])
    assert verdict.ok and verdict.sealed == 6 and verdict.checkpoints == 1
    for statement in (
        "UPDATE events SET subject = 'globex' WHERE id = 2",
        "DELETE FROM events WHERE id = 2",
        "TRUNCATE events",
        "ALTER TABLE events DISABLE TRIGGER USER",
        "DROP TRIGGER events_no_update_delete ON events",
    ):
        error = _refused(app, statement)
        assert "permission denied" in error or "must be owner" in error, (statement, error)
    assert log.verify().ok
