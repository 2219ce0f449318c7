"""The fleet commands of the CLI against the session sandbox: import, report, status, trust."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from storage.db import make_engine
from storage.events import EventLog


def _dbops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def cli_env(sandbox: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'dbops.db'}",
        "DBOPS_FLEET": sandbox["fleet"],
    }
    assert _dbops(env, "db", "upgrade").returncode == 0
    imported = _dbops(env, "fleet", "import", str(Path(sandbox["dir"]) / "sandbox.json"))
    assert imported.returncode == 0, imported.stderr
    assert f"Imported {len(sandbox['customers'])} customers" in imported.stdout
    return env


def test_report_json_has_the_design_shape(cli_env: dict[str, str], sandbox: dict[str, Any]) -> None:
    res = _dbops(cli_env, "report", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert {s["name"] for s in report["servers"]} == {s["name"] for s in sandbox["servers"]}
    assert all(s["reachable"] and s["postgres"] == "up" for s in report["servers"])
    assert [d["customer"] for d in report["databases"]] == sorted(
        c["name"] for c in sandbox["customers"]
    )
    for db in report["databases"]:
        assert db["online"] is True and db["size_bytes"] > 0 and db["last_backup_at"]
        for check in db["checks"]:
            assert set(check) == {"name", "verdict", "value", "warn", "crit", "detail"}
            assert check["verdict"] in ("ok", "warn", "crit", "unknown")
    summary = report["summary"]
    n = len(sandbox["customers"])
    assert summary["servers_up"] == summary["servers_total"] == len(sandbox["servers"])
    assert summary["databases_online"] == summary["databases_total"] == n
    assert summary["backups_ok"] == n


def test_report_text_reads_like_sop_101(cli_env: dict[str, str], sandbox: dict[str, Any]) -> None:
    res = _dbops(cli_env, "report")
    n, s = len(sandbox["customers"]), len(sandbox["servers"])
    assert f"All {s} VPS servers responding" in res.stdout
    assert f"{n}/{n} customer databases online" in res.stdout
    assert f"Backups completed: {n}/{n} successful" in res.stdout


def test_status_of_acme_and_of_unknown_and_hostile_names(cli_env: dict[str, str]) -> None:
    res = _dbops(cli_env, "status", "acme", "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["customer"] == "acme" and status["database"]["online"] is True
    typo = _dbops(cli_env, "status", "acmee")
    assert typo.returncode == 2 and "no customer 'acmee'" in typo.stderr and "'acme'" in typo.stderr
    before = EventLog(make_engine(cli_env["DATABASE_URL"])).count()
    for hostile in ["acme; touch /tmp/pwned", "$(id)", "ácme", "x" * 10_000]:
        bad = _dbops(cli_env, "status", hostile)
        assert bad.returncode == 2 and "not a valid customer name" in bad.stderr
        assert "Traceback" not in bad.stderr
    log = EventLog(make_engine(cli_env["DATABASE_URL"]))
    assert log.count() == before, "a refused name ran something"
    assert not Path("/tmp/pwned").exists()


def test_trust_records_the_host_key(
    cli_env: dict[str, str], sandbox: dict[str, Any], tmp_path: Path
) -> None:
    # A copy of the fleet with an empty known_hosts: the first contact is refused, then trusted.
    fleet_text = Path(sandbox["fleet"]).read_text()
    known = tmp_path / "known_hosts"
    known.write_text("")
    lines = [
        f'known_hosts = "{known}"' if line.startswith("known_hosts") else line
        for line in fleet_text.splitlines()
    ]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("\n".join(lines) + "\n")
    env = {**cli_env, "DBOPS_FLEET": str(fleet)}
    refused = _dbops(env, "status", "acme", "--json")
    status = json.loads(refused.stdout) if refused.returncode == 0 else {}
    server_checks = status.get("server", {}).get("checks", [])
    assert any("dbops fleet trust" in (c.get("detail") or "") for c in server_checks), (
        refused.stdout + refused.stderr
    )
    server = next(c["server"] for c in sandbox["customers"] if c["name"] == "acme")
    trusted = _dbops(env, "fleet", "trust", server)
    assert trusted.returncode == 0, trusted.stderr
    assert "SHA256:" in trusted.stdout
    assert known.read_text().strip()
    ok = json.loads(_dbops(env, "status", "acme", "--json").stdout)
    assert not any("trust" in (c.get("detail") or "") for c in ok["server"]["checks"])
