"""`/db restart <server|customer>`: an operator brings a down PostgreSQL back from the channel.

On the session sandbox (real clusters, real sshds): with vps2's PostgreSQL stopped, Alice (an
operator) restarts it by name and it answers again; with vps3's stopped she names a customer
on it and is told every customer there restarts with it. A healthy cluster is refused, and
nothing runs on it. Bob (a viewer) is told no. A name nobody knows gets a "did you mean". With
an incident open for the server, the restart lands on the incident and in its Slack thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bot.commands import restart
from bot.commands.catalog import build_registry
from bot.commands.errors import reply_for
from bot.commands.roles import Denied
from bot.commands.router import Invocation, Router, UsageError, parse
from bot.views.blocks import Reply
from core.customers import customer_from_mapping, upsert_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet
from core.remote import quote_argv
from core.restarts import _one_restart
from core.sandbox import customer_conninfo
from storage.db import make_engine
from storage.events import EventLog, StoredEvent
from storage.migrate import upgrade
from tests.bot_kit import ALICE, BOB, CAROL, make_router, runtime
from tests.slack_stub import BOT_TOKEN, SlackStub

OPS = "C0DBOPS"


@pytest.fixture(scope="module")
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture(scope="module")
def router(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    stub: SlackStub,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Router]:
    path: Path = tmp_path_factory.mktemp("restart") / "dbops.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    events = EventLog(engine)
    rt = runtime(
        engine,
        sandbox_fleet,
        events=events,
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
        ops_channel=OPS,
        timezone="America/New_York",
    )
    yield make_router(rt)
    rt.close()
    engine.dispose()


def contract(reply: Reply) -> Reply:
    message = reply.message()  # slack_sdk validates every block's limits here
    assert message["text"].strip() and len(message["text"]) <= 3000
    assert "<!channel>" not in message["text"]
    return reply


def say(router: Router, user: str, text: str) -> Reply:
    reply = router.run(Invocation(actor=user, surface="slack", text=text, channel=OPS))
    assert reply is not None
    return contract(reply)


def press(router: Router, user: str, line: str) -> Reply:
    """A button press as the Slack app runs it: errors become the reply the user sees."""
    command = parse(line, router.registry)
    inv = Invocation(
        actor=user, surface="slack", action_id=command.spec.action_id, value=command.line
    )
    try:
        reply = router.run(inv)
    except Exception as exc:
        reply = reply_for(exc)
    assert reply is not None
    return contract(reply)


def confirmed(router: Router, user: str, line: str) -> Reply:
    """Type a restart, as an operator does; it answers with what it will do and its button
    (nothing has run yet); press that, as Slack sends it after its confirm dialog."""
    before = mark(router)
    asked = say(router, user, line)
    (button,) = asked.buttons()
    assert button.value == parse(line, router.registry).line and button.confirm is not None
    assert "Restarting" in asked.text and not since(router, before, kind="server.restart")
    reply = router.run(
        Invocation(
            actor=user,
            surface="slack",
            action_id=button.action_id,
            value=button.value,
            channel=OPS,
        )
    )
    assert reply is not None
    return contract(reply)


def since(router: Router, mark: int, **filters: Any) -> list[StoredEvent]:
    return router.events.query(after_id=mark, limit=1000, **filters)


def mark(router: Router) -> int:
    last = router.events.tail(1)
    return last[-1].id if last else 0


def connect(sandbox: dict[str, Any], customer: str) -> Any:
    """A real connection as the customer's application makes it: the value of SELECT 1."""
    with psycopg.connect(customer_conninfo(sandbox, customer), connect_timeout=3) as conn:
        return conn.execute("SELECT 1").fetchone()


def started_at(sandbox: dict[str, Any], customer: str) -> Any:
    with psycopg.connect(customer_conninfo(sandbox, customer), connect_timeout=3) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert row is not None
    return row[0]


