"""The `dbops` command line. Each command is parse -> core -> print; read commands take --json.

Start-up is kept short (bench/startup.py): this module imports typer and what builds the
command tree; each command imports its machinery (the database, the fleet, SSH, rich) inside
its own function, so `dbops --help` loads none of it and `dbops status` only what status uses.
"""

from __future__ import annotations

import getpass
import json
import sys
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from core.errors import DbopsError

if TYPE_CHECKING:
    from rich.console import Console

    from bot.runtime import Runtime as Context
    from core.ops import Ops
    from storage.chain import Checkpoint

app = typer.Typer(
    help="dbops: ChatOps for a managed-PostgreSQL fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The dbops database itself.", no_args_is_help=True)
events_app = typer.Typer(help="The append-only event log.", no_args_is_help=True)
fleet_app = typer.Typer(help="Servers and customers.", no_args_is_help=True)
incident_app = typer.Typer(help="Incidents, as the event log records them.", no_args_is_help=True)
jobs_app = typer.Typer(help="The scheduled jobs: list them, or run one now.")
sandbox_app = typer.Typer(
    help="A fleet of real PostgreSQL clusters on this machine.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(events_app, name="events")
app.add_typer(fleet_app, name="fleet")
app.add_typer(incident_app, name="incident")
app.add_typer(jobs_app, name="jobs")
app.add_typer(sandbox_app, name="sandbox")


@cache
def _console(stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr)


def _out() -> Console:
    return _console(stderr=False)


def _err() -> Console:
    return _console(stderr=True)


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _ctx() -> Context:
    from bot.runtime import Runtime

    return Runtime.load()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the dbops schema to this version."""
    from storage.migrate import upgrade

    ctx = _ctx()
    before, after = upgrade(ctx.engine)
    if before == after:
        _out().print(f"Schema already at {after}.")
    else:
        _out().print(f"Schema upgraded from {before or 'empty'} to {after}.")
        ctx.events.append("db.upgrade", "schema", {"from": before, "to": after}, actor="cli")


@db_app.command("status")
def db_status(as_json: JsonFlag = False) -> None:
    """Show the schema revision against the one this dbops needs."""
    from storage.migrate import current_revision, head_revision

    ctx = _ctx()
    current, head = current_revision(ctx.engine), head_revision()
    if as_json:
        print(json.dumps({"current": current, "head": head, "ok": current == head}))
    else:
        _out().print(f"schema {current or 'empty'}; this dbops needs {head}")
    raise typer.Exit(0 if current == head else 1)


@events_app.command("tail")
def events_tail(
    n: Annotated[int, typer.Option("-n", help="How many of the newest events.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """The newest events, oldest first."""
    from rich.table import Table

    from storage.events import iso

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
    _out().print(table)


CheckpointsOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoints",
        help="Published checkpoints to check against (a DBOPS_CHECKPOINTS file, or lines copied "
        "from the ops channel). Default: DBOPS_CHECKPOINTS when set.",
    ),
]


def _checkpoints(ctx: Context, path: Path | None) -> list[Checkpoint]:
    from core.checkpoints import read_checkpoints

    path = path or ctx.settings.dbops_checkpoints
    if path is None or (not path.exists() and path == ctx.settings.dbops_checkpoints):
        return []
    try:
        return read_checkpoints(path)
    except OSError as exc:
        raise DbopsError(f"cannot read checkpoints from {path}: {exc.strerror}") from None
    except ValueError as exc:  # a damaged witness fails the check, it is not skipped
        _err().print(f"checkpoints refused: {exc}", highlight=False, markup=False)
        raise typer.Exit(1) from None


@events_app.command("verify")
def events_verify(
    checkpoints: CheckpointsOpt = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Verify an export (`dbops events export`) instead of the log."),
    ] = None,
) -> None:
    """Check the hash chain, the seals and the published checkpoints; exit 0 when intact, 1
    naming the first bad event (edited, inserted, deleted, reordered, replaced, or a log cut
    back past a checkpoint)."""
    from storage.audit import read_export, verify_export

    if file is not None:
        ctx = _ctx()  # offline: an auditor's machine has no dbops database
        try:
            with file.open(encoding="utf-8") as lines:
                exported = read_export(lines, file.name)
        except OSError as exc:
            raise DbopsError(f"cannot read {file}: {exc.strerror}") from None
        except ValueError as exc:
            _err().print(f"export refused: {exc}", highlight=False, markup=False)
            raise typer.Exit(1) from None
        verdict = verify_export(exported, ctx.keys, _checkpoints(ctx, checkpoints))
    else:
        ctx = _ctx().ready()
        verdict = ctx.events.verify(_checkpoints(ctx, checkpoints))
    if verdict.ok:
        print(verdict)
        return
    print(verdict, file=sys.stderr)
    raise typer.Exit(1)


def _when(text: str, tz: Any, option: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise DbopsError(
            f"{option} {text!r} is not a time: use ISO 8601, e.g. 2026-12-01 or "
            "2026-12-01T08:00:00Z (no offset: TIMEZONE)"
        ) from None
    return when.replace(tzinfo=tz) if when.tzinfo is None else when


@events_app.command("export")
def events_export(
    since: Annotated[
        str | None, typer.Option("--from", help="First moment (ISO 8601), inclusive.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", help="Last moment (ISO 8601), exclusive. Default: now.")
    ] = None,
    customer: Annotated[
        str | None, typer.Option("--customer", help="Only this customer's events in full.")
    ] = None,
    incident: Annotated[
        str | None, typer.Option("--incident", help="Only this incident's events in full.")
    ] = None,
) -> None:
    """Events as JSON lines with the checkpoints that vouch for them: verifiable on its own
    with `dbops events verify --file`. Events the filters leave out are shown by digest only."""
    from core.checkpoints import append_checkpoint
    from core.incidents import parse_incident_id
    from storage.audit import export

    ctx = _ctx().ready()
    tz = ctx.settings.tz
    start = _when(since, tz, "--from") if since else datetime(1970, 1, 1, tzinfo=UTC)
    end = _when(until, tz, "--to") if until else datetime.now(UTC) + timedelta(seconds=1)
    ref = f"inc-{parse_incident_id(incident)}" if incident else None
    published = _checkpoints(ctx, None)

    def seal() -> Checkpoint:  # a checkpoint of its own, published like any other
        checkpoint = ctx.events.checkpoint()
        if ctx.settings.dbops_checkpoints is not None:
            append_checkpoint(ctx.settings.dbops_checkpoints, checkpoint)
        return checkpoint

    export(
        ctx.events,
        sys.stdout,
        since=start,
        until=end,
        customer=customer,
        incident=ref,
        published=published,
        seal=seal,
        now=datetime.now(UTC),
    )


@events_app.command("checkpoint")
def events_checkpoint(as_json: JsonFlag = False) -> None:
    """Publish a checkpoint of the log's head now: signed with the current key, appended to
    DBOPS_CHECKPOINTS and posted to OPS_CHANNEL."""
    from core.checkpoints import publish

    ctx = _ctx().ready()
    settings = ctx.settings
    notifier = _worker_notifier(ctx, console=sys.stderr) if settings.slack_bot_token else None
    checkpoint = publish(ctx.events, notifier, settings.ops_channel, settings.dbops_checkpoints)
    if as_json:
        _print_json(
            {
                **checkpoint.as_json(),
                "file": str(settings.dbops_checkpoints) if settings.dbops_checkpoints else None,
                "posted_to": settings.ops_channel if notifier is not None else None,
            }
        )
        return
    where = [str(settings.dbops_checkpoints)] if settings.dbops_checkpoints else []
    where += [settings.ops_channel] if notifier is not None else []
    signed = f"signed by key {checkpoint.key_id}" if checkpoint.key_id else "unsigned (no key)"
    print(
        f"checkpoint: event {checkpoint.id} of {checkpoint.count}, hash {checkpoint.hash}, "
        f"{signed}; published to {', '.join(where) or 'nowhere (set DBOPS_CHECKPOINTS)'}"
    )
    print(checkpoint.line())


@events_app.command("keygen")
def events_keygen() -> None:
    """Print a new event-log key (evk_...). Append it to the key file DBOPS_EVENTS_KEY names:
    the last key seals from the next event on, the older ones stay to verify their segments."""
    from storage import eventkeys

    print(eventkeys.generate())


@events_app.command("keys")
def events_keys(as_json: JsonFlag = False) -> None:
    """DBOPS_EVENTS_KEY's keys, oldest first: ids and public keys (give those to an auditor:
    they verify checkpoints and exports, and cannot write either). Never the secrets."""
    keys = _ctx().keys
    rows = [
        {
            "key_id": k.id,
            "public_key": k.public_text,
            "secret": k.has_secret,
            "current": keys is not None and keys.current is k,
        }
        for k in (keys.keys if keys else ())
    ]
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _out().print("DBOPS_EVENTS_KEY is not set: the event log is unkeyed.")
    for r in rows:
        mark = " (current)" if r["current"] else "" if r["secret"] else " (public only)"
        print(f"{r['key_id']}  {r['public_key']}{mark}")


@incident_app.command("report")
def incident_report_cmd(
    incident: Annotated[str, typer.Argument(help="The incident: 12, inc-12 or #12.")],
    as_json: JsonFlag = False,
) -> None:
    """An incident's report from the event log: timeline, time to ack and to resolve, customers
    affected, emails sent, SLA credits with their Stripe ids."""
    from core.incident_report import incident_report
    from core.incident_report import render_text as render_incident_report
    from core.incidents import parse_incident_id

    ctx = _ctx().ready()
    report = incident_report(ctx.events, f"inc-{parse_incident_id(incident)}")
    if as_json:
        _print_json(report.as_json())
    else:
        print(render_incident_report(report, ctx.settings.tz))


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=2, default=str))


def _ops(ctx: Context) -> Ops:
    from core.ops import Ops

    return Ops(ctx.fleet, ctx.engine, ctx.events)


@app.command("report")
def report_cmd(as_json: JsonFlag = False) -> None:
    """The morning report (SOP-101): servers, databases, backups, disk, log errors."""
    from bot.views.tables import report_table
    from core.report import render_text

    ctx = _ctx().ready()
    ops = _ops(ctx)
    try:
        report = ops.report()
    finally:
        ops.close()
    ctx.events.append(
        "report.run",
        "fleet",
        {"summary": report["summary"], "duration_ms": report["duration_ms"]},
        actor="cli",
    )
    if as_json:
        _print_json(report)
    elif _out().is_terminal:
        _out().print(report_table(report, ctx.settings.tz))
    else:
        print(render_text(report, ctx.settings.tz))


@app.command("status")
def status_cmd(customer: str, as_json: JsonFlag = False) -> None:
    """One customer's database, its server and its checks."""
    from core.report import render_status_text

    ctx = _ctx().ready()
    ops = _ops(ctx)
    try:
        status = ops.status(customer)
    finally:
        ops.close()
    if as_json:
        _print_json(status)
    else:
        print(render_status_text(status, ctx.settings.tz))


