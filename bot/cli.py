"""The `dbops` command line. Each command is parse -> core -> print; read commands take --json."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bot.context import Context
from core.errors import DbopsError
from storage.events import iso
from storage.migrate import current_revision, head_revision, upgrade

app = typer.Typer(
    help="dbops: ChatOps for a managed-PostgreSQL fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The dbops database itself.", no_args_is_help=True)
events_app = typer.Typer(help="The append-only event log.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(events_app, name="events")

out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _ctx() -> Context:
    return Context.load()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the dbops schema to this version."""
    ctx = _ctx()
    before, after = upgrade(ctx.engine)
    if before == after:
        out.print(f"Schema already at {after}.")
    else:
        out.print(f"Schema upgraded from {before or 'empty'} to {after}.")
        ctx.events.append("db.upgrade", "schema", {"from": before, "to": after}, actor="cli")


@db_app.command("status")
def db_status(as_json: JsonFlag = False) -> None:
    """Show the schema revision against the one this dbops needs."""
    ctx = _ctx()
    current, head = current_revision(ctx.engine), head_revision()
    if as_json:
        print(json.dumps({"current": current, "head": head, "ok": current == head}))
    else:
        out.print(f"schema {current or 'empty'}; this dbops needs {head}")
    raise typer.Exit(0 if current == head else 1)


@events_app.command("tail")
def events_tail(
    n: Annotated[int, typer.Option("-n", help="How many of the newest events.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """The newest events, oldest first."""
    ctx = _ctx().ready()
    rows = ctx.events.tail(n)
    if as_json:
        print(json.dumps([e.as_json() for e in rows], ensure_ascii=False, indent=2))
        return
    table = Table("id", "time (UTC)", "kind", "actor", "subject", "payload")
    for e in rows:
        payload = json.dumps(e.payload, ensure_ascii=False, sort_keys=True)
        table.add_row(
            str(e.id),
            iso(e.ts)[:19].replace("T", " "),
            e.kind,
            e.actor or "",
            e.subject or "",
            payload if len(payload) < 80 else payload[:77] + "...",
        )
    out.print(table)


@events_app.command("verify")
def events_verify() -> None:
    """Check the hash chain; exit 0 when intact, 1 naming the first bad event."""
    ctx = _ctx().ready()
    verdict = ctx.events.verify()
    if verdict.ok:
        out.print(str(verdict))
        return
    err.print(str(verdict))
    raise typer.Exit(1)


@events_app.command("export")
def events_export() -> None:
    """Every event as JSON lines, oldest first (hashes included, so a copy can be verified)."""
    ctx = _ctx().ready()
    write = sys.stdout.write
    for e in ctx.events.iter_all():
        write(json.dumps(e.as_json(), ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    try:
        app()
    except DbopsError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
