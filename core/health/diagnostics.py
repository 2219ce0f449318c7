"""Diagnostics for an incident on a server: what the on-call person looks at first."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.fleet import Fleet
from core.health.queries import Limits, fetch_cluster, pg_error_text
from core.health.sweep import ServerHealth

TOP_ACTIVITY = 5


def diagnose(fleet: Fleet, server: str, health: ServerHealth, deadline_s: float) -> dict[str, Any]:
    """What an incident's thread shows first: the top of pg_stat_activity, blocking locks, recent
    log errors, disk; short, from one quick connection (within ``deadline_s``) and the checks
    ``health`` just ran. Never raises for the server: a failure to look is in ``connection``."""

    def detail(name: str) -> str:
        check = health.check(name)
        return f"{check.verdict}: {check.detail}" if check else ""

    out: dict[str, Any] = {
        "server": server,
        "postgres": health.postgres,
        "connection": conn.detail if (conn := health.check("connection")) else "",
        "activity": None,
        "locks": detail("locks"),
        "log": detail("logfile"),
        "disk": detail("disk_space"),
        "taken_at": datetime.now(UTC),
    }
    if health.postgres != "up":
        return out
    try:
        stats = fetch_cluster(fleet.server(server), Limits.for_deadline(deadline_s))
    except Exception as exc:  # diagnostics are a courtesy: never fail the open over them
        out["connection"] = pg_error_text(exc)
        return out
    busy = sorted(
        (a for a in stats.activity if a.state not in (None, "idle")),
        key=lambda a: (a.xact_s, a.state_s),
        reverse=True,
    )
    out["activity"] = [
        {
            "pid": a.pid,
            "datname": a.datname,
            "usename": a.usename,
            "state": a.state,
            "xact_s": a.xact_s,
            "state_s": a.state_s,
            "query": a.query,
        }
        for a in busy[:TOP_ACTIVITY]
    ]
    waiting: dict[str, int] = {}
    for granted, mode, datname in stats.locks:
        if granted is False:
            key = f"{datname} {mode}"
            waiting[key] = waiting.get(key, 0) + 1
    if waiting:
        top = sorted(waiting.items(), key=lambda kv: -kv[1])[:5]
        out["locks"] = (
            f"{sum(waiting.values())} waiting: "
            + ", ".join(f"{n}x {k}" for k, n in top)
            + (f" ({out['locks']})" if out["locks"] else "")
        )
    return out
