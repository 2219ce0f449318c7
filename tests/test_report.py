"""The morning report: DESIGN.md's Report JSON, and text that reads like SOP-101's expected output.

Against the session sandbox (3 servers over SSH, 6 customers) healthy and with acme's database
down; the text of a report with every kind of trouble on fixed data; `dbops status acme`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bot.views import render
from core import health, sandbox
from core.customers import Customer, customer_from_mapping
from core.fleet import Fleet
from core.remote import RunnerPool
from core.report import (
    build_report,
    customer_status,
    render_status_text,
    render_text,
    text_view,
)

UTC_ZONE = ZoneInfo("UTC")
REPORT_KEYS = {"generated_at", "duration_ms", "servers", "databases", "summary", "open_incidents",
               "checks", "worst_rpo"}  # fmt: skip
# runway: null here (no measurement history given; tests/test_capacity_sweep.py has one).
SERVER_KEYS = {"name", "reachable", "postgres", "checks", "runway"}
DATABASE_KEYS = {
    "customer",
    "server",
    "database",
    "online",
    "size_bytes",
    "last_backup_at",
    "recovery",
    "checks",
}
SUMMARY_KEYS = {"servers_up", "servers_total", "databases_online", "databases_total", "backups_ok",
                "verdict"}  # fmt: skip
CHECK_KEYS = {"name", "verdict", "value", "warn", "crit", "detail"}
# Each database's checks, in order: DESIGN.md's check_postgres actions that look at a database,
# then ours.
DATABASE_CHECKS = ["connection", "database_size", "hitratio", "last_vacuum", "backup_age",
                   "backup_verified"]  # fmt: skip


@pytest.fixture(scope="module")
def customers(sandbox: dict[str, Any]) -> list[Customer]:
    return [customer_from_mapping(c) for c in sandbox["customers"]]


@pytest.fixture(scope="module")
def pool(sandbox_fleet: Fleet) -> Iterator[RunnerPool]:
    with RunnerPool(sandbox_fleet) as runners:
        yield runners


@pytest.fixture
def report(
    sandbox_fleet: Fleet, customers: list[Customer], pool: RunnerPool
) -> Callable[..., dict[str, Any]]:
    def make(**kw: Any) -> dict[str, Any]:
        return build_report(sandbox_fleet, customers, pool, deadline_s=8, **kw)

    return make


def floats_in(value: Any, where: str = "$") -> list[str]:
    if isinstance(value, float):
        return [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in floats_in(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in floats_in(v, f"{where}[{i}]")]
    return []


def test_report_json_is_designs_shape(report: Callable[..., dict[str, Any]]) -> None:
    got = report()
    assert set(got) == REPORT_KEYS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", got["generated_at"])
    assert isinstance(got["duration_ms"], int)
    assert all(set(s) == SERVER_KEYS for s in got["servers"])
    assert all(set(d) == DATABASE_KEYS for d in got["databases"])
    assert set(got["summary"]) == SUMMARY_KEYS
    checks = [c for e in got["servers"] + got["databases"] for c in e["checks"]]
    assert all(set(c) == CHECK_KEYS for c in checks)
    assert all([c["name"] for c in d["checks"]] == DATABASE_CHECKS for d in got["databases"])
    assert {c["verdict"] for c in checks} <= {"ok", "warn", "crit", "unknown"}
    assert floats_in(got) == []
    assert json.loads(json.dumps(got)) == got


def test_healthy_fleet_summary(report: Callable[..., dict[str, Any]]) -> None:
    got = report()
    assert got["summary"] == {
        "servers_up": 3,
        "servers_total": 3,
        "databases_online": 6,
        "databases_total": 6,
        "backups_ok": 6,
        "verdict": "ok",
    }
    acme = next(d for d in got["databases"] if d["customer"] == "acme")
    assert acme["online"] and acme["size_bytes"] > 0
    assert acme["last_backup_at"].endswith("Z")
    vacuum = next(c for c in acme["checks"] if c["name"] == "last_vacuum")
    assert isinstance(vacuum["value"], int) and (vacuum["warn"], vacuum["crit"]) == (86400, 172800)
    # Not faked: these arrive with later work and say so.
    unknown = {c["name"] for e in got["servers"] + got["databases"] for c in e["checks"]
               if c["verdict"] == "unknown"}  # fmt: skip
    assert unknown == {"backup_verified"}
    bouncers = [c for s in got["servers"] for c in s["checks"] if c["name"] == "pgbouncer"]
    assert [c["verdict"] for c in bouncers] == ["ok"] * 3


def test_text_reads_like_sop_101(report: Callable[..., dict[str, Any]]) -> None:
    text = render_text(report(open_incidents=[]))
    assert "All 3 VPS servers responding\n" in text
    assert "6/6 customer databases online\n" in text
    assert "Backups completed: 6/6 successful\n" in text
    assert re.search(r"^Disk usage: \d+%(-\d+%)?$", text, re.M)
    assert "No errors in PostgreSQL logs\n" in text
    assert "0 open incidents\n" in text


def test_database_down_shows_in_json_and_text(
    report: Callable[..., dict[str, Any]],
    sandbox_break: Callable[[str, str], dict[str, Any]],
    sandbox_dir: Path,
) -> None:
    sandbox_break("db-down", "acme")
    got = report()
    assert got["summary"]["databases_online"] == 5
    assert got["summary"]["verdict"] == "crit"
    text = render_text(got)
    assert "5/6 customer databases online\n" in text
    assert re.search(
        r"^  - acme \(vps\d\): FATAL: .*not currently accepting connections$", text, re.M
    )
    sandbox.heal(sandbox_dir)
    assert report()["summary"]["databases_online"] == 6


def test_customer_status(sandbox_fleet: Fleet, customers: list[Customer], pool: RunnerPool) -> None:
    acme = next(c for c in customers if c.name == "acme")
    got = customer_status(sandbox_fleet, acme, pool.get(acme.server))
    assert got["customer"] == "acme"
    assert got["database"]["online"] and got["database"]["customer"] == "acme"
    assert got["server"]["name"] == acme.server
    assert isinstance(got["connections"], int)
    assert isinstance(got["disk"]["used_percent"], int)
    assert got["duration_ms"] < 3000  # a slash command answers within 3 seconds
    text = render_status_text(got)
    assert text.startswith(f"acme on {acme.server}: online\n")
    assert "Last backup: 20" in text


def test_customer_on_unknown_server_is_reported_not_dropped(
    sandbox_fleet: Fleet, customers: list[Customer], pool: RunnerPool
) -> None:
    ghost = Customer("ghost", "vps99", "ghost", "ghost")
    got = build_report(sandbox_fleet, [*customers, ghost], pool, deadline_s=8)
    entry = next(d for d in got["databases"] if d["customer"] == "ghost")
    assert not entry["online"]
    assert "not in the fleet file" in entry["checks"][0]["detail"]
    assert got["summary"]["databases_total"] == 7


def check(name: str, verdict: str, value: Any = None, detail: str = "") -> dict[str, Any]:
    return {"name": name, "verdict": verdict, "value": value, "warn": None, "crit": None,
            "detail": detail}  # fmt: skip


TROUBLE: dict[str, Any] = {
    "generated_at": "2026-11-23T13:00:00Z",
    "duration_ms": 812,
    "servers": [
        {"name": "vps1", "reachable": True, "postgres": "up", "checks": [
            check("connection", "ok", 5), check("backends", "warn", 27, "27 of 30 connections"),
            check("disk_space", "ok", 41), check("logfile", "warn", 2, "ERROR 2; ERROR: boom"),
        ]},
        {"name": "vps2", "reachable": True, "postgres": "up", "checks": [
            check("connection", "ok", 5), check("disk_space", "warn", 91),
            check("logfile", "ok", 0),
        ]},
        {"name": "vps3", "reachable": False, "postgres": "down", "checks": [
            check("connection", "crit", None, "no answer within 10s"),
            check("disk_space", "crit", None, "server not answering: no answer within 10s"),
            check("logfile", "crit", None, "server not answering"),
        ]},
    ],
    "databases": [
        {"customer": "acme", "server": "vps1", "database": "acme", "online": False,
         "size_bytes": None, "last_backup_at": None, "checks": [
            check("connection", "crit", None, "FATAL: database is not accepting connections"),
            check("backup_age", "crit", None, "no complete backup found"),
         ]},
        {"customer": "globex", "server": "vps2", "database": "globex", "online": True,
         "size_bytes": 10, "last_backup_at": "2026-11-23T08:00:00Z", "checks": [
            check("connection", "ok", 3), check("backup_age", "ok", 18000),
         ]},
    ],
    "summary": {"servers_up": 2, "servers_total": 3, "databases_online": 1,
                "databases_total": 2, "backups_ok": 1, "verdict": "crit"},
    "open_incidents": [{"id": 7, "priority": "P0", "title": "{{ 7 * 7 }} acme down"}],
}  # fmt: skip


def test_text_names_each_problem() -> None:
    text = render_text(TROUBLE)
    assert text.splitlines()[0] == "Morning health check, 2026-11-23 13:00 UTC: CRIT"
    assert "2/3 VPS servers responding\n  - vps3: server not answering" in text
    assert "1/2 customer databases online\n  - acme (vps1): FATAL: database" in text
    assert "Backups completed: 1/2 successful\n  - acme: no complete backup found" in text
    assert "Disk usage: 41%-91%\n  - vps2: 91% used (warn)" in text
    assert "PostgreSQL logs: 2 errors\n  - vps1: ERROR 2; ERROR: boom" in text
    # Template syntax in data is shown, never run (sandboxed environment, data not source).
    assert "1 open incident\n  - #7 P0 {{ 7 * 7 }} acme down" in text
    assert "vps1 backends warn: 27 of 30 connections" in text


def test_text_in_local_time() -> None:
    from zoneinfo import ZoneInfo

    text = render_text(TROUBLE, tz=ZoneInfo("America/New_York"))
    assert text.startswith("Morning health check, 2026-11-23 08:00 EST: CRIT")


CHATTY_LOG = """\
2026-11-23 12:00:00.000 UTC [4] @ LOG:  checkpoints are occurring too frequently (9 seconds apart)
2026-11-23 12:00:01.000 UTC [5] @ LOG:  checkpoint complete: wrote 3 buffers
2026-11-23 12:00:02.000 UTC [6] a@acme app WARNING:  there is no transaction in progress
2026-11-23 12:00:03.000 UTC [7] a@acme app NOTICE:  relation "t" already exists, skipping
"""


def log_report(vps1_log: str, vps2_log: str = "") -> dict[str, Any]:
    """A healthy two-server report whose logfile checks read these logs."""
    servers = []
    for name, log in (("vps1", vps1_log), ("vps2", vps2_log)):
        logfile = health.check_logfile(health.scan_log(log, None), 1, 10).as_json()
        servers.append({"name": name, "reachable": True, "postgres": "up", "checks": [
            check("connection", "ok", 5), check("disk_space", "ok", 41), logfile,
        ]})  # fmt: skip
    summary = {"servers_up": 2, "servers_total": 2, "databases_online": 0, "databases_total": 0,
               "backups_ok": 0, "verdict": "ok"}  # fmt: skip
    return {"generated_at": "2026-11-23T13:00:00Z", "duration_ms": 5, "servers": servers,
            "databases": [], "summary": summary, "open_incidents": []}  # fmt: skip


def test_log_and_warning_lines_are_zero_errors_in_the_report() -> None:
    """`LOG:  checkpoints are occurring too frequently` all night is a healthy fleet."""
    got = log_report(CHATTY_LOG * 10, CHATTY_LOG)
    assert [c["verdict"] for s in got["servers"] for c in s["checks"]] == ["ok"] * 6
    assert [s["checks"][-1]["value"] for s in got["servers"]] == [0, 0]
    text = render_text(got)
    assert "PostgreSQL logs: 0 errors (11 warnings)\n" in text
    assert "  - vps1: 0 errors (10 warnings); LOG: checkpoints are occurring too" in text
    assert "  - vps2: 0 errors (1 warning); LOG: checkpoints" in text
    slack = render.template("report.md.j2", UTC_ZONE, **text_view(got))
    assert ":white_check_mark: PostgreSQL logs: 0 errors (11 warnings)\n" in slack
    assert "No errors in PostgreSQL logs" in render_text(log_report("", ""))


def test_error_fatal_and_panic_lines_are_counted_in_the_report() -> None:
    errors = "".join(
        f"2026-11-23 12:30:0{i}.000 UTC [9] a@acme app {level}:  it broke\n"
        for i, level in enumerate(["ERROR", "ERROR", "FATAL", "PANIC"])
    )
    got = log_report(CHATTY_LOG + errors, "2026-11-23 12:31:00 UTC [1] @ FATAL:  oops\n")
    vps1, vps2 = (s["checks"][-1] for s in got["servers"])
    assert (vps1["verdict"], vps1["value"]) == ("crit", 4)  # a PANIC is crit at once
    assert (vps2["verdict"], vps2["value"]) == ("warn", 1)
    text = render_text(got)
    assert "PostgreSQL logs: 5 errors (1 warning)\n" in text
    assert "  - vps1: 4 errors: ERROR 2, FATAL 1, PANIC 1 (1 warning); ERROR: it broke" in text
    assert "  - vps2: 1 error: FATAL 1; FATAL: oops\n" in text
    slack = render.template("report.md.j2", UTC_ZONE, **text_view(got))
    assert ":warning: PostgreSQL logs: 5 errors (1 warning)\n" in slack