@fleet_app.command("import")
def fleet_import(path: Path) -> None:
    """Add or update customers from a file: JSON (a list, or {"customers": [...]}, such as a
    sandbox.json) or TOML with [[customers]] tables."""
    from core.customers import customer_from_mapping, read_customers, upsert_customers
    from core.names import not_found

    ctx = _ctx().ready()
    customers = [customer_from_mapping(c) for c in read_customers(path)]
    for c in customers:
        if c.server not in {s.name for s in ctx.fleet.servers}:
            raise not_found("server", c.server, [s.name for s in ctx.fleet.servers])
    count = upsert_customers(ctx.engine, customers)
    ctx.events.append(
        "fleet.import",
        "customers",
        {"file": str(path), "customers": [c.name for c in customers]},
        actor="cli",
    )
    _out().print(f"Imported {count} customers.")


@fleet_app.command("trust")
def fleet_trust(server: str) -> None:
    """Fetch SERVER's SSH host key, show its fingerprint and record it in known_hosts."""
    from core.remote import trust_host

    ctx = _ctx().ready()
    srv = ctx.fleet.server(server)
    fingerprint = trust_host(srv, ctx.fleet.known_hosts_path)
    ctx.events.append(
        "fleet.trust",
        srv.name,
        {"fingerprint": fingerprint, "known_hosts": str(ctx.fleet.known_hosts_path)},
        actor="cli",
    )
    _out().print(
        f"{srv.name} ({srv.host}:{srv.ssh_port}) host key {fingerprint} recorded in "
        f"{ctx.fleet.known_hosts_path}. Compare it with the server's own "
        "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` before you rely on it.",
        highlight=False,
    )


