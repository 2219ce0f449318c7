"""Every PostgreSQL major from 13 to 18 in the sandbox: `dbops sandbox up --pg-version V`.

PG_VERSIONS (default "13 17", what `make test` fetches) picks the majors; `make test-matrix`
sets all six. Each major gets one sandbox for the whole session (one server, two customers,
pgBouncer in front), brought up side by side through the CLI; 13 to 15 are reached locally, 16
to 18 over SSH, so both transports meet an old and a new major. The binaries come from the
Makefile's cache (`make pg-bin PG=V`, a no-op once fetched); 15 is the machine's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from core import pgbins
from core import sandbox as sandbox_mod
from core.fleet import APP_NAME, load_fleet

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = [int(v) for v in os.environ.get("PG_VERSIONS", "13 17").split()]
VERDICTS = {"ok", "warn", "crit", "unknown"}
# The sandbox's log_line_prefix is '%m [%p] %q%u@%d %a ': time, pid, user@database, application.
_LOG_LINE = re.compile(
    r"^\S+ \S+ \S+ \[\d+\] (?P<user>[^@ ]*)@(?P<db>\S*) (?P<app>\S*) ?"
    r"(?P<level>[A-Z]+):  (?P<msg>.*)"
)


def _dbops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], env=env, capture_output=True, text=True, timeout=300
    )


class Major:
    """One major's sandbox: its state, the CLI's environment, and how long it took to come up."""

    def __init__(self, version: int, directory: Path) -> None:
        self.version = version
        self.dir = directory
        self.env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{directory.parent / f'dbops-{version}.db'}",
            "DBOPS_FLEET": str(directory / "fleet.toml"),
        }
        self.ssh = version >= 16
        self.state: dict[str, Any] = {}
        self.up_seconds = 0.0


@pytest.fixture(scope="session")
def majors() -> Iterator[dict[int, Major]]:
    """Fetch (make pg-bin) and bring up one sandbox per major in PG_VERSIONS, all at once."""
    for version in VERSIONS:
        fetched = subprocess.run(
            ["make", "--no-print-directory", "pg-bin", f"PG={version}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert fetched.returncode == 0, (fetched.stdout[-2000:], fetched.stderr[-2000:])
    # Not tmp_path_factory: pytest makes its base 0700, which the postgres user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="dbops-pgv-"))
    base.chmod(0o755)
    found = {v: Major(v, base / f"pg{v}") for v in VERSIONS}
    started: dict[int, tuple[subprocess.Popen[str], float]] = {}
    try:
        for major in found.values():
            argv = [sys.executable, "-m", "bot", "sandbox", "up", "--dir", str(major.dir)]
            argv += ["--servers", "1", "--customers", "2", "--pg-version", str(major.version)]
            argv += ["--ssh"] if major.ssh else []
            process = subprocess.Popen(
                argv, env=major.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            started[major.version] = (process, time.monotonic())
        for version, (process, at) in started.items():
            out, err = process.communicate(timeout=600)
            found[version].up_seconds = time.monotonic() - at
            assert process.returncode == 0, (version, err[-3000:])
            found[version].state = json.loads(out)
        yield found
    finally:
        for major in found.values():
            if (major.dir / sandbox_mod.STATE_FILE).exists():
                sandbox_mod.down(major.dir, remove=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture(scope="session")
def statuses(majors: dict[int, Major]) -> dict[int, tuple[dict[str, Any], list[dict[str, str]]]]:
    """`dbops status acme --json` on each major, with every statement of the monitoring role
    logged meanwhile (ALTER ROLE ... SET log_statement, for new sessions only): the status and
    the server log's lines of that run."""
    out = {}
    runs = {}
    for version, major in majors.items():
        server = load_fleet(major.state["fleet"]).server("vps1")
        log = Path(server.log_path)
        monitor = conninfo_to_dict(server.dsn)["user"]
        with psycopg.connect(server.admin_dsn or "", autocommit=True) as admin:
            admin.execute(f"ALTER ROLE \"{monitor}\" SET log_statement = 'all'")
        argv = [sys.executable, "-m", "bot", "status", "acme", "--json"]
        process = subprocess.Popen(
            argv, env=major.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        runs[version] = (server, log, log.stat().st_size, monitor, process)
    for version, (server, log, offset, monitor, process) in runs.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        finally:
            with psycopg.connect(server.admin_dsn or "", autocommit=True) as admin:
                admin.execute(f'ALTER ROLE "{monitor}" RESET log_statement')
        assert process.returncode == 0, (version, stderr[-3000:])
        with log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").splitlines()
        parsed = [m.groupdict() for m in map(_LOG_LINE.match, lines) if m]
        out[version] = (json.loads(stdout), parsed)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_the_sandbox_runs_the_major_asked_for_behind_pgbouncer(
    majors: dict[int, Major], version: int
) -> None:
    major = majors[version]
    server = load_fleet(major.state["fleet"]).server("vps1")
    assert server.transport == ("ssh" if major.ssh else "local")
    assert server.pg_bin == str(pgbins.server_bin(version))  # fleet.toml records it
    assert pgbins.major_of(server.pg_bin) == version
    with psycopg.connect(server.admin_dsn or "", autocommit=True) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None and int(row[0]) // 10000 == version
    through = sandbox_mod.customer_conninfo(major.state, "acme", pgbouncer=True)
    with psycopg.connect(through, autocommit=True) as conn:
        assert conn.info.server_version // 10000 == version
        assert conn.info.port == server.pgbouncer_port
    # Its pg_dump is at least as new as the server (the first backups were taken with it).
    dump = subprocess.run(
        [f"{server.pg_bin}/pg_dump", "--version"], capture_output=True, text=True, check=True
    )
    assert int(re.findall(r"\d+", dump.stdout)[0]) >= version
    assert list(Path(server.backup_path).rglob("*")), "up took no first backup"


@pytest.mark.parametrize("version", VERSIONS)
def test_status_gives_every_check_a_verdict(
    statuses: dict[int, tuple[dict[str, Any], list[dict[str, str]]]], version: int
) -> None:
    status, _ = statuses[version]
    assert status["customer"] == "acme" and status["database"]["online"] is True
    checks = [c for part in ("server", "database") for c in status[part].get("checks", [])]
    assert len(checks) >= 10, status
    for check in checks:
        assert check["verdict"] in VERDICTS, check


@pytest.mark.parametrize("version", VERSIONS)
def test_health_sessions_carry_dbops_application_name(
    statuses: dict[int, tuple[dict[str, Any], list[dict[str, str]]]],
    majors: dict[int, Major],
    version: int,
) -> None:
    _, lines = statuses[version]
    server = load_fleet(majors[version].state["fleet"]).server("vps1")
    monitor = conninfo_to_dict(server.dsn)["user"]
    statements = [x for x in lines if x["user"] == monitor and x["msg"].startswith("statement:")]
    assert statements, "no statement of the health check was logged"
    names = {x["app"] for x in statements}
    # core.health names its sessions dbops-health; what connects through the fleet's DSNs as
    # they are (psql, pg_dump, pg_restore) carries APP_NAME itself.
    assert all(re.fullmatch(rf"{APP_NAME}(-[a-z]+)?", name) for name in names), names
    assert conninfo_to_dict(server.dsn)["application_name"] == APP_NAME
    assert conninfo_to_dict(server.admin_dsn or "")["application_name"] == APP_NAME