def restart_ran(router: Router, after: int, server: str) -> list[StoredEvent]:
    """The remote commands on ``server`` since ``after`` that were its restart command."""
    config = router.ops.fleet.server(server)
    command = quote_argv(config.argv(config.restart_command))
    return [
        e
        for e in since(router, after, subject=server)
        if e.kind.startswith("remote.") and command in e.payload.get("command", "")
    ]


def test_restart_by_server_name_brings_a_down_server_back(
    router: Router, sandbox: dict[str, Any], sandbox_break: Any
) -> None:
    sandbox_break("server-down", "vps2")
    with pytest.raises(psycopg.OperationalError):
        connect(sandbox, "globex")
    before = mark(router)

    reply = press(router, ALICE, "restart vps2")  # the red button, past its confirm dialog

    assert not reply.ephemeral  # the channel sees what was done to its server
    assert "answers again" in reply.text and "exit 0" in reply.text, reply.text
    shown = str(reply.message()["blocks"])
    for part in (
        "restarted PostgreSQL on `vps2`",
        "Why: PostgreSQL on vps2 is not answering",
        "re-check: PostgreSQL up, 2/2 databases online",
        "took ",
    ):
        assert part in shown, part
    assert connect(sandbox, "globex") == (1,) and connect(sandbox, "hooli") == (1,)

    (done,) = since(router, before, kind="server.restart")
    assert done.subject == "vps2" and done.actor == ALICE and done.payload["answering"]
    assert done.payload["exit_code"] == 0 and done.payload["duration_ms"] > 0
    assert restart_ran(router, before, "vps2")  # the command itself, as core records it
    (pressed,) = since(router, before, kind="button")
    assert pressed.subject == "vps2" and pressed.actor == ALICE


def test_restart_by_customer_restarts_its_server_and_says_so(
    router: Router, sandbox: dict[str, Any], sandbox_break: Any
) -> None:
    sandbox_break("server-down", "vps3")
    before = mark(router)

    reply = confirmed(router, ALICE, "restart initech")

    shown = str(reply.message()["blocks"])
    assert "answers again" in reply.text, reply.text
    assert (
        "initech is on vps3; restarting vps3's PostgreSQL restarted every customer on it: "
        "2 databases (initech, stark)"
    ) in shown
    assert connect(sandbox, "initech") == (1,) and connect(sandbox, "stark") == (1,)
    (done,) = since(router, before, kind="server.restart")
    assert done.subject == "vps3" and done.payload["databases_online"] == 2
    assert restart_ran(router, before, "vps3")
    (typed,) = since(router, before, kind="command")
    assert typed.subject == "initech"  # `/db log initech` shows who restarted under it


def test_a_healthy_server_is_refused_and_nothing_runs_on_it(
    router: Router, sandbox: dict[str, Any]
) -> None:
    up_since = started_at(sandbox, "acme")
    before = mark(router)

    with pytest.raises(DbopsError) as refused:
        say(router, ALICE, "restart acme")

    said = str(refused.value)
    assert "Not restarting vps1's PostgreSQL: PostgreSQL on vps1 answers" in said, said
    assert "drop every connection of its 2 databases (acme, umbrella)" in said
    assert "`/db status acme`" in said
    assert started_at(sandbox, "acme") == up_since  # the cluster was not touched
    assert not since(router, before, kind="server.restart")
    assert not restart_ran(router, before, "vps1")
    (why,) = since(router, before, kind="restart.refused")
    assert why.actor == ALICE and "answers" in why.payload["reason"]

    # By server name the same, pointing at the fleet view instead.
    with pytest.raises(DbopsError, match="nothing to restart") as again:
        say(router, ALICE, "restart vps1")
    assert "`/db servers`" in str(again.value)


