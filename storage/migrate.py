"""Alembic, driven from code: ``dbops db upgrade``, the schema made on first use, and the
start-up check that refuses an older schema.

Whoever creates or migrates the schema holds a lock first (a PostgreSQL advisory lock, or a lock
file beside a SQLite database), so processes starting together on a brand-new database end with
one schema: the first creates it, the others find it made.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_lock key for schema changes: any constant of our own ("dbops" + "schema").
SCHEMA_LOCK_KEY = 0x64626F70_73636D61


class SchemaError(Exception):
    """The database schema is not the one this version of dbops needs."""


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """Hold the lock every schema change takes, across processes."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":  # one process alone can see it
        yield
        return
    with open(f"{database}.schema-lock", "a") as lockfile:
        fcntl.flock(lockfile, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lockfile, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to ``revision``; returns (before, after)."""
    with schema_lock(engine):
        before = current_revision(engine)
        command.upgrade(alembic_config(engine), revision)
        return before, current_revision(engine) or "base"


def ensure_schema(engine: Engine) -> str | None:
    """Create the schema on a database that has none; returns the revision made, or None when
    the schema was there already. An older schema is left alone: check_schema refuses it, and
    ``dbops db upgrade`` (a step someone chooses, after a backup) migrates it."""
    if current_revision(engine) == head_revision():
        return None
    # Not current: maybe another process is creating it right now (its first revisions are
    # already visible). Its lock is held until it is done, so look again under the lock.
    with schema_lock(engine):
        if current_revision(engine) is not None:  # another process made it while we waited
            return None
        command.upgrade(alembic_config(engine), "head")
        return current_revision(engine)


def check_schema(engine: Engine) -> None:
    """Raise SchemaError unless the database is at the newest revision."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaError(
            "The database has no dbops schema yet. Run `dbops db upgrade` to create it."
        )
    raise SchemaError(
        f"The database schema is at revision {current}, this dbops needs {head}. "
        "Run `dbops db upgrade` (take a backup first if it holds history you care about)."
    )
