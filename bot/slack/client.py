"""Talking to Slack: the Web API client and replies through response_url.

Both retry a 429 after its Retry-After and a dropped connection (slack_sdk's retry handlers),
and the Web API client honours SLACK_API_URL, so tests and an egress proxy can stand in for
slack.com. A response_url is a bearer capability: it is never logged or stored.

A reply that carries files (bot.attachments.WithFiles: `/db status acme --chart`) has them
uploaded to the channel once the reply is out, with slack_sdk's ``files_upload_v2``
(files.getUploadURLExternal, the bytes, files.completeUploadExternal; scope ``files:write``).
A file Slack will not take there is a short note to the user (invite the bot, or the scope),
never a lost reply.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.attachments import files_of
from bot.views.blocks import Reply, escape, section
from core.capacity import Attachment
from core.notify import inert_markup, inert_payload
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
        """Send ``reply``, then its files to ``channel``; returns how the reply went out
        ("response_url", "chat") or "" if it did not (its files are then not sent either)."""
        how = ""
        if response_url and await self.respond(response_url, reply):
            how = "response_url"
        elif channel and await self.post(channel, reply, user=user):
            how = "chat"
        files = files_of(reply)
        if how and files:
            await self._send_files(
                files, reply, response_url=response_url, channel=channel, user=user
            )
        return how

    async def upload(
        self, channel: str, attachment: Attachment, *, thread_ts: str | None = None
    ) -> str | None:
        """Share ``attachment`` in ``channel`` (an id), in ``thread_ts``'s thread if given.
        None when Slack took it, else why not (Slack's error code, or the failure's name)."""
        comment = inert_markup(escape(attachment.comment)) if attachment.comment else None
        try:
            await self.client.files_upload_v2(
                channel=channel,
                file=attachment.png,
                filename=attachment.filename,
                title=attachment.title,
                initial_comment=comment,
                thread_ts=thread_ts,
            )
        except SlackApiError as exc:
            return str(exc.response.get("error") or "unknown_error")
        except (TimeoutError, SlackRequestError, aiohttp.ClientError, OSError) as exc:
            # SlackRequestError: the upload URL answered other than 200.
            return type(exc).__name__
        return None

    async def _send_files(
        self,
        files: tuple[Attachment, ...],
        reply: Reply,
        *,
        response_url: str | None,
        channel: str | None,
        user: str | None,
    ) -> None:
        """Each file to the channel the reply went to; a file that did not go is one note to
        the user. An ephemeral reply's files are not shared with the channel it was hidden from."""
        if reply.ephemeral or not channel:
            log.warning("not uploading %d file(s) with a reply only its user sees", len(files))
            return
        failed = ""
        for attachment in files:
            error = await self.upload(channel, attachment)
            if error is not None:
                log.warning("could not upload %s: %s", attachment.filename, error)
                failed = failed or error
        if failed:
            note = _upload_note(failed)
            sorry = Reply(text=note, blocks=[section(f":warning: {escape(note)}")])
            await self.deliver(sorry, response_url=response_url, channel=channel, user=user)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _upload_note(error: str) -> str:
    """What to tell the user whose chart Slack would not take, by Slack's error."""
    if error in ("not_in_channel", "channel_not_found"):
        fix = "invite me to this channel (`/invite @dbops`) and ask again"
    elif error == "missing_scope":
        fix = "the Slack app needs the files:write scope: reinstall it from manifest.yml"
    else:
        fix = "try again in a minute"
    return f"I could not post the chart here ({error}): {fix}."
