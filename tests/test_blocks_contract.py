"""Every reply the bot can make keeps Slack's Block Kit contract.

Slack's own rules, checked by bot/slack/rules.py (the checker the strict Slack stub refuses
with: blocks, text limits, unique ids, ~12,000 characters of block text), and ours on top: a
top-level text fallback, buttons that are registered and parse back, and every destructive
button red behind a confirm dialog. Replies are rendered from real core data (the session
sandbox) and from variants of that very data pushed past Slack's limits and filled with hostile
text. tests/test_slack_property.py renders every kind of message from generated fleets.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from slack_sdk.models.blocks import Block

from bot.commands.catalog import build_registry
from bot.commands.errors import reply_for
from bot.commands.roles import Denied, Role
from bot.commands.router import UsageError, parse
from bot.slack.rules import assert_message_ok
from bot.views import render
from bot.views.blocks import Reply
from core.customers import customer_from_mapping, upsert_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet
from core.ops import Ops
from storage.db import make_engine
from storage.events import EventLog, StoredEvent
from storage.migrate import upgrade

TZ = ZoneInfo("America/New_York")
REGISTRY = build_registry()  # every command, as the app has them
EVIL = "<!channel> & <https://evil.example|click> `x` *y*"


@pytest.fixture(scope="module")
def ops(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ops]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('blocks') / 'dbops.db'}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    ops = Ops(sandbox_fleet, engine, EventLog(engine))
    yield ops
    ops.close()
    engine.dispose()


@pytest.fixture(scope="module")
def status(ops: Ops) -> dict[str, Any]:
    return ops.status("acme")


@pytest.fixture(scope="module")
def report(ops: Ops) -> dict[str, Any]:
    return ops.report()


@pytest.fixture(scope="module")
def servers(ops: Ops) -> list[dict[str, Any]]:
    return ops.servers()


def broken_status(status: dict[str, Any]) -> dict[str, Any]:
    s = copy.deepcopy(status)
    s["database"]["online"] = False
    s["database"]["size_bytes"] = None
    s["database"]["last_backup_at"] = None
    s["connections"] = None
    s["disk"]["used_percent"] = None
    s["verdict"] = "crit"
    for c in s["database"]["checks"] + s["server"]["checks"]:
        c.update(verdict="crit", detail=f"{EVIL} " + "long detail " * 40)
    return s


def huge_status(status: dict[str, Any]) -> dict[str, Any]:
    s = broken_status(status)
    check = s["server"]["checks"][0]
    s["server"]["checks"] = [{**check, "name": f"check_{i}"} for i in range(300)]
    return s


def broken_report(report: dict[str, Any], servers: int = 3, databases: int = 15) -> dict[str, Any]:
    r = copy.deepcopy(report)
    server, database = r["servers"][0], r["databases"][0]
    r["servers"] = [
        {**copy.deepcopy(server), "name": f"vps{i}", "reachable": i % 2 == 0, "postgres": "down"}
        for i in range(servers)
    ]
    r["databases"] = [
        {**copy.deepcopy(database), "customer": f"c{i}", "online": False} for i in range(databases)
    ]
    for entry in r["servers"] + r["databases"]:
        for c in entry["checks"]:
            c.update(verdict="crit", detail=EVIL)
    r["summary"].update(servers_up=0, databases_online=0, backups_ok=0, verdict="crit")
    r["open_incidents"] = [{"id": i, "priority": "P0", "title": EVIL} for i in range(40)]
    return r


def many_events(n: int) -> list[StoredEvent]:
    now = datetime.now(UTC)
    return [
        StoredEvent(
            i, now, "command", "U_ALICE", "acme", {"text": EVIL * 20}, "slack", None, "", ""
        )
        for i in range(n)
    ]


def replies(
    ops: Ops, status: dict[str, Any], report: dict[str, Any], servers: list[dict[str, Any]]
) -> dict[str, Reply]:
    """Every kind of reply, by name."""
    buttons = [REGISTRY.button("report"), REGISTRY.button("log acme")]
    danger = _registry_with_restart().button("restart vps1")
    many_servers = [
        {**copy.deepcopy(servers[0]), "name": f"vps{i}", "problems": servers[0]["checks"]}
        for i in range(80)
    ]
    for s in many_servers:
        for c in s["problems"]:
            c.update(verdict="warn", detail=EVIL * 3)
    usage = pytest.raises(UsageError)
    with usage as bad:
        parse("status", REGISTRY)
    with pytest.raises(UsageError) as typo:
        parse("stauts acme", REGISTRY)
    return {
        "help": render.help_reply(REGISTRY.specs),
        "help-topic": render.help_reply(REGISTRY.specs, "status"),
        "status-ok": render.status_reply(status, TZ, buttons),
        "status-broken": render.status_reply(broken_status(status), TZ, [*buttons, danger]),
        "status-huge": render.status_reply(huge_status(status), TZ, buttons * 20),
        "report": render.report_reply(report, TZ, [REGISTRY.button("servers")]),
        "report-broken": render.report_reply(broken_report(report), TZ),
        "report-huge": render.report_reply(broken_report(report, 60, 400), TZ),
        "servers": render.servers_reply(servers, TZ, [REGISTRY.button("report")]),
        "servers-many": render.servers_reply(many_servers, TZ),
        "log": render.log_reply("acme", ops.log("acme"), TZ),
        "log-empty": render.log_reply("inc-9", [], TZ),
        "log-huge": render.log_reply("acme", many_events(500), TZ),
        "usage": reply_for(bad.value),
        "did-you-mean": reply_for(typo.value),
        "not-found": reply_for(NotFound(f"no customer {EVIL!r}.", hint="Did you mean 'acme'?")),
        "error": reply_for(DbopsError("vps2 did not answer within 2.5s.")),
        "denied": reply_for(Denied("U_BOB", Role.VIEWER, Role.OPERATOR, "/db restart")),
        "internal": reply_for(RuntimeError("password=hunter2 host=10.0.0.5"), where="test"),
    }


def _registry_with_restart() -> Any:
    """The app's registry, every capability loaded (`restart` is the destructive example)."""
    assert REGISTRY.get("restart") is not None and REGISTRY.get("restart").destructive  # type: ignore[union-attr]
    return REGISTRY


