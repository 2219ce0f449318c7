"""`dbops shell`: the same router and blocks, as text in a terminal, read from stdin."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from bot.commands.catalog import build_registry
from bot.commands.roles import Role, Roles
from bot.commands.router import Arg, Call, Registry, Router, Spec
from bot.shell import HINT, Shell, plain, render_blocks
from bot.views import blocks
from bot.views.blocks import Reply
from core.customers import customer_from_mapping, upsert_customers
from storage.db import make_engine
from storage.migrate import upgrade
from tests.bot_kit import make_router, no_fleet

REGISTRY = build_registry()  # every command, as the app has them


@pytest.fixture(scope="module")
def db_url(sandbox: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('shell') / 'dbops.db'}"
    engine = make_engine(url)
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    engine.dispose()
    return url


def dbops_shell(
    stdin: str, db_url: str, fleet: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "DBOPS_"))}
    env.update(DATABASE_URL=db_url, DBOPS_FLEET=fleet)
    dbops = Path(sys.executable).with_name("dbops")
    return subprocess.run(
        [str(dbops), "shell", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_piped_status_prints_acmes_status(sandbox: dict[str, Any], db_url: str) -> None:
    done = dbops_shell("/db status acme\n", db_url, sandbox["fleet"], "--as", "U_ALICE")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "acme is online on vps1" in out
    for label in ("Size:", "Connections:", "Last backup:", "Server disk:"):
        assert label in out
    assert "[1] Report  [2] Log" in out
    assert "&lt;" not in out and "*" not in out.split("\n")[0]


def test_a_session_presses_buttons_and_hints(sandbox: dict[str, Any], db_url: str) -> None:
    script = "/db status acme\npress 2\nhello\npress 7\n/db stauts\n"
    done = dbops_shell(script, db_url, sandbox["fleet"], "--as", "U_BOB")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Log of acme" in out and "status acme" in out  # bob's own command is in the log
    assert HINT in out
    assert "No button 7" in out
    assert "Did you mean `/db status`" in out  # the nearest first


def test_render_blocks_as_text() -> None:
    reply = Reply(
        "x",
        [
            blocks.header("Morning health check: OK"),
            blocks.section("*acme* is &lt;online&gt; <@U_ALICE> <https://x.example|docs>"),
            blocks.fields([("Size", "7.6 MB"), ("Disk", "24% used")]),
            blocks.context("checked in 12 ms"),
            blocks.actions([REGISTRY.button("report"), REGISTRY.button("log acme")]),
        ],
    )
    text, buttons = render_blocks(reply.blocks)
    assert text.splitlines() == [
        "Morning health check: OK",
        "========================",
        "acme is <online> U_ALICE docs",
        "  Size: 7.6 MB",
        "  Disk: 24% used",
        "  (checked in 12 ms)",
        "[1] Report  [2] Log",
    ]
    assert [b.value for b in buttons] == ["report", "log acme"]
    assert plain(":red_circle: *vps1* down") == "[CRIT] vps1 down"


def _restart_router(engine: Engine, calls: list[str]) -> Router:
    def restart(call: Call) -> Reply:
        calls.append(call.arg("target"))
        return Reply(f"restarted {call.arg('target')}")

    def offer(call: Call) -> Reply:
        button = call.router.registry.button("restart vps1")
        return Reply("vps1", [blocks.section("vps1"), blocks.actions([button])])

    # A stand-in for the real `restart` that records what it was asked, so the gate is
    # tested without a fleet.
    registry = Registry((s for s in REGISTRY.specs if s.name != "restart"), kinds=REGISTRY.kinds)
    registry.add(
        Spec(
            "restart",
            "restart",
            restart,
            (Arg("target", "server"),),
            role=Role.OPERATOR,
            button="Restart",
            destructive=True,
        )
    )
    registry.add(Spec("offer", "a reply with a Restart button", offer))

    rt = no_fleet(engine, timezone="UTC")
    return make_router(rt, Roles(operators=frozenset({"U_ALICE"})), registry)


def test_a_danger_button_asks_for_yes_and_checks_the_role(sqlite_engine: Engine) -> None:
    calls: list[str] = []
    router = _restart_router(sqlite_engine, calls)

    out = io.StringIO()
    Shell(router, "U_ALICE", out).loop(["/db offer", "press 1", "no", "press 1", "yes"])
    text = out.getvalue()
    assert "[1] Restart (!)" in text
    assert "Restart?: Run `/db restart vps1`? This cannot be undone. Type yes" in text
    assert "Cancelled." in text and "restarted vps1" in text
    assert calls == ["vps1"]

    out = io.StringIO()
    Shell(router, "U_BOB", out).loop(["/db offer", "press 1", "yes"])
    assert "needs the operator role" in out.getvalue()
    assert calls == ["vps1"]
    (denied,) = router.events.query(kind="auth.denied")
    assert denied.actor == "U_BOB" and denied.payload["surface"] == "shell"