@fleet_app.command("list")
def fleet_list(as_json: JsonFlag = False) -> None:
    """The servers of fleet.toml and the customers on each."""
    from rich.table import Table

    from core.customers import list_customers

    ctx = _ctx().ready()
    customers = list_customers(ctx.engine)
    rows = [
        {
            "name": s.name,
            "host": s.host,
            "transport": s.transport,
            "customers": [c.name for c in customers if c.server == s.name],
        }
        for s in ctx.fleet.servers
    ]
    if as_json:
        _print_json(rows)
        return
    table = Table("server", "host", "via", "customers")
    for r in rows:
        table.add_row(
            str(r["name"]), str(r["host"]), str(r["transport"]), ", ".join(r["customers"])
        )
    _out().print(table)


SandboxDir = Annotated[Path, typer.Option("--dir", help="The sandbox directory.")]


@sandbox_app.command("up")
def sandbox_up(
    directory: SandboxDir,
    servers: Annotated[int, typer.Option(help="How many PostgreSQL clusters.")] = 3,
    customers: Annotated[int, typer.Option(help="How many customer databases.")] = 15,
    ssh: Annotated[
        bool, typer.Option("--ssh", help="Reach each server through its own sshd.")
    ] = False,
    pg_version: Annotated[
        int | None,
        typer.Option(
            "--pg-version",
            help="PostgreSQL major, 13 to 18 (default: the machine's own);"
            " one Debian lacks is fetched first with `make pg-bin PG=V`.",
        ),
    ] = None,
) -> None:
    """Start a sandbox fleet (or the one already in --dir); print its JSON; seed its customers
    into DATABASE_URL."""
    from core import sandbox
    from core.customers import customer_from_mapping, upsert_customers
    from storage.migrate import upgrade

    state = sandbox.up(
        directory, servers=servers, customers=customers, ssh=ssh, pg_version=pg_version
    )
    ctx = _ctx()
    upgrade(ctx.engine)
    upsert_customers(ctx.engine, [customer_from_mapping(c) for c in state["customers"]])
    ctx.events.append(
        "sandbox.up",
        "sandbox",
        {
            "dir": str(directory),
            "servers": servers,
            "customers": customers,
            "ssh": ssh,
            "pg_version": pg_version,
        },
        actor="cli",
    )
    _print_json(state)


