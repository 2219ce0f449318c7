"""Talking to Slack: the Web API client and replies through response_url.

Both retry a 429 after its Retry-After and a dropped connection (slack_sdk's retry handlers),
and the Web API client honours SLACK_API_URL, so tests and an egress proxy can stand in for
slack.com. A response_url is a bearer capability: it is never logged or stored.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.views.blocks import Reply
from core.notify import inert_payload
from core.settings import Settings

log = logging.getLogger("dbops.slack")
TIMEOUT_S = 10


def retry_handlers() -> list[AsyncRetryHandler]:
    return [
        AsyncRateLimitErrorRetryHandler(max_retry_count=3),
        AsyncConnectionErrorRetryHandler(max_retry_count=2),
    ]


def api_base(settings: Settings) -> str:
    base = str(settings.slack_api_url)
    return base if base.endswith("/") else base + "/"


def make_web_client(settings: Settings) -> AsyncWebClient:
    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    return AsyncWebClient(
        token=token,
        base_url=api_base(settings),
        timeout=TIMEOUT_S,
        retry_handlers=retry_handlers(),
    )


class Replier:
    """Sends replies: response_url when Slack gave one, else chat.postMessage/postEphemeral."""

    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop, and shared by every reply.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        return self._session

    async def respond(
        self, response_url: str, reply: Reply, *, replace_original: bool = False
    ) -> bool:
        hook = AsyncWebhookClient(
            response_url,
            session=self._http(),
            timeout=TIMEOUT_S,
            retry_handlers=retry_handlers(),
        )
        body: dict[str, Any] = {
            **inert_payload(reply.message()),
            "replace_original": replace_original,
        }
        response = await hook.send_dict(body)
        if response.status_code != 200:
            log.warning("response_url answered %s: %s", response.status_code, response.body[:200])
            return False
        return True

    async def post(self, channel: str, reply: Reply, *, user: str | None = None) -> bool:
        message = inert_payload(reply.message())
        message.pop("response_type")
        if reply.ephemeral and user:
            result = await self.client.chat_postEphemeral(channel=channel, user=user, **message)
        else:
            result = await self.client.chat_postMessage(channel=channel, **message)
        return bool(result.get("ok"))

    async def deliver(
        self,
        reply: Reply,
        *,
        response_url: str | None,
        channel: str | None,
        user: str | None,
    ) -> str:
        """Send ``reply``; returns how it went out ("response_url", "chat") or "" if it did not."""
        if response_url and await self.respond(response_url, reply):
            return "response_url"
        if channel and await self.post(channel, reply, user=user):
            return "chat"
        return ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
