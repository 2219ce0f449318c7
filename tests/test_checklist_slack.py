"""Ticking a posted checklist in Slack: a click applies only the item it ticks or unticks,
recorded per user (operators only, a viewer's click is a denial event), and the message is
updated in place with a fresh block_id, at most 10 checkboxes to an element."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.notifiers import SlackNotifier, web_client
from bot.runtime import Runtime
from bot.scheduler import CHECKLIST_ACTION, checklist_message
from bot.slack.app import create_app
from bot.slack.background import Services, build_services
from core import checklists as cl
from storage.migrate import upgrade
from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, SlackStub, sign

LONG = cl.Checklist("long-review", "Long review", tuple(f"Check step {i}" for i in range(23)))


@dataclass
class Desk:
    """A checklist posted in the ops channel, the app that hears its clicks, and the stub."""

    ctx: Runtime
    stub: SlackStub
    services: Services
    app: AsyncApp
    run_id: int

    def blocks(self) -> list[dict[str, Any]]:
        """The checkbox blocks as people see them now (the latest rendering)."""
        state = cl.run_state(self.ctx.engine, self.run_id)
        blocks = checklist_message(state, UTC).blocks or []
        return [b for b in blocks if b["type"] == "actions"]

    def ticked(self) -> list[tuple[int, str | None]]:
        state = cl.run_state(self.ctx.engine, self.run_id)
        return [(i.index, i.user) for i in state.items if i.done]

    async def click(self, user: str, block: dict[str, Any], selected: list[int]) -> int:
        body = _checkbox_body(block["block_id"], user, selected)
        headers: dict[str, str | Sequence[str]] = {**sign(body)}
        resp = await self.app.async_dispatch(AsyncBoltRequest(body=body, headers=headers))
        return resp.status


@pytest.fixture
def desk(tmp_path: Path, sandbox: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[Desk]:
    checklist = getattr(request, "param", None) or cl.get_checklist("security-review")
    with SlackStub() as stub:
        ctx = Runtime.load(
            database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
            dbops_fleet=sandbox["fleet"],
            slack_bot_token=BOT_TOKEN,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_url=stub.base_url,
            dbops_operators=["U_ALICE", "U_CAROL"],
        )
        upgrade(ctx.engine)
        state = cl.start_run(ctx.engine, ctx.events, checklist, actor="scheduler", now=_now())
        # The checklist as the scheduler posts it, through the strict stub.
        ref = SlackNotifier(web_client(ctx.settings)).post("C0DBOPS", checklist_message(state, UTC))
        cl.attach_message(ctx.engine, state.id, ref.channel, ref.ts)
        services = build_services(ctx)
        yield Desk(ctx, stub, services, create_app(services), state.id)
        asyncio.run(services.aclose())


def _now() -> datetime:
    return datetime.now(UTC)


def _checkbox_body(block_id: str, user: str, selected: list[int]) -> str:
    payload = {
        "type": "block_actions",
        "team": {"id": "T0DBOPS"},
        "user": {"id": user},
        "api_app_id": "A0DBOPS",
        "trigger_id": f"{uuid.uuid4().int % 10**13}.x",
        "channel": {"id": "C0DBOPS"},
        "container": {"type": "message", "message_ts": "1.000001", "channel_id": "C0DBOPS"},
        "actions": [
            {
                "type": "checkboxes",
                "action_id": CHECKLIST_ACTION,
                "block_id": block_id,
                "selected_options": [
                    {"value": str(i), "text": {"type": "mrkdwn", "text": "x"}} for i in selected
                ],
                "action_ts": "1.2",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)})


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _updates(stub: SlackStub) -> list[Any]:
    return stub.find(lambda c: c.kind == "chat.update")


def test_checkbox_clicks_are_recorded_per_user(desk: Desk) -> None:
    [block] = desk.blocks()
    # bob is a viewer: his click is a denial, and changes nothing.
    statuses = asyncio.run(
        _in_turn(desk.click("U_ALICE", block, [0, 1]), desk.click("U_BOB", block, [0, 1, 2]))
    )
    assert statuses == [200, 200]
    _wait(lambda: desk.ctx.events.query(kind="auth.denied"))
    _wait(lambda: len(desk.ticked()) == 2)
    assert desk.ticked() == [(0, "U_ALICE"), (1, "U_ALICE")]
    assert desk.ctx.events.query(kind="auth.denied")[0].actor == "U_BOB"
    update = desk.stub.wait_for(lambda c: c.kind == "chat.update")
    assert update.ok, update.error
    _wait(lambda: any("2/" in json.dumps(c.body) for c in _updates(desk.stub)))


def test_two_people_ticking_different_items_within_a_second_both_stay_ticked(
    desk: Desk,
) -> None:
    [block] = desk.blocks()  # both clients show the same rendering, nothing ticked
    statuses = asyncio.run(
        _together(desk.click("U_ALICE", block, [0]), desk.click("U_CAROL", block, [1]))
    )
    assert statuses == [200, 200]
    _wait(lambda: len(desk.ticked()) == 2)
    time.sleep(0.3)  # both clicks' work has finished: neither undid the other
    assert desk.ticked() == [(0, "U_ALICE"), (1, "U_CAROL")]
    # Each update is a fresh rendering, so clients drop what they showed before.
    [now] = desk.blocks()
    assert now["block_id"] != block["block_id"]
    assert [o["value"] for o in now["elements"][0]["initial_options"]] == ["0", "1"]


def test_an_untick_affects_only_that_item(desk: Desk) -> None:
    [block] = desk.blocks()
    asyncio.run(desk.click("U_ALICE", block, [0, 1, 2]))
    _wait(lambda: len(desk.ticked()) == 3)
    # carol, on the rendering from before any of it, unticks nothing she can see: her click
    # on item 3 then off again leaves alice's three alone.
    asyncio.run(_in_turn(desk.click("U_CAROL", block, [3]), desk.click("U_CAROL", block, [])))
    _wait(lambda: desk.ctx.events.query(kind="checklist.untick"))
    assert desk.ticked() == [(0, "U_ALICE"), (1, "U_ALICE"), (2, "U_ALICE")]
    # On the latest rendering, carol unticks item 1 only.
    [latest] = desk.blocks()
    asyncio.run(desk.click("U_CAROL", latest, [0, 2]))
    _wait(lambda: len(desk.ticked()) == 2)
    assert desk.ticked() == [(0, "U_ALICE"), (2, "U_ALICE")]
    unticks = desk.ctx.events.query(kind="checklist.untick")
    assert [(e.actor, e.payload["item"]) for e in unticks] == [("U_CAROL", 3), ("U_CAROL", 1)]


@pytest.mark.parametrize("desk", [LONG], indirect=True)
def test_a_checklist_of_23_items_renders_in_elements_of_ten(desk: Desk) -> None:
    posted = desk.stub.wait_for(lambda c: c.kind == "chat.postMessage")
    assert posted.ok, posted.error
    blocks = desk.blocks()
    assert [len(b["elements"][0]["options"]) for b in blocks] == [10, 10, 3]
    assert len({b["block_id"] for b in blocks}) == 3
    # A tick in the second element is item 15, and the update is accepted too.
    asyncio.run(desk.click("U_ALICE", blocks[1], [15]))
    _wait(lambda: desk.ticked() == [(15, "U_ALICE")])
    _wait(lambda: bool(_updates(desk.stub)))
    assert all(c.ok for c in _updates(desk.stub)), [c.error for c in _updates(desk.stub)]
    # The strict stub's check on leaving the fixture fails the test on anything refused.


async def _in_turn(*clicks: Any) -> list[int]:
    return [await c for c in clicks]


async def _together(*clicks: Any) -> list[int]:
    return list(await asyncio.gather(*clicks))
