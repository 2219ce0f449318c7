"""dbops's Bolt app over a test's router, talking to the Slack stub (tests/slack_stub.py), driven
with signed requests as Slack sends them. The pattern is bolt-python's own tests: dispatch a
signed request, then wait for the work after the ack (``drain``) instead of sleeping."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from slack_bolt.request.async_request import AsyncBoltRequest

from bot.commands.router import Router
from bot.runtime import Runtime
from bot.slack.app import create_app
from bot.slack.background import Services, build_services
from core.settings import load_settings
from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, SlackStub, sign


class SlackApp:
    def __init__(self, router: Router, stub: SlackStub) -> None:
        # The Slack side (token, signing secret, the stub's URL) over the test's router, whose
        # runtime runs the commands.
        transport = Runtime(
            load_settings(
                database_url="sqlite://",
                slack_bot_token=BOT_TOKEN,
                slack_signing_secret=SIGNING_SECRET,
                slack_api_url=stub.base_url,
            ),
            events=router.events,
        )
        self.stub = stub
        self.services: Services = build_services(transport, router=router)
        self.app = create_app(self.services)

    async def dispatch(self, body: str) -> tuple[int, dict[str, Any]]:
        """One signed request; its HTTP status and JSON answer (the ack), work not awaited."""
        resp = await self.app.async_dispatch(AsyncBoltRequest(body=body, headers=sign(body)))
        return resp.status, json.loads(resp.body) if resp.body else {}

    async def drain(self, timeout: float = 120) -> None:
        """Until the work after every ack so far is done."""
        await self.services.background.drain(timeout=timeout)

    async def send(self, body: str) -> tuple[int, dict[str, Any]]:
        """One signed request and the work it started."""
        answer = await self.dispatch(body)
        await self.drain()
        return answer

    async def close(self) -> None:
        self.services.background.close()
        await self.services.replier.close()


def send_once(router: Router, stub: SlackStub, body: str) -> int:
    """A fresh app, one signed request, its work done, the app closed: the status."""
    slack = SlackApp(router, stub)

    async def scenario() -> int:
        try:
            status, _ = await slack.send(body)
            return status
        finally:
            await slack.close()

    return asyncio.run(scenario())
