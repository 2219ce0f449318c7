"""The morning report (SOP-101) and `dbops status CUSTOMER`, as data and as text.

``build_report`` runs every health check on the fleet (core.health) and returns DESIGN.md's
Report JSON; ``render_text`` turns it into the lines SOP-101 expects ("All 3 VPS servers
responding", "15/15 customer databases online", ...). ``customer_status`` is the same for one
customer's database and server, fast enough for a slash command.

Numbers stay integers (bytes, milliseconds, seconds, percent); times are ISO 8601 in UTC.

Given a ``core.capacity.Trends`` (the measurement history), each server carries the
``disk_runway`` check and ``runway``: ``{days, verdict, detail, full_at, paths[]}``, the
check's own figures (core.health.runway.runway_json); ``runway`` is null without one. The
report made with ``record=True`` (the health sweep's) keeps its measurements in the history.

Given the maintenance windows covering now (``core.windows.Covers``), a server or database a
window covers carries ``maintenance``: ``{id, ref, until, reason}`` (the key is absent when
none does); its checks are reported as they are, but leave the summary's verdict alone, and
the text says "in maintenance until ..." where it would name the failure.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from core.capacity import Trends
from core.customers import Customer
from core.fleet import Fleet
from core.health import (
    LOG_CLEAN,
    Check,
    DatabaseHealth,
    RunnerSource,
    ServerHealth,
    check_fleet,
    log_warnings,
    worst,
)
from core.health.runway import runway_json
from core.remote import Runner
from core.units import pretty_age, pretty_bytes
from core.windows import Cover, Covers

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checks(checks: Iterable[Check]) -> list[dict[str, Any]]:
    return [c.as_json() for c in checks]


def server_json(health: ServerHealth, cover: Cover | None = None) -> dict[str, Any]:
    out = {
        "name": health.name,
        "reachable": health.reachable,
        "postgres": health.postgres,
        "checks": _checks(health.checks),
        "runway": runway_json(health.check("disk_runway"), health.runways),
    }
    if cover is not None:
        out["maintenance"] = cover.as_json()
    return out


def database_json(db: DatabaseHealth, cover: Cover | None = None) -> dict[str, Any]:
    out = {
        "customer": db.customer,
        "server": db.server,
        "database": db.database,
        "online": db.online,
        "size_bytes": db.size_bytes,
        "last_backup_at": iso(db.last_backup_at),
        "recovery": dict(db.recovery) if db.recovery is not None else None,
        "checks": _checks(db.checks),
    }
    if cover is not None:
        out["maintenance"] = cover.as_json()
    return out


def worst_rpo(databases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The worst recovery point across the fleet: the largest ``rpo_seconds`` of any database
    (its server's), and how many databases have no recovery window at all (no archiving, or
    none yet: a lost server would cost them everything since their last dump)."""
    covered = [d for d in databases if d.get("recovery")]
    worst = max(covered, key=lambda d: d["recovery"]["rpo_seconds"], default=None)
    return {
        "rpo_seconds": worst["recovery"]["rpo_seconds"] if worst else None,
        "server": worst["server"] if worst else None,
        "latest": worst["recovery"]["latest"] if worst else None,
        "databases": len(covered),
        "without_recovery": len(databases) - len(covered),
    }


