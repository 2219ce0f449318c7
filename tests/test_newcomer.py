"""A newcomer's first steps: `cp .env.example .env`, fill in the two Slack values, `dbops serve`
on a brand-new database, and a signed `/db help` answered over real HTTP. No `db upgrade` first:
the schema is made on first use, once, however many processes start together."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import current_revision, head_revision
from tests.pgserver import Databases
from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, SlackStub, sign, slash_body
from tests.test_slack_http import serving

ROOT = Path(__file__).resolve().parents[1]
DBOPS = [sys.executable, "-m", "bot"]


def bare_env(**extra: str) -> dict[str, str]:
    """The process environment with no dbops, Slack, Stripe or SMTP setting in it."""
    from core.settings import Settings

    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


def copied_env_example(directory: Path) -> Path:
    """.env.example copied to ``directory/.env`` as it is, with only the two Slack values."""
    example = (ROOT / ".env.example").read_text()
    filled = re.sub(r"(?m)^SLACK_BOT_TOKEN=$", f"SLACK_BOT_TOKEN={BOT_TOKEN}", example)
    filled = re.sub(
        r"(?m)^SLACK_SIGNING_SECRET=$", f"SLACK_SIGNING_SECRET={SIGNING_SECRET}", filled
    )
    assert filled.count(BOT_TOKEN) == 1 and filled.count(SIGNING_SECRET) == 1, (
        ".env.example no longer has empty SLACK_BOT_TOKEN= and SLACK_SIGNING_SECRET= lines"
    )
    env_file = directory / ".env"
    env_file.write_text(filled)
    return env_file


def test_env_example_copied_as_it_is_serves_a_signed_help(tmp_path: Path, stub: SlackStub) -> None:
    copied_env_example(tmp_path)
    # .env.example names fleet.toml: a newcomer has not written one yet.
    assert not (tmp_path / "fleet.toml").exists()
    # The one value not from .env: this machine cannot reach slack.com, so the Web API (Bolt's
    # auth.test) is the stub, named in the environment, which .env never overrides.
    with serving(tmp_path, DBOPS_LOG_LEVEL="WARNING", SLACK_API_URL=stub.base_url) as (base, _):
        health = httpx.get(f"{base}/healthz").json()
        assert health["slack"] == "http", health  # the empty SLACK_APP_TOKEN= is unset
        token = "newcomer-help"
        body = slash_body("help", response_url=stub.response_url(token))
        resp = httpx.post(f"{base}/slack/events", content=body, headers=sign(body), timeout=5)
        assert resp.status_code == 200
        reply = stub.wait_for(lambda c: c.kind == "response" and c.path.endswith(token))
    assert "/db status" in reply.text
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "Error" not in log, log
    # The schema was made on first use in the .env's DATABASE_URL (sqlite:///dbops.db).
    engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
    assert current_revision(engine) == head_revision()
    kinds = [e.kind for e in EventLog(engine).query(limit=100)]
    assert kinds.count("db.upgrade") == 1 and "command" in kinds, kinds


@pytest.mark.parametrize(
    ("var", "field", "kind"),
    [
        ("SLACK_APP_TOKEN", "slack_app_token", "secret"),
        ("STRIPE_API_KEY", "stripe_api_key", "secret"),
        ("STRIPE_API_BASE", "stripe_api_base", "URL"),
        ("SLACK_API_URL", "slack_api_url", "URL"),
        ("DBOPS_OPERATORS", "dbops_operators", "list"),
        ("DBOPS_ADMINS", "dbops_admins", "list"),
        ("DBOPS_FLEET", "dbops_fleet", "path"),
        ("SMTP_URL", "smtp_url", "URL"),
        ("TIMEZONE", "timezone", "name"),
        ("DATABASE_URL", "database_url", "URL"),
    ],
)
@pytest.mark.parametrize("where", ["environment", ".env"])
def test_an_empty_setting_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str, field: str, kind: str, where: str
) -> None:
    from core.settings import Settings, load_settings

    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    if where == "environment":
        monkeypatch.setenv(var, "")
    else:
        (tmp_path / ".env").write_text(f"{var}=\n")
    assert getattr(load_settings(), field) == default, f"{var}= ({kind}) is not unset"


@pytest.fixture(params=["sqlite", "postgres"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a database nobody has run `dbops db upgrade` on."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'new.db'}"
    dbs: Databases = request.getfixturevalue("pg_databases")
    return dbs.create()


def test_report_on_a_new_database_without_db_upgrade(
    new_database: str, sandbox: dict[str, Any], tmp_path: Path
) -> None:
    env = bare_env(DATABASE_URL=new_database, DBOPS_FLEET=sandbox["fleet"])
    run = subprocess.run(
        [*DBOPS, "report", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["summary"]["servers_total"] == len(sandbox["servers"])
    assert current_revision(make_engine(new_database)) == head_revision()


def test_serve_on_a_new_database_without_db_upgrade(
    new_database: str, stub: SlackStub, tmp_path: Path
) -> None:
    with serving(
        tmp_path,
        DATABASE_URL=new_database,
        SLACK_BOT_TOKEN=BOT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=stub.base_url,
        DBOPS_LOG_LEVEL="WARNING",
    ) as (base, _):
        health = httpx.get(f"{base}/healthz").json()
    assert health["ok"] is True and health["schema"]["current"] == head_revision(), health


RACE = """
import sys, time
from bot.runtime import Runtime
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
Runtime.load().ready()
"""


def test_processes_starting_together_make_one_schema(new_database: str, tmp_path: Path) -> None:
    env = bare_env(DATABASE_URL=new_database)
    start = time.time() + 3  # past every process's imports
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(start)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.wait(60), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in results), results
    engine = make_engine(new_database)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    created = EventLog(engine).query(kind="db.upgrade", limit=100)
    assert len(created) == 1 and created[0].payload["first_use"] is True


def test_an_older_schema_still_needs_db_upgrade(tmp_path: Path) -> None:
    from storage.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(make_engine(url), "0001")
    run = subprocess.run(
        [*DBOPS, "report", "--json"],
        env=bare_env(DATABASE_URL=url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "revision 0001" in run.stderr and "dbops db upgrade" in run.stderr
    assert current_revision(make_engine(url)) == "0001"  # left alone


def test_procfile_upgrades_in_its_release_step() -> None:
    procs = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert procs["release"].strip() == "dbops db upgrade"
    assert procs["web"].strip() == "dbops serve" and procs["worker"].strip() == "dbops scheduler"
