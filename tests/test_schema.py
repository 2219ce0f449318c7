"""Migrations: `dbops db upgrade` makes the schema; an old schema is refused, clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text

from storage.db import make_engine
from storage.migrate import (
    MIGRATIONS,
    SchemaError,
    _read_head,
    check_schema,
    current_revision,
    head_revision,
    upgrade,
)


def test_fresh_database_is_refused_until_upgraded(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(SchemaError, match="dbops db upgrade"):
        check_schema(engine)
    upgrade(engine)
    check_schema(engine)
    assert current_revision(engine) == head_revision()


def test_old_schema_is_refused(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(engine, "0001")
    with pytest.raises(SchemaError, match=r"revision 0001.*Run `dbops db upgrade`"):
        check_schema(engine)


def test_cli_refuses_old_schema_then_upgrades(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade(make_engine(url), "0001")
    env = {**os.environ, "DATABASE_URL": url}
    run = [sys.executable, "-m", "bot"]
    refused = subprocess.run([*run, "events", "tail"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "dbops db upgrade" in refused.stderr and "Traceback" not in refused.stderr
    up = subprocess.run([*run, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert up.returncode == 0 and "0001" in up.stdout
    ok = subprocess.run([*run, "events", "tail", "--json"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "db.upgrade" in ok.stdout


def test_migrations_run_on_postgres(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    check_schema(engine)
    engine.dispose()


# The start-up check reads the revisions without alembic (storage/migrate.py): these hold both
# readings to alembic's own.


def _alembic_head(migrations: Path = MIGRATIONS) -> str | None:
    return ScriptDirectory(str(migrations)).get_current_head()


def test_head_read_from_the_files_is_alembics() -> None:
    assert _read_head(MIGRATIONS) is not None  # the files' lines settle it: alembic stays out
    assert head_revision() == _read_head(MIGRATIONS) == _alembic_head()


def _revision(versions: Path, name: str, revision: str, down: str) -> None:
    versions.joinpath(f"{name}.py").write_text(
        f'''"""{name}"""

revision: str = "{revision}"
down_revision = {down}
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
''',
        encoding="utf-8",
    )


def test_head_of_a_merge_and_of_a_branch_is_alembics(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        versions.joinpath(path.name).write_bytes(path.read_bytes())
    newest = head_revision()
    _revision(versions, "a1_left", "a1", f"{newest!r}")
    _revision(versions, "b1_right", "b1", f"{newest!r}")
    # Two heads: the lines do not settle it, alembic decides (and refuses, as it always did).
    assert _read_head(tmp_path) is None
    with pytest.raises(CommandError):
        head_revision(tmp_path)
    with pytest.raises(CommandError):
        _alembic_head(tmp_path)
    _revision(versions, "c1_merge", "c1", "('a1', 'b1')")
    assert _read_head(tmp_path) == head_revision(tmp_path) == _alembic_head(tmp_path) == "c1"
    # A revision the lines cannot read is alembic's to read.
    versions.joinpath("c1_merge.py").write_text(
        versions.joinpath("c1_merge.py").read_text().replace('"c1"', '"c" + "1"')
    )
    assert _read_head(tmp_path) is None
    assert head_revision(tmp_path) == _alembic_head(tmp_path) == "c1"


def _alembic_current(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_current_revision_is_alembics(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None and _alembic_current(db_url) is None
        upgrade(engine, "0001")
        assert current_revision(engine) == _alembic_current(db_url) == "0001"
        upgrade(engine)
        assert current_revision(engine) == _alembic_current(db_url) == head_revision()
        with engine.begin() as conn:  # an empty version table: no schema, to both
            conn.execute(text("DELETE FROM alembic_version"))
        assert current_revision(engine) is None and _alembic_current(db_url) is None
        with engine.begin() as conn:  # two heads in the table: alembic's error, from both
            conn.execute(text("INSERT INTO alembic_version VALUES ('0001'), ('0002')"))
        with pytest.raises(CommandError, match="more than one head"):
            current_revision(engine)
        with pytest.raises(CommandError, match="more than one head"):
            _alembic_current(db_url)
    finally:
        engine.dispose()
