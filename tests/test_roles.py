"""Roles: bob the viewer, alice the operator, carol the admin, and the one gate they pass.

No sensitive command ships yet, so the gate is held to a test-only `restart` (operator, a
destructive button) registered on a copy of the router's registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from slack_bolt.request.async_request import AsyncBoltRequest
from sqlalchemy import Engine

from bot.commands.catalog import build_registry
from bot.commands.errors import reply_for
from bot.commands.roles import Denied, Role, Roles
from bot.commands.router import Arg, Call, Invocation, Registry, Router, Spec
from bot.slack.app import create_app
from bot.slack.background import build_services
from bot.views.blocks import Reply
from core.settings import Settings
from tests.bot_kit import ALICE, BOB, CAROL, ROLES, make_router, no_fleet
from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, SlackStub, action_body, sign, slash_body

REGISTRY = build_registry()  # every command, as the app has them

restarted: list[str] = []


def _restart(call: Call) -> Reply:
    restarted.append(call.arg("target"))
    return Reply(f"restarted {call.arg('target')}")


@pytest.fixture
def registry() -> Iterator[Registry]:
    # A stand-in for the real `restart` that records what it was asked, so the gate is
    # tested without a fleet.
    reg = Registry((s for s in REGISTRY.specs if s.name != "restart"), kinds=REGISTRY.kinds)
    reg.add(
        Spec(
            "restart",
            "restart a server or a customer's cluster",
            _restart,
            (Arg("target", "server"),),
            role=Role.OPERATOR,
            button="Restart",
            destructive=True,
        )
    )
    restarted.clear()
    yield reg


@pytest.fixture
def router(sqlite_engine: Engine, registry: Registry) -> Router:
    return make_router(no_fleet(sqlite_engine, timezone="UTC"), registry=registry)


def test_the_role_table() -> None:
    assert [ROLES.of(u) for u in (BOB, ALICE, CAROL)] == [Role.VIEWER, Role.OPERATOR, Role.ADMIN]
    settings = Settings(dbops_operators="U_ALICE, U_DAVE", dbops_admins="U_CAROL")
    roles = Roles.from_settings(settings, extra_admins=["U_DEMO"])
    assert roles.of("U_DAVE") is Role.OPERATOR and roles.of("U_DEMO") is Role.ADMIN


def test_bob_the_viewer_may_read_but_not_restart(router: Router) -> None:
    assert router.run(Invocation(BOB, "shell", text="help")) is not None
    with pytest.raises(Denied) as denied:
        router.run(Invocation(BOB, "shell", text="restart vps1"))
    assert restarted == []
    (event,) = router.events.query(kind="auth.denied")
    assert (event.actor, event.subject) == (BOB, "vps1")
    assert event.payload["needs"] == "operator" and event.payload["has"] == "viewer"
    reply = reply_for(denied.value)
    assert reply.ephemeral and ":no_entry:" in reply.message()["blocks"][0]["text"]["text"]
    assert "operator" in reply.text


def test_alice_the_operator_and_carol_the_admin_may_restart(router: Router) -> None:
    for user, server in ((ALICE, "vps1"), (CAROL, "vps2")):
        # Typed, a destructive command runs nothing: it answers with its red button.
        asked = router.run(Invocation(user, "shell", text=f"restart {server}"))
        assert asked is not None and server not in restarted
        (button,) = asked.buttons()
        assert button.value == f"restart {server}" and button.confirm is not None
        assert "Press Restart to go ahead" in asked.text and asked.ephemeral
        router.run(Invocation(user, "shell", action_id=button.action_id, value=button.value))
    assert restarted == ["vps1", "vps2"]
    assert router.events.query(kind="auth.denied") == []


def test_a_button_press_is_checked_again(router: Router) -> None:
    """Bob got hold of a Restart button (a message shared with him): the press is refused."""
    button = router.registry.button("restart vps1")
    assert button.style == "danger" and button.confirm is not None
    press = Invocation(BOB, "slack", action_id=button.action_id, value=button.value)
    with pytest.raises(Denied):
        router.run(press)
    assert restarted == []
    assert [e.kind for e in router.events.query()] == ["button", "auth.denied"]


def test_a_denial_over_slack_is_an_ephemeral_reply_and_an_event(
    sqlite_engine: Engine, registry: Registry
) -> None:
    """The whole Slack path in-process: Bolt (signature checked), listener, gate, response_url."""
    with SlackStub() as stub:
        rt = no_fleet(
            sqlite_engine,
            timezone="UTC",
            slack_bot_token=BOT_TOKEN,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_url=stub.base_url,
        )
        router = make_router(rt, registry=registry)
        bodies = [
            slash_body("restart vps1", user=BOB, response_url=stub.response_url("typed")),
            action_body(
                "db_restart", "restart vps1", user=BOB, response_url=stub.response_url("pressed")
            ),
            action_body(
                "db_restart", "restart vps3", user=ALICE, response_url=stub.response_url("alice")
            ),
        ]

        async def scenario() -> list[int]:
            services = build_services(rt, router=router)
            app = create_app(services)
            statuses = []
            for body in bodies:
                resp = await app.async_dispatch(AsyncBoltRequest(body=body, headers=sign(body)))
                statuses.append(resp.status)
            await services.aclose()  # waits for the work after the acks
            return statuses

        assert asyncio.run(scenario()) == [200, 200, 200]
        for token in ("typed", "pressed"):
            (reply,) = stub.replies_to(token)
            assert reply.body["response_type"] == "ephemeral"
            assert "needs the operator role" in reply.body["text"]
        (ok,) = stub.replies_to("alice")
        assert "restarted vps3" in ok.body["text"]
    denials = rt.events.query(kind="auth.denied")
    assert [(e.actor, e.subject) for e in denials] == [(BOB, "vps1"), (BOB, "vps1")]
    assert all(e.payload["surface"] == "slack" for e in denials)
    assert restarted == ["vps3"]