def _orphan(customer: Customer) -> DatabaseHealth:
    """A customer whose server the fleet file does not know: nothing to check it on."""
    why = f"server {customer.server!r} is not in the fleet file"
    return DatabaseHealth(
        customer=customer.name,
        server=customer.server,
        database=customer.database,
        online=False,
        size_bytes=None,
        last_backup_at=None,
        connections=None,
        checks=[Check("connection", "crit", detail=why)],
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _incident(item: Any) -> dict[str, Any]:
    """An open incident as JSON, whatever shape the incidents module hands us."""
    if hasattr(item, "as_json"):
        data = item.as_json()
    elif isinstance(item, Mapping):
        data = dict(item)
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        data = dataclasses.asdict(item)
    else:
        data = {"title": str(item)}
    return dict(_jsonable(data))


def summarize(
    servers: Sequence[dict[str, Any]],
    databases: Sequence[dict[str, Any]],
    checks: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    # What a maintenance window covers is expected to fail: reported, not judged.
    verdicts = [c["verdict"] for c in checks]
    verdicts += [c["verdict"] for s in servers if not s.get("maintenance") for c in s["checks"]]
    verdicts += [c["verdict"] for d in databases if not d.get("maintenance") for c in d["checks"]]
    backups_ok = sum(
        1
        for d in databases
        if any(c["name"] == "backup_age" and c["verdict"] == "ok" for c in d["checks"])
    )
    return {
        "servers_up": sum(1 for s in servers if s["reachable"] and s["postgres"] == "up"),
        "servers_total": len(servers),
        "databases_online": sum(1 for d in databases if d["online"]),
        "databases_total": len(databases),
        "backups_ok": backups_ok,
        "verdict": worst(verdicts),
    }


def build_report(
    fleet: Fleet,
    customers: Iterable[Customer],
    runners: RunnerSource | Any,
    *,
    deadline_s: float = 10.0,
    open_incidents: Iterable[Any] = (),
    now: datetime | None = None,
    log_window: timedelta | None = timedelta(hours=24),
    fleet_checks: Sequence[Check] = (),
    trends: Trends | None = None,
    record: bool = False,
    maintenance: Covers | None = None,
) -> dict[str, Any]:
    """DESIGN.md's Report JSON for the whole fleet, back within ``deadline_s``.

    ``runners``: a mapping of server name to Runner, or a core.remote.RunnerPool. A server that
    does not answer in time is ``crit`` on its own; the rest of the report is unaffected.
    ``log_window``: how far back the PostgreSQL log is read (the night, for the morning report).
    ``fleet_checks``: checks of the fleet as a whole (``backup_run``), the report's ``checks``.
    ``worst_rpo``: see :func:`worst_rpo`.
    ``trends``: the measurement history: each server's ``disk_runway`` check and ``runway``;
    with ``record``, this sweep's figures are kept in it (at ``now``, the sweep's start).
    ``maintenance``: the windows covering now (each covered entry's ``maintenance``).
    """
    started = time.monotonic()
    now = now or datetime.now(UTC)
    people = sorted(customers, key=lambda c: c.name)
    healths = check_fleet(
        fleet,
        people,
        runners,
        deadline_s=deadline_s,
        now=now,
        log_window=log_window,
        runways=trends.runways if trends is not None else None,
    )
    if trends is not None and record:
        trends.record(fleet, healths, now)  # never raises: a failure is logged and counted
    known = {s.name for s in fleet.servers}
    dbs = [db for h in healths for db in h.databases]
    dbs += [_orphan(c) for c in people if c.server not in known]
    covers = maintenance if maintenance else None
    servers = [server_json(h, covers.server(h.name) if covers else None) for h in healths]
    databases = [
        database_json(d, covers.database(d.customer, d.server) if covers else None)
        for d in sorted(dbs, key=lambda d: d.customer)
    ]
    checks = _checks(fleet_checks)
    return {
        "generated_at": iso(now),
        "duration_ms": int((time.monotonic() - started) * 1000),
        "checks": checks,
        "servers": servers,
        "databases": databases,
        "worst_rpo": worst_rpo(databases),
        "summary": summarize(servers, databases, checks),
        "open_incidents": [_incident(i) for i in open_incidents],
    }


def _disk(health: ServerHealth) -> dict[str, Any]:
    systems = [
        {
            "mount": fs.mount,
            "used_percent": fs.used_percent,
            "used_bytes": fs.used_bytes,
            "size_bytes": fs.size_bytes,
            "avail_bytes": fs.avail_bytes,
            "paths": list(fs.paths),
        }
        for fs in health.filesystems
    ]
    top = max((fs.used_percent for fs in health.filesystems), default=None)
    return {"used_percent": top, "filesystems": systems}


def customer_status(
    fleet: Fleet,
    customer: Customer,
    runner: Runner | None,
    *,
    deadline_s: float = 2.5,
    now: datetime | None = None,
    trends: Trends | None = None,
    maintenance: Covers | None = None,
) -> dict[str, Any]:
    """`dbops status acme`: the customer's database entry, its server's entry, connections now
    and the server's disk; back within ``deadline_s`` (a slash command has 3 seconds).
    ``trends``: the server's ``disk_runway`` check and ``runway`` from the history;
    ``maintenance``: the windows covering now (``maintenance`` on the entries they cover)."""
    started = time.monotonic()
    now = now or datetime.now(UTC)
    server = fleet.server(customer.server)
    runners = {server.name: runner} if runner is not None else {}
    (health,) = check_fleet(
        fleet,
        [customer],
        runners,
        deadline_s=deadline_s,
        servers=[server.name],
        now=now,
        log_window=timedelta(hours=1),
        runways=trends.runways if trends is not None else None,
    )
    db = health.databases[0]
    covers = maintenance if maintenance else None
    server_entry = server_json(health, covers.server(health.name) if covers else None)
    database_entry = database_json(db, covers.database(db.customer, db.server) if covers else None)
    checks = [
        c
        for entry in (server_entry, database_entry)
        if not entry.get("maintenance")
        for c in entry["checks"]
    ]
    return {
        "generated_at": iso(now),
        "duration_ms": int((time.monotonic() - started) * 1000),
        "customer": customer.name,
        "database": database_entry,
        "server": server_entry,
        "connections": db.connections,
        "disk": _disk(health),
        "verdict": worst(c["verdict"] for c in checks),
    }


def _in_maintenance(entry: Mapping[str, Any], tz: ZoneInfo | None) -> str | None:
    """ "in maintenance until 14:30 EST (kernel upgrade)" for an entry a window covers."""
    cover = entry.get("maintenance")
    if not cover:
        return None
    return f"in maintenance until {_local(cover.get('until'), tz)} ({cover.get('reason', '')})"


# --- text ------------------------------------------------------------------------------------


def _env() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=False,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["bytes"] = lambda n: "?" if n is None else pretty_bytes(int(n))
    env.filters["age"] = lambda s: "?" if s is None else pretty_age(int(s))
    return env


def _check(checks: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in checks if c["name"] == name), None)


def _local(stamp: str | None, tz: ZoneInfo | None) -> str:
    if not stamp:
        return "never"
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if tz is not None:
        return when.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
    return when.strftime("%Y-%m-%d %H:%M UTC")


def text_view(report: Mapping[str, Any], tz: ZoneInfo | None = None) -> dict[str, Any]:
    """What the report template shows, worked out here so the template only lays it out."""
    servers, databases = report["servers"], report["databases"]
    down = []
    for s in servers:
        if s["reachable"] and s["postgres"] == "up":
            continue
        conn = _check(s["checks"], "connection")
        disk = _check(s["checks"], "disk_space")
        why = _in_maintenance(s, tz) or (
            (disk or {}).get("detail", "not answering")
            if not s["reachable"]
            else "PostgreSQL down: " + (conn or {}).get("detail", "")
        )
        down.append({"name": s["name"], "why": why})
    offline = [
        {
            "customer": d["customer"],
            "server": d["server"],
            "why": _in_maintenance(d, tz)
            or (_check(d["checks"], "connection") or {}).get("detail", ""),
        }
        for d in databases
        if not d["online"]
    ]
    bad_backups = []
    for d in databases:
        age = _check(d["checks"], "backup_age")
        if age is not None and age["verdict"] != "ok":
            why = _in_maintenance(d, tz) or age["detail"]
            bad_backups.append({"customer": d["customer"], "why": why})
    # The windows covering something now: one line each, whatever they cover.
    maintenance: dict[str, dict[str, Any]] = {}
    for entry in [*servers, *databases]:
        cover = entry.get("maintenance")
        if cover:
            where = maintenance.setdefault(
                str(cover.get("ref")),
                {
                    "ref": cover.get("ref"),
                    "until": _local(cover.get("until"), tz),
                    "reason": cover.get("reason", ""),
                    "where": [],
                },
            )
            where["where"].append(entry.get("name") or entry.get("customer"))
    disks = []
    for s in servers:
        disk = _check(s["checks"], "disk_space")
        if disk is not None and isinstance(disk["value"], int):
            disks.append(
                {"server": s["name"], "percent": disk["value"], "verdict": disk["verdict"]}
            )
    logs = []
    for s in servers:
        log = _check(s["checks"], "logfile")
        if log is None or (log["verdict"] == "ok" and log["detail"] in (LOG_CLEAN, "")):
            continue
        # value: ERROR, FATAL and PANIC lines; WARNING lines are counted apart in the detail.
        unknown = log["verdict"] == "unknown"
        logs.append(
            {
                "server": s["name"],
                "verdict": log["verdict"],
                "count": None if unknown else (log["value"] or 0),
                "warnings": log_warnings(log["detail"]),
                "detail": log["detail"],
            }
        )
    # Disk runway, where the servers carry one (a report made with the history): its own line.
    runways = [{"server": s["name"], **s["runway"]} for s in servers if s.get("runway")]
    filling = sorted((r for r in runways if r["days"] is not None), key=lambda r: r["days"])
    runway = (
        {
            "shortest": filling[0] if filling else None,
            "known": any(r["verdict"] != "unknown" for r in runways),
            "why": next((r["detail"] for r in runways if r["verdict"] == "unknown"), ""),
            "alerts": [r for r in runways if r["verdict"] in ("warn", "crit")],
        }
        if runways
        else None
    )
    shown = {"connection", "backup_age", "disk_space", "logfile"}
    if runway is not None:
        shown.add("disk_runway")
    others = [
        {
            "where": s["name"],
            "name": c["name"],
            "verdict": c["verdict"],
            "detail": _in_maintenance(s, tz) or c["detail"],
        }
        for s in servers
        if s["reachable"] and s["postgres"] == "up"
        for c in s["checks"]
        if c["verdict"] in ("warn", "crit") and c["name"] not in shown
    ]
    others += [
        {
            "where": d["customer"],
            "name": c["name"],
            "verdict": c["verdict"],
            "detail": _in_maintenance(d, tz) or c["detail"],
        }
        for d in databases
        if d["online"]
        for c in d["checks"]
        if c["verdict"] in ("warn", "crit") and c["name"] not in shown
    ]
    percents = [d["percent"] for d in disks]
    # Fleet-wide checks (backup_run, the dead-man's switch) that are not ok, first in the list.
    others[:0] = [
        {"where": "fleet", "name": c["name"], "verdict": c["verdict"], "detail": c["detail"]}
        for c in report.get("checks", [])
        if c["verdict"] in ("warn", "crit")
    ]
    return {
        "when": _local(report.get("generated_at"), tz),
        "summary": report["summary"],
        "down": down,
        "offline": offline,
        "bad_backups": bad_backups,
        "worst_rpo": report.get("worst_rpo"),
        "disk_low": min(percents) if percents else None,
        "disk_high": max(percents) if percents else None,
        "disk_alerts": [d for d in disks if d["verdict"] != "ok"],
        "runway": runway,
        "logs": logs,
        "log_errors": sum(entry["count"] or 0 for entry in logs),
        "log_warnings": sum(entry["warnings"] for entry in logs),
        "logs_ok": all(entry["verdict"] == "ok" and not entry["count"] for entry in logs),
        "incidents": report.get("open_incidents", []),
        "others": others,
        "maintenance": list(maintenance.values()),
        "duration_ms": report.get("duration_ms"),
    }


def render_text(report: Mapping[str, Any], tz: ZoneInfo | None = None) -> str:
    """The report as SOP-101's expected output reads (templates/report.txt.j2)."""
    return _env().get_template("report.txt.j2").render(**text_view(report, tz))


def render_status_text(status: Mapping[str, Any], tz: ZoneInfo | None = None) -> str:
    """`dbops status acme` as text (templates/status.txt.j2)."""
    db = status["database"]
    age = _check(db["checks"], "backup_age")
    problems = [
        c for c in status["server"]["checks"] + db["checks"] if c["verdict"] in ("warn", "crit")
    ]
    return (
        _env()
        .get_template("status.txt.j2")
        .render(
            status=status,
            db=db,
            conn=_check(db["checks"], "connection"),
            backup_age=age["value"] if age else None,
            last_backup=_local(db["last_backup_at"], tz) if db["last_backup_at"] else None,
            recovery_from=_local((db.get("recovery") or {}).get("earliest"), tz),
            recovery_to=_local((db.get("recovery") or {}).get("latest"), tz),
            problems=problems,
        )
    )


def health_view(health: ServerHealth, customers: Sequence[str]) -> dict[str, Any]:
    """A server's health as an incident card shows it: the server's JSON, and with it the
    database's when the incident is about one customer."""
    server = server_json(health)
    if len(customers) == 1:
        db = next((d for d in health.databases if d.customer == customers[0]), None)
        if db is not None:
            return {"server": server, "database": database_json(db)}
    return server
