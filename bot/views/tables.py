"""Rich tables for the terminal: `dbops report` on a tty."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Group
from rich.table import Table
from rich.text import Text

from core.units import pretty_bytes

STYLE = {"ok": "green", "warn": "yellow", "crit": "bold red", "unknown": "dim"}


def _verdict(v: str) -> Text:
    return Text(v, style=STYLE.get(v, ""))


def _problems(checks: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{c['name']}: {c['detail']}" for c in checks if c["verdict"] in ("warn", "crit")
    )


def report_table(report: Mapping[str, Any], tz: ZoneInfo | None = None) -> Group:
    s = report["summary"]
    head = Text.assemble(
        ("Morning report  ", "bold"),
        _verdict(s["verdict"]),
        f"   servers {s['servers_up']}/{s['servers_total']}"
        f"   databases {s['databases_online']}/{s['databases_total']}"
        f"   backups {s['backups_ok']}/{s['databases_total']}"
        f"   ({report.get('duration_ms', '?')} ms)",
    )
    servers = Table("server", "reachable", "postgres", "verdict", "problems", title="Servers")
    for srv in report["servers"]:
        verdict = max((c["verdict"] for c in srv["checks"]), key=_rank, default="unknown")
        servers.add_row(
            srv["name"],
            "yes" if srv["reachable"] else "NO",
            srv["postgres"],
            _verdict(verdict),
            _problems(srv["checks"]),
        )
    dbs = Table(
        "customer",
        "server",
        "online",
        "size",
        "last backup (UTC)",
        "problems",
        title="Customer databases",
    )
    for db in report["databases"]:
        size = pretty_bytes(db["size_bytes"]) if db["size_bytes"] is not None else "?"
        last = (db["last_backup_at"] or "never")[:16].replace("T", " ")
        dbs.add_row(
            db["customer"],
            db["server"],
            "yes" if db["online"] else "NO",
            size,
            last,
            _problems(db["checks"]),
        )
    return Group(head, servers, dbs)


def _rank(verdict: str) -> int:
    return {"ok": 0, "unknown": 1, "warn": 2, "crit": 3}.get(verdict, 1)
