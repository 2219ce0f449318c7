"""Migrations: `dbops db upgrade` makes the schema; an old schema is refused, clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.db import make_engine
from storage.migrate import SchemaError, check_schema, current_revision, head_revision, upgrade


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
