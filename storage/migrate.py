"""Alembic, driven from code: ``dbops db upgrade``, the schema made on first use, and the
start-up check that refuses an older schema.

The check runs at every start, so it does without alembic (~0.2 s of imports, mako's
included): the database's revision is read from the ``alembic_version`` table, and this
dbops's head from the revision files' ``revision = "..."`` and ``down_revision = ...`` lines.
Alembic is imported only to change the schema, or where those lines cannot say (tests/
test_schema.py holds both readings to alembic's own).

Whoever creates or migrates the schema holds a lock first (a PostgreSQL advisory lock, or a lock
file beside a SQLite database), so processes starting together on a brand-new database end with
one schema: the first creates it, the others find it made.
"""

from __future__ import annotations

import ast
import fcntl
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_lock key for schema changes: any constant of our own ("dbops" + "schema").
SCHEMA_LOCK_KEY = 0x64626F70_73636D61


class SchemaError(Exception):
    """The database schema is not the one this version of dbops needs."""


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


# The files alembic reads as revisions (alembic.script.base._only_source_rev_file), and the
# module-level assignments it takes from them.
_REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")
_ASSIGNMENT = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.MULTILINE)


def _read_head(migrations: Path) -> str | None:
    """The one revision no other names as its down_revision, read from the files' lines; None
    when the lines do not settle it (an assignment not a literal, a file without one, no head or
    several): alembic decides those."""
    revisions: set[str] = set()
    downs: set[str] = set()
    for path in (migrations / "versions").iterdir():
        if not path.is_file() or not _REVISION_FILE.match(path.name):
            continue
        found: dict[str, object] = {}
        for name, value in _ASSIGNMENT.findall(path.read_text(encoding="utf-8")):
            try:
                found.setdefault(name, ast.literal_eval(value))
            except (ValueError, SyntaxError):
                return None
        revision, down = found.get("revision"), found.get("down_revision")
        if not isinstance(revision, str) or "down_revision" not in found:
            return None
        revisions.add(revision)
        if isinstance(down, str):
            downs.add(down)
        elif isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
            downs.update(down)
        elif down is not None:
            return None
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def head_revision(migrations: Path = MIGRATIONS) -> str:
    """The newest revision, the one this dbops needs."""
    head = _read_head(migrations)
    if head is None:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory(str(migrations)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision, from alembic's version table (None: no schema yet)."""
    with engine.connect() as conn:
        if not conn.dialect.has_table(conn, "alembic_version"):
            return None
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(rows) <= 1:
            return rows[0] if rows else None
        # Several heads in the table: alembic's own reading, and its error.
        from alembic.runtime.migration import MigrationContext

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
    from alembic import command

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
        from alembic import command

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
