"""Fleets on paper: DESIGN.md's Report JSON for any number of servers and databases and any mix
of failures, built in microseconds from a few numbers (no clusters), for the tests that render
every message dbops makes at sizes the sandbox never reaches (tests/test_slack_property.py,
tests/test_report_overflow.py).

A ``Weather`` says how bad the morning is (the share of servers unreachable, of databases
offline, of backups failed, ...); ``fleet_report`` draws the fleet from it with a seeded
``random.Random``, so an example that fails is the same example when hypothesis replays it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

EVIL = "<!channel> & <https://evil.example|click> `x` *y*"
NOW = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)  # 08:00 in New York

# What servers and databases say when they are not well (the shapes core.health writes).
SERVER_DOWN = "ssh: connect to host 10.0.0.{n} port 22: Connection timed out"
PG_DOWN = 'connection to server at "127.0.0.1", port 5432 failed: Connection refused'
DB_OFFLINE = 'FATAL:  database "{db}" does not exist'
BACKUP_FAILED = "pg_dump: error: connection to server failed: FATAL:  too many connections"
BACKUP_STALE = "last backup {h}h ago (warn 26h, crit 50h)"
LOG_ERRORS = "{n} errors: ERROR {n} (3 warnings); ERROR:  deadlock detected"


@dataclass(frozen=True)
class Weather:
    """Shares of the fleet in each kind of trouble, 0..1."""

    unreachable: float = 0.0
    postgres_down: float = 0.0
    offline: float = 0.0
    backups_failed: float = 0.0
    backups_stale: float = 0.0
    warnings: float = 0.0  # a database with a warn/crit check besides the headline ones
    log_errors: float = 0.0
    disk_full: float = 0.0
    detail: str = ""  # extra words in every detail (long, hostile, unicode)
    incidents: int = 0


ALL_BACKUPS_FAILED = Weather(backups_failed=1.0)


def check(name: str, verdict: str, value: Any = None, detail: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "verdict": verdict,
        "value": value,
        "warn": None,
        "crit": None,
        "detail": detail,
    }


def _name(prefix: str, i: int) -> str:
    return f"{prefix}{i:03d}"


def fleet_report(
    servers: int, databases: int, weather: Weather = Weather(), seed: int = 0
) -> dict[str, Any]:
    """``servers`` servers with ``databases`` customer databases each, in ``weather``."""
    rng = random.Random(seed)
    extra = f" {weather.detail}" if weather.detail else ""
    out_servers: list[dict[str, Any]] = []
    out_dbs: list[dict[str, Any]] = []
    for s in range(servers):
        name = _name("vps", s)
        reachable = rng.random() >= weather.unreachable
        pg_up = reachable and rng.random() >= weather.postgres_down
        disk = rng.randint(90, 99) if rng.random() < weather.disk_full else rng.randint(20, 70)
        errors = rng.randint(1, 40) if rng.random() < weather.log_errors else 0
        checks = [
            check(
                "connection",
                "ok" if pg_up else "crit",
                3 if pg_up else None,
                "" if pg_up else (PG_DOWN if reachable else SERVER_DOWN.format(n=s)) + extra,
            ),
            check(
                "disk_space",
                "ok" if disk < 90 else "crit",
                disk if reachable else None,
                f"/var/lib/postgresql {disk}% used{extra}" if reachable else "not answering",
            ),
            check(
                "logfile",
                "crit" if errors else "ok",
                errors,
                LOG_ERRORS.format(n=errors) + extra if errors else "no errors",
            ),
            check("backends", "ok", 12, "12 of 100 connections"),
        ]
        out_servers.append(
            {
                "name": name,
                "reachable": reachable,
                "postgres": "up" if pg_up else "down",
                "checks": checks,
            }
        )
        for d in range(databases):
            customer = f"c{s:03d}x{d:02d}"
            online = pg_up and rng.random() >= weather.offline
            failed = rng.random() < weather.backups_failed
            stale = not failed and rng.random() < weather.backups_stale
            hours = rng.randint(27, 90)
            last = NOW - timedelta(hours=hours if (failed or stale) else 6)
            if failed:
                age = check("backup_age", "crit", hours * 3600, BACKUP_FAILED + extra)
            elif stale:
                age = check("backup_age", "warn", hours * 3600, BACKUP_STALE.format(h=hours))
            else:
                age = check("backup_age", "ok", 6 * 3600, "last backup 6h ago")
            db_checks = [
                check(
                    "connection",
                    "ok" if online else "crit",
                    None,
                    "" if online else DB_OFFLINE.format(db=customer) + extra,
                ),
                age,
                check("backup_verified", "ok", None, "restore test ok"),
            ]
            if online and rng.random() < weather.warnings:
                db_checks.append(
                    check("txn_idle", "warn", 700, f"idle in transaction for 11m40s{extra}")
                )
            out_dbs.append(
                {
                    "customer": customer,
                    "server": name,
                    "database": customer,
                    "online": online,
                    "size_bytes": rng.randint(10**6, 10**10) if online else None,
                    "last_backup_at": last.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "recovery": None,
                    "checks": db_checks,
                }
            )
    worst = {"ok": 0, "unknown": 1, "warn": 2, "crit": 3}
    verdicts = [c["verdict"] for e in out_servers + out_dbs for c in e["checks"]]
    verdict = max(verdicts or ["ok"], key=lambda v: worst[v])
    summary = {
        "servers_up": sum(1 for s in out_servers if s["reachable"] and s["postgres"] == "up"),
        "servers_total": len(out_servers),
        "databases_online": sum(1 for d in out_dbs if d["online"]),
        "databases_total": len(out_dbs),
        "backups_ok": sum(
            1
            for d in out_dbs
            for c in d["checks"]
            if c["name"] == "backup_age" and c["verdict"] == "ok"
        ),
        "verdict": verdict,
    }
    incidents = [
        {
            "id": i + 1,
            "priority": "P0" if i % 3 == 0 else "P2",
            "title": f"vps{i:03d} down {weather.detail}".strip(),
        }
        for i in range(weather.incidents)
    ]
    return {
        "generated_at": NOW.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_ms": 4321,
        "servers": out_servers,
        "databases": out_dbs,
        "summary": summary,
        "open_incidents": incidents,
    }


def customer_status(report: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """`dbops status <customer>` for one database of ``report`` (core.report.customer_status's
    shape)."""
    db = report["databases"][index]
    server = next(s for s in report["servers"] if s["name"] == db["server"])
    disk = next(c for c in server["checks"] if c["name"] == "disk_space")
    worst = {"ok": 0, "unknown": 1, "warn": 2, "crit": 3}
    verdicts = [c["verdict"] for c in server["checks"] + db["checks"]]
    return {
        "generated_at": report["generated_at"],
        "duration_ms": 812,
        "customer": db["customer"],
        "database": db,
        "server": server,
        "connections": 4 if db["online"] else None,
        "disk": {"used_percent": disk["value"], "filesystems": []},
        "verdict": max(verdicts, key=lambda v: worst[v]),
        "plan": "pro",
    }


def servers_view(report: dict[str, Any]) -> list[dict[str, Any]]:
    """core.ops.Ops.servers() of ``report``: each server, its customer count, its problems."""
    count: dict[str, int] = {}
    for db in report["databases"]:
        count[db["server"]] = count.get(db["server"], 0) + 1
    return [
        {
            **s,
            "customers": count.get(s["name"], 0),
            "problems": [c for c in s["checks"] if c["verdict"] != "ok"],
        }
        for s in report["servers"]
    ]