def _texts(block: dict[str, Any]) -> Iterator[str]:
    if isinstance(block.get("text"), dict):
        yield block["text"]["text"]
    for f in block.get("fields") or []:
        yield f["text"]
    for e in block.get("elements") or []:
        if e.get("type") == "mrkdwn":
            yield e["text"]


def check_contract(name: str, reply: Reply) -> None:
    message = reply.message()  # slack_sdk validates every block's limits here
    assert_message_ok(message, name)  # and Slack's rules, as the strict stub applies them
    assert message["text"].strip(), name
    assert len(message["text"]) <= 3000, name
    assert all(isinstance(b, Block) for b in reply.blocks)
    registry = _registry_with_restart()
    for block in message["blocks"]:
        for text in _texts(block):
            assert "<!channel>" not in text and "<https://evil" not in text, (name, text)
        for el in block.get("elements") or []:
            if el.get("type") != "button":
                continue
            spec = registry.by_action(el["action_id"])
            assert spec is not None, (name, el["action_id"])
            assert parse(el["value"], registry).spec is spec
            if spec.form is not None:  # opens a form, which is its confirmation: red, no dialog
                assert el["style"] == "danger" and "confirm" not in el, name
            elif spec.destructive or el.get("style") == "danger":
                assert el["style"] == "danger" and el["confirm"]["style"] == "danger", name
                assert el["confirm"]["title"]["text"] and el["confirm"]["confirm"]["text"]
    assert "<!channel>" not in message["text"]


def test_every_reply_keeps_the_block_kit_contract(
    ops: Ops, status: dict[str, Any], report: dict[str, Any], servers: list[dict[str, Any]]
) -> None:
    everything = replies(ops, status, report, servers)
    for name, reply in everything.items():
        check_contract(name, reply)
    # What each says, briefly: the replies are about the right things.
    assert "acme" in everything["status-ok"].text and "vps1" in everything["status-ok"].text
    assert "3/3 servers" in everything["report"].text
    assert "OFFLINE" in everything["status-broken"].text
    assert everything["denied"].ephemeral and everything["usage"].ephemeral
    internal = everything["internal"].message()
    assert "hunter2" not in str(internal) and "10.0.0.5" not in str(internal)
    assert "reference" in everything["internal"].text


def test_status_shows_what_an_operator_needs(status: dict[str, Any]) -> None:
    reply = render.status_reply(status, TZ, [REGISTRY.button("report")])
    fields = [f["text"] for f in reply.message()["blocks"][1]["fields"]]
    labels = [f.split("\n")[0] for f in fields]
    assert labels == [
        "*Size*",
        "*Connections*",
        "*Last backup*",
        "*Server disk*",
        "*Plan*",
        "*Verdict*",
    ]
    assert "% used" in fields[3] and "MB" in fields[0]


def test_a_broken_status_lists_the_checks_that_are_not_ok(status: dict[str, Any]) -> None:
    message = render.status_reply(broken_status(status), TZ).message()
    body = "\n".join(t for b in message["blocks"] for t in _texts(b))
    assert "Needs a look" in body and "`backup_age` crit" in body
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in body


def test_a_real_broken_database(ops: Ops, sandbox_break: Any, sandbox: dict[str, Any]) -> None:
    sandbox_break("db-down", "acme")
    reply = render.status_reply(ops.status("acme"), TZ)
    check_contract("db-down", reply)
    assert "OFFLINE" in reply.text


def test_an_error_names_people_but_never_pings_a_channel() -> None:
    named = reply_for(DbopsError("inc-3 is already acknowledged by <@U0ALICE>."))
    section = named.message()["blocks"][0]["text"]["text"]
    assert "<@U0ALICE>" in section  # shown as the person
    evil = reply_for(DbopsError("no customer '<!channel> <@U0X|x> <https://evil|y>'."))
    check_contract("evil-error", evil)
    body = evil.message()["blocks"][0]["text"]["text"]
    assert "<!channel>" not in body and "<@U0X|x>" not in body and "<https://evil" not in body
