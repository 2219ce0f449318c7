"""One restart policy: `/db restart <customer>` and the incident card's Restart decide alike.

On the session sandbox (real clusters), for each state of acme's server (healthy; acme's
database down with the cluster answering; the cluster stopped), Alice asks both ways: typed
`/db restart acme`, and the Restart on a card of an incident opened for acme. Both give the
same verdict for the same reason (core.restarts.decide), recorded as ``restart.refused`` or
on the ``server.restart`` event; when refused, the other customer on the server keeps its
connection (nothing ran on the cluster).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bot.commands.errors import reply_for
from bot.commands.roles import Roles
from bot.commands.router import Invocation, Router, parse
from bot.views.blocks import Reply
from core.customers import customer_from_mapping, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.sandbox import customer_conninfo, heal
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.bot_kit import make_router, runtime

ALICE = "U_ALICE"  # the operator
SERVER, NEIGHBOUR = "vps1", "umbrella"  # acme's server, and the other customer on it


@pytest.fixture(scope="module")
def router(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Router]:
    path: Path = tmp_path_factory.mktemp("policy") / "dbops.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    events = EventLog(engine)
    # The shell's desk: no Slack token.
    rt = runtime(
        engine, sandbox_fleet, events=events, slack_bot_token=None, timezone="America/New_York"
    )
    yield make_router(rt, Roles(operators=frozenset({ALICE})))
    rt.close()
    engine.dispose()


def mark(router: Router) -> int:
    last = router.events.tail(1)
    return last[-1].id if last else 0


def press(router: Router, line: str) -> Reply:
    """A button press, past Slack's confirm dialog: errors become the reply Alice sees."""
    command = parse(line, router.registry)
    inv = Invocation(actor=ALICE, surface="slack", action_id=command.spec.action_id, value=line)
    try:
        reply = router.run(inv)
    except DbopsError as exc:
        reply = reply_for(exc)
    assert reply is not None
    return reply


def decided(router: Router, after: int) -> tuple[str, str]:
    """What the policy said since ``after``: (verdict, reason), from the event log."""
    refused = router.events.query(kind="restart.refused", after_id=after, limit=10)
    ran = router.events.query(kind="server.restart", after_id=after, limit=10)
    assert len(refused) + len(ran) == 1, (refused, ran)
    if refused:
        return "refuse", refused[0].payload["reason"]
    return "restart", ran[0].payload["reason"]


def ask_by_command(router: Router) -> tuple[str, str]:
    before = mark(router)
    typed = Invocation(actor=ALICE, surface="slack", text="restart acme")
    try:
        asked = router.run(typed)
    except DbopsError:
        return decided(router, before)  # refused at the look before the confirmation
    assert asked is not None and "Restarting" in asked.text  # its button, then the press
    assert not router.events.query(kind="server.restart", after_id=before)
    press(router, "restart acme")
    return decided(router, before)


def ask_by_card(router: Router) -> tuple[str, str]:
    before = mark(router)
    router.run(Invocation(actor=ALICE, surface="slack", text="incident open acme P0 acme down"))
    desk = router.rt.desk
    inc = next(i for i in desk.incidents.list_incidents(active=True) if i.title == "acme down")
    press(router, f"incident restart {inc.id}")
    verdict = decided(router, before)
    desk.incidents.resolve(inc.id, "test over", actor=ALICE)
    return verdict


def connection(sandbox: dict[str, Any], customer: str) -> psycopg.Connection[Any]:
    return psycopg.connect(customer_conninfo(sandbox, customer), connect_timeout=3)


def test_a_healthy_cluster_is_refused_alike(router: Router, sandbox: dict[str, Any]) -> None:
    with connection(sandbox, NEIGHBOUR) as kept:
        by_command, by_card = ask_by_command(router), ask_by_card(router)
        assert (
            by_command
            == by_card
            == ("refuse", f"PostgreSQL on {SERVER} answers: nothing to restart")
        )
        assert kept.execute("SELECT 1").fetchone() == (1,)


def test_one_database_down_on_a_cluster_that_answers_is_refused_alike(
    router: Router, sandbox: dict[str, Any], sandbox_break: Any
) -> None:
    sandbox_break("db-down", "acme")
    with connection(sandbox, NEIGHBOUR) as kept:
        by_command, by_card = ask_by_command(router), ask_by_card(router)
        assert by_command == by_card, (by_command, by_card)
        verdict, reason = by_command
        assert verdict == "refuse"
        assert reason.startswith(f"PostgreSQL on {SERVER} answers; acme's database does not")
        assert "datallowconn is off" in reason and "would not bring it back" in reason
        # Nothing ran: the neighbour's session lives on.
        assert kept.execute("SELECT 1").fetchone() == (1,)
    assert not router.events.query(kind="server.restart", subject=SERVER, limit=5)


def test_the_refusal_says_what_to_do_instead(
    router: Router, sandbox: dict[str, Any], sandbox_break: Any
) -> None:
    sandbox_break("db-down", "acme")
    with pytest.raises(DbopsError) as typed:
        router.run(Invocation(actor=ALICE, surface="slack", text="restart acme"))
    said = str(typed.value)
    assert "drop every connection of its 2 databases (acme, umbrella)" in said
    assert "ALLOW_CONNECTIONS true" in said and "`/db restore acme`" in said


def test_a_stopped_cluster_is_restarted_alike(
    router: Router, sandbox: dict[str, Any], sandbox_dir: Path, sandbox_break: Any
) -> None:
    sandbox_break("server-down", SERVER)
    by_card = ask_by_card(router)
    heal(sandbox_dir)  # the card's restart brought it back; the fault is stopped again
    sandbox_break("server-down", SERVER)
    by_command = ask_by_command(router)
    assert by_command[0] == by_card[0] == "restart"
    assert by_command[1] == by_card[1]
    assert by_command[1].startswith(f"PostgreSQL on {SERVER} is not answering")
    with connection(sandbox, NEIGHBOUR) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