@sandbox_app.command("down")
def sandbox_down(directory: SandboxDir) -> None:
    """Stop every cluster, sshd and fault process of the sandbox (its files stay)."""
    from core import sandbox

    _print_json(sandbox.down(directory))


@sandbox_app.command("break")
def sandbox_break(directory: SandboxDir, fault: str, target: str) -> None:
    """Break TARGET (a customer or server) with FAULT: db-down, server-down, connections,
    idle-txn, lock, log-errors, backup-missing, pgbouncer-down, ssh-hang (a server, --ssh),
    disk-full (a server: its backup path on a small full tmpfs; needs root)."""
    from core import sandbox

    _print_json(sandbox.break_fault(directory, fault, target))


@sandbox_app.command("heal")
def sandbox_heal(directory: SandboxDir) -> None:
    """Undo every fault currently broken."""
    from core import sandbox

    _print_json(sandbox.heal(directory))


def _worker_notifier(ctx: Context, console: TextIO | None = None) -> Any:
    from bot.notifiers import ConsoleNotifier
    from bot.outbox import outbox_notifier

    if ctx.settings.slack_bot_token is not None:
        return outbox_notifier(ctx.settings, ctx.events, registry=ctx.registry)
    return ConsoleNotifier(console, events=ctx.events)


@app.command("scheduler")
def scheduler_cmd() -> None:
    """Run the scheduled jobs (morning report, sweeps, escalation, checklists). Safe to run
    twice against one PostgreSQL: each job run happens once."""
    import logging

    from bot.outbox import start_outbox_worker
    from bot.scheduler import Worker, run_forever

    ctx = _ctx().ready()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The outbox's worker: what a job's own attempt could not send (a 429, a restart) goes
    # from here, and from `dbops serve`'s.
    stop_outbox = start_outbox_worker(ctx.settings, ctx.events, ctx.registry)
    try:
        run_forever(Worker(ctx.with_notifier(_worker_notifier(ctx))))
    finally:
        stop_outbox()


