"""`dbops serve`, `dbops shell` and `dbops demo`: the commands that start the bot's surfaces."""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # each command imports what it runs: `dbops --help` loads none of it
    from bot.runtime import Runtime

DEMO_DIR = Path(".demo")
DEMO_USER = "U_DEMO"
DEMO_SERVERS, DEMO_CUSTOMERS = 3, 15  # shaped like the manuals' fleet (SOP-101)
WELCOME = """\
dbops demo: {servers} sandbox servers, {customers} customers, running on this machine.
You are {user}, an admin. Try:
  /db help
  /db status {first}
  /db report
  /db servers
  /db log {first}
  /db restore {first}   /db provision newco --plan small --email you@example.com
  press 1            (presses button [1] of the last reply; a red one asks yes first)
Sandbox: {dir} (stop it with `dbops sandbox down --dir {dir}`); event log: {db}.{moved}
"""


def _logging() -> None:
    logging.basicConfig(
        level=os.environ.get("DBOPS_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
    ) -> None:
        """The Slack app: POST /slack/events, GET /healthz (Socket Mode with SLACK_APP_TOKEN)."""
        from bot.commands.provision import require_email_branding
        from bot.runtime import Runtime
        from bot.web import asgi

        _logging()
        # Appends from many threads go in together (storage/group_commit.py).
        rt = Runtime.load(group_commit=True).ready()
        require_email_branding(rt.settings, lambda: rt.fleet)
        asgi.serve(rt, host, port)

    @app.command("shell")
    def shell(
        user: Annotated[
            str, typer.Option("--as", help="Slack user id to act as (roles apply).")
        ] = "U_SHELL",
    ) -> None:
        """The bot in a terminal: type `/db ...` lines, `press N` to press a button."""
        from bot.commands.provision import require_email_branding
        from bot.runtime import Runtime

        rt = Runtime.load().ready()
        require_email_branding(rt.settings, lambda: rt.fleet)
        _run_shell(rt, user)

    @app.command("demo")
    def demo(
        directory: Annotated[Path, typer.Option("--dir", help="Where the demo lives.")] = DEMO_DIR,
    ) -> None:
        """A sandbox fleet, a SQLite event log and the shell, in one command."""
        rt, state = _demo_runtime(directory)
        first = state["customers"][0]["name"]
        typer.echo(
            WELCOME.format(
                servers=len(state["servers"]),
                customers=len(state["customers"]),
                user=DEMO_USER,
                first=first,
                dir=state["dir"],
                db=rt.settings.database_url,
                moved=_moved_note(directory, state),
            )
        )
        if rt.settings.slack_bot_token and (
            rt.settings.slack_signing_secret or rt.settings.slack_app_token
        ):
            _serve_in_background(rt)
        _run_shell(rt, DEMO_USER, extra_admins=[DEMO_USER])


def _moved_note(directory: Path, state: dict[str, Any]) -> str:
    link = directory.expanduser().resolve() / "sandbox"
    if not link.is_symlink():
        return ""
    return (
        f"\nThe clusters run as the postgres user, who cannot enter {directory.resolve()}: their"
        f" data is in {state['dir']} ({link} links to it)."
    )


def _run_shell(rt: Runtime, user: str, extra_admins: list[str] | None = None) -> None:
    from bot.shell import HINT, Shell
    from bot.slack.background import checkpointer_for, make_router

    router = make_router(rt, extra_admins=extra_admins or [])
    checkpointer = checkpointer_for(rt, router.events)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(HINT)
    try:
        Shell(router, user).loop(sys.stdin, prompt=interactive)
    except KeyboardInterrupt:
        typer.echo("")
    finally:
        if checkpointer is not None:
            checkpointer.close()
        rt.close()


def _demo_runtime(directory: Path) -> tuple[Runtime, dict[str, Any]]:
    from bot.runtime import Runtime
    from core import sandbox
    from core.customers import customer_from_mapping, upsert_customers
    from storage.migrate import upgrade

    base = directory.expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    # Under a home closed to others (root's on Debian), the clusters live under /var/tmp.
    box = sandbox.reachable_dir(base / "sandbox")
    box.mkdir(parents=True, exist_ok=True)
    # Real sshds when the machine has OpenSSH, so the demo goes over SSH as production does.
    servers, customers, ssh = DEMO_SERVERS, DEMO_CUSTOMERS, Path(sandbox.SSHD).exists()
    if (box / sandbox.STATE_FILE).exists():  # reuse it, whatever its shape
        old = sandbox.load_state(box)
        servers, customers, ssh = len(old["servers"]), len(old["customers"]), bool(old["ssh"])
    typer.echo(f"Starting the sandbox fleet in {box} ...")
    state = sandbox.up(box, servers=servers, customers=customers, ssh=ssh)
    settings = Runtime.load().settings
    smtp_url = settings.smtp_url
    if not smtp_url:
        # Welcome emails and customer notices go somewhere you can read them.
        smtp_url = _demo_outbox(base / "outbox")
        typer.echo(f"Emails the demo sends are saved in {base / 'outbox'} (no SMTP_URL set).")
    rt = Runtime.load(
        database_url=f"sqlite:///{base / 'dbops.db'}",
        dbops_fleet=state["fleet"],
        dbops_admins=[*settings.dbops_admins, DEMO_USER],
        smtp_url=smtp_url,
    )
    upgrade(rt.engine)
    upsert_customers(rt.engine, [customer_from_mapping(c) for c in state["customers"]])
    return rt, state


def _demo_outbox(outbox: Path) -> str:
    """A real SMTP server on this machine for the demo's email: each message is saved in
    ``outbox`` as an .eml file (readable by you alone: a welcome email carries a password).
    Returns its SMTP_URL; it stops with the process."""
    import socket
    import uuid

    from aiosmtpd.controller import Controller

    outbox.mkdir(parents=True, exist_ok=True)
    outbox.chmod(0o700)

    class Saver:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            path = outbox / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}.eml"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(envelope.original_content)
            typer.echo(f"(email to {', '.join(envelope.rcpt_tos)} saved in {path})")
            return "250 saved"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    Controller(Saver(), hostname="127.0.0.1", port=port).start()
    return f"smtp://127.0.0.1:{port}?from=dbops-demo@localhost"


def _serve_in_background(rt: Runtime) -> None:
    from bot.web.asgi import uvicorn_server

    port = int(os.environ.get("PORT", "3000"))
    server = uvicorn_server(rt, "127.0.0.1", port)
    threading.Thread(target=server.run, name="dbops-serve", daemon=True).start()
    mode = "Socket Mode" if rt.settings.slack_app_token else f"http://127.0.0.1:{port}/slack/events"
    typer.echo(f"Slack transport started ({mode}).")