def test_only_one_restart_per_server_at_a_time(
    router: Router, sandbox: dict[str, Any], sandbox_break: Any
) -> None:
    # A restart of vps1 under way (held here): a second one is refused before anything runs.
    before = mark(router)
    with _one_restart("vps1"):
        second = press(router, CAROL, "restart vps1")
    assert "already running" in second.text and second.ephemeral
    assert not since(router, before, kind="server.restart")

    # Two operators press Restart on a down server at the same moment: one restart runs.
    sandbox_break("server-down", "vps1")
    before = mark(router)
    gate = threading.Barrier(2)
    replies: dict[str, Reply] = {}

    def go(user: str) -> None:
        gate.wait(timeout=10)
        replies[user] = press(router, user, "restart vps1")

    threads = [threading.Thread(target=go, args=(u,)) for u in (ALICE, CAROL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    texts = sorted(r.text for r in replies.values())
    assert len(texts) == 2 and sum("answers again" in t for t in texts) == 1, texts
    # The other was told no: still running, or (if it looked after) that it answers now.
    assert any("already running" in t or "nothing to restart" in t for t in texts), texts
    assert len(since(router, before, kind="server.restart")) == 1
    assert connect(sandbox, "acme") == (1,)


def test_a_viewer_is_denied(router: Router) -> None:
    before = mark(router)
    with pytest.raises(Denied, match="operator"):
        say(router, BOB, "restart vps1")
    denied = press(router, BOB, "restart acme")
    assert "operator" in denied.text and denied.ephemeral
    assert len(since(router, before, kind="auth.denied")) == 2
    assert not since(router, before, kind="server.restart")
    assert not since(router, before, kind="restart.refused")  # never got as far as looking


def test_an_unknown_name_gets_a_clear_error(router: Router) -> None:
    with pytest.raises(NotFound) as near:
        say(router, ALICE, "restart vps9")
    assert "no server or customer 'vps9'" in near.value.message
    assert near.value.hint and "'vps1'" in near.value.hint

    with pytest.raises(NotFound) as far:
        say(router, ALICE, "restart zzqx")
    assert far.value.hint and "/db servers" in far.value.hint

    with pytest.raises(UsageError) as bad:
        say(router, ALICE, "restart acme;reboot")
    assert "not a valid server name" in bad.value.message
    assert bad.value.usage == "/db restart <server|customer>"


def test_the_button_is_red_behind_a_confirm() -> None:
    registry = build_registry()
    spec = registry.get("restart")
    assert spec is restart.SPEC and spec.usage == "/db restart <server|customer>"
    button = registry.button("restart vps2").to_dict()
    assert button["action_id"] == "db_restart" and button["value"] == "restart vps2"
    assert button["style"] == "danger"
    confirm = button["confirm"]
    assert confirm["style"] == "danger" and "/db restart vps2" in confirm["text"]["text"]
    assert confirm["confirm"]["text"] == "Restart" and confirm["deny"]["text"] == "Cancel"


def test_with_an_open_incident_the_restart_is_recorded_on_it(
    router: Router, stub: SlackStub, sandbox: dict[str, Any], sandbox_break: Any
) -> None:
    sandbox_break("server-down", "vps2")
    say(router, ALICE, "incident open vps2 P0 vps2 postgres down")
    desk = router.rt.desk
    (inc,) = desk.incidents.list_incidents(server="vps2")
    assert inc.card_ref is not None and inc.status == "open"
    ts = inc.card_ref.ts

    reply = confirmed(router, ALICE, "restart hooli")

    assert "answers again" in reply.text, reply.text
    assert f"Recorded on *{inc.ref}* (now acknowledged)" in str(reply.message()["blocks"])
    kinds = [e.kind for e in router.events.query(subject=inc.ref, limit=100)]
    assert "incident.restart" in kinds and "incident.recovered" in kinds
    after = desk.incidents.get(inc.id)
    assert after.status == "acknowledged" and after.recovered_at is not None
    stub.wait_for(
        lambda c: (
            c.kind == "chat.postMessage"
            and c.body.get("thread_ts") == ts
            and "answers again" in c.text
        )
    )
    stub.wait_for(lambda c: c.kind == "chat.update" and c.body.get("ts") == ts)
    assert connect(sandbox, "hooli") == (1,)


def test_help_shows_it(router: Router) -> None:
    shown = say(router, BOB, "help restart")
    assert "/db restart &lt;server|customer&gt;" in str(shown.message()["blocks"])
