"""Ticking a posted checklist in Slack: the checkbox click is recorded per user (operators only,
a viewer's click is a denial event) and the message is updated in place."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from slack_bolt.request.async_request import AsyncBoltRequest

from bot.app import build_services, create_app
from bot.context import Context
from bot.scheduler import CHECKLIST_ACTION
from core import checklists as cl
from storage.migrate import upgrade
from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, SlackStub, sign


def _checkbox_body(run_id: int, user: str, selected: list[int]) -> str:
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
                "block_id": f"checklist-{run_id}",
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


def test_checkbox_clicks_are_recorded_per_user(tmp_path: Path, sandbox: dict[str, Any]) -> None:
    with SlackStub() as stub:
        ctx = Context.load(
            database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
            dbops_fleet=sandbox["fleet"],
            slack_bot_token=BOT_TOKEN,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_url=stub.base_url,
            dbops_operators=["U_ALICE"],
        )
        upgrade(ctx.engine)
        state = cl.start_run(
            ctx.engine,
            ctx.events,
            cl.get_checklist("security-review"),
            actor="scheduler",
            now=datetime.now(UTC),
        )
        # The checklist as the scheduler posted it: a message in the channel to update.
        cl.attach_message(ctx.engine, state.id, "C0DBOPS", stub.existing("C0DBOPS"))
        services = build_services(ctx)
        app = create_app(services)

        async def click(user: str, selected: list[int]) -> int:
            body = _checkbox_body(state.id, user, selected)
            resp = await app.async_dispatch(AsyncBoltRequest(body=body, headers=sign(body)))
            return resp.status

        async def scenario() -> list[int]:
            try:
                return [await click("U_ALICE", [0, 1]), await click("U_BOB", [0, 1, 2])]
            finally:
                await services.aclose()

        assert asyncio.run(scenario()) == [200, 200]
        _wait(lambda: ctx.events.query(kind="auth.denied"))
        now = cl.run_state(ctx.engine, state.id)
        assert [(i.index, i.user) for i in now.items if i.done] == [(0, "U_ALICE"), (1, "U_ALICE")]
        denied = ctx.events.query(kind="auth.denied")
        assert denied[0].actor == "U_BOB"
        update = stub.wait_for(lambda c: c.kind == "chat.update")
        assert update.ok, update.error
        assert "2/" in json.dumps(update.body)