@jobs_app.callback(invoke_without_command=True)
def jobs_cmd(typer_ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Every scheduled job with its trigger and next run, in UTC and local time."""
    if typer_ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from core.checklists import load_checklists
    from core.jobs import job_specs, jobs_table

    settings = _ctx().settings
    rows = jobs_table(job_specs(settings.tz, load_checklists()), datetime.now(UTC), settings.tz)
    if as_json:
        _print_json(rows)
        return
    table = Table("job", "next run (local)", "next run (UTC)", "what")
    for r in rows:
        table.add_row(
            r["id"],
            (r["next_run_local"] or "")[:16].replace("T", " "),
            (r["next_run_utc"] or "")[:16].replace("T", " "),
            r["description"],
        )
    _out().print(table)


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment nor in the passwd file
        return None


@jobs_app.command("run")
def jobs_run(
    name: Annotated[str, typer.Argument(help="The job, as `dbops jobs` lists it.")],
    as_json: JsonFlag = False,
) -> None:
    """Run one job now, as a recorded manual run; exit 0 when it went well, 1 when it failed.
    What it posts goes to OPS_CHANNEL as the scheduled run's would."""
    import logging

    from bot.scheduler import Worker
    from core.checklists import load_checklists
    from core.jobs import job_specs
    from core.names import closest

    ctx = _ctx()
    names = sorted(s.id for s in job_specs(ctx.settings.tz, load_checklists()))
    if name not in names:
        near = closest(name, names)
        raise DbopsError(
            f"no job {name!r}. The jobs are: {', '.join(names)}.",
            hint=f"Did you mean {', '.join(repr(n) for n in near)}?" if near else None,
        )
    ctx.ready()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # With --json, stdout holds the outcome alone: the console notifier (no Slack token) and
    # the log go to stderr.
    worker = Worker(
        ctx.with_notifier(_worker_notifier(ctx, console=sys.stderr if as_json else None))
    )
    try:
        result = worker.run_manual(name, actor="cli", user=_login())
        flush = getattr(worker.notifier, "flush", None)
        if flush is not None:  # what is due now goes before exit; the rest, from the workers
            flush()
    finally:
        ctx.close()
    outcome = {
        "job": result.job_id,
        "manual": True,
        "ok": result.ok,
        "outcome": "ok" if result.ok else "failed",
        "started_at": result.slot.astimezone(UTC).isoformat() if result.slot else None,
        "duration_ms": result.duration_ms,
        "result": result.outcome,
        "error_id": result.error_id,
        "error": result.error,
    }
    if as_json:
        _print_json(outcome)
    elif result.ok:
        _out().print(f"{name}: ok in {result.duration_ms} ms", highlight=False, markup=False)
        if result.outcome is not None:
            print(json.dumps(result.outcome, ensure_ascii=False, default=str))
    else:
        why = f"error id {result.error_id}: {result.error}" if result.error_id else "see its result"
        _err().print(f"{name}: failed ({why})", highlight=False, markup=False)
        if result.outcome is not None:
            print(json.dumps(result.outcome, ensure_ascii=False, default=str))
    raise typer.Exit(0 if result.ok else 1)


def _register_surfaces() -> None:
    """Commands that live beside the surfaces they start (Slack app, shell, demo)."""
    from bot import serve

    serve.register(app)


_register_surfaces()


def main() -> None:
    try:
        app()
    except DbopsError as exc:
        _err().print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
