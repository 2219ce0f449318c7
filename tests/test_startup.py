"""Start-up: the CLI imports what a command needs (bench/startup.py measures the time).

`dbops --help` loads none of the machinery; the schema check every command makes at start, and
commands run on a local server, load neither alembic (a schema change does) nor paramiko (an
SSH server contacted does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from storage.db import make_engine
from storage.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
MACHINERY = ("paramiko", "alembic", "mako", "sqlalchemy", "sqlmodel", "psycopg", "jinja2")


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[set[str], str]:
    """Every module the process imported, as `python -X importtime` names them; its stdout."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in res.stderr.splitlines()
        if line.startswith("import time:") and "imported package" not in line
    }
    return modules, res.stdout


def _top(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_help_imports_none_of_the_machinery(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DBOPS_FLEET")}
    env["PYTHONPATH"] = str(ROOT)
    modules, out = _run(["-m", "bot", "--help"], tmp_path, env)
    assert "bot.cli" in modules and "dbops" in out and "status" in out  # it did run the CLI
    assert not _top(modules) & set(MACHINERY), sorted(_top(modules) & set(MACHINERY))


CHECK_AND_RUN = """\
import sys
from sqlalchemy import create_engine
from core.ops import Ops
from core.remote import LocalRunner
from storage.migrate import check_schema, ensure_schema
engine = create_engine(sys.argv[1])
assert ensure_schema(engine) is None
check_schema(engine)
result = LocalRunner("vps1").run(["sh", "-c", "echo ok"])
assert result.exit_code == 0 and result.stdout.strip() == "ok", result
"""


def test_schema_check_and_local_commands_load_neither_alembic_nor_paramiko(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'dbops.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    imported, _out = _run(["-c", CHECK_AND_RUN, url], ROOT)
    modules = _top(imported)
    assert {"core", "sqlalchemy"} <= modules  # it did import what the check uses
    assert not modules & {"alembic", "mako", "paramiko", "invoke"}, sorted(modules)


def test_an_old_schema_is_still_refused_without_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dbops.db'}"
    engine = make_engine(url)
    upgrade(engine, "0001")
    engine.dispose()
    code = (
        "import sys\nfrom sqlalchemy import create_engine\n"
        "from storage.migrate import SchemaError, check_schema\n"
        "try:\n    check_schema(create_engine(sys.argv[1]))\n"
        "except SchemaError as exc:\n    print(exc)\n"
    )
    imported, out = _run(["-c", code, url], ROOT)
    assert "schema is at revision 0001" in out and "Run `dbops db upgrade`" in out
    assert not _top(imported) & {"alembic", "mako"}
