"""What `/healthz` says about Slack: can dbops still reach people there?

Three sources, none of them on the request path (a load balancer polls /healthz often, and
Slack's rate limits and latency must not become ours):

- ``SlackHealth.refresh``: ``auth.test`` (is the bot token still good?) and, for the ops and
  escalation channels, whether the bot could post there, found without posting:
  ``conversations.info`` (a name resolved through ``conversations.list`` first) and the bot's
  membership. It runs at start and then in the background every ``REFRESH_S``.
- ``NOTICED``: permanent errors the notifiers met while sending (``channel_not_found``,
  ``not_in_channel``, ``invalid_auth``...), shown until a later send to the same place works.
- The outbox's failed messages (core/outbox.py), read from the database, so what the scheduler
  could not send shows in the web process's /healthz too, until a later send there works.
- Socket Mode's connection, read from its client (no network call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from core.outbox import Failure

log = logging.getLogger("dbops.slack_health")

REFRESH_S = 180.0  # how stale a check may get; Slack's tier-3/4 limits are far above this
START_WAIT_S = 5.0  # how long startup waits for the first check before serving anyway
_CHANNEL_ID = re.compile(r"^[CG][A-Z0-9]{2,}$")
# Errors that say the token itself is refused, wherever they come from.
TOKEN_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
# Errors about one message, not about where it went: the next message may well go through.
MESSAGE_ERRORS = {"invalid_blocks", "msg_too_long", "msg_blocks_too_long", "no_text"}


def token_reason(error: str) -> str:
    return f"SLACK_BOT_TOKEN refused by Slack: {error}"


def channel_reason(channel: str, error: str) -> str:
    return f"cannot post in {channel}: {error}"


class Noticed:
    """Permanent Slack errors met while sending, keyed by where they happened; thread-safe
    (the scheduler's notifiers run in threads)."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()

    def failed(self, where: str, error: str) -> None:
        if error in MESSAGE_ERRORS:
            return
        key, reason = (
            ("token", token_reason(error))
            if error in TOKEN_ERRORS
            else (where, channel_reason(where, error))
        )
        with self._lock:
            self._problems[key] = reason

    def succeeded(self, where: str) -> None:
        with self._lock:
            # Any call that worked proves the token; a send to ``where`` proves that place.
            self._problems.pop("token", None)
            self._problems.pop(where, None)

    def reasons(self) -> list[str]:
        with self._lock:
            return list(self._problems.values())

    def clear(self) -> None:
        with self._lock:
            self._problems.clear()


NOTICED = Noticed()


def outbox_reasons(failures: Sequence[Failure]) -> list[str]:
    """The outbox's failed messages, as /healthz says them."""
    reasons: list[str] = []
    for f in failures:
        many = f"{f.count} messages" if f.count > 1 else "1 message"
        if f.error in TOKEN_ERRORS:
            reason = token_reason(f.error)
        elif f.kind == "dm":
            reason = f"cannot DM {f.target}: {f.error}"
        elif f.error in MESSAGE_ERRORS:
            reason = f"Slack refused a message to {f.target}: {f.error}"
        else:
            reason = channel_reason(f.target, f.error)
        reasons.append(f"{reason} ({many} not sent, kept in the outbox)")
    return reasons


class SlackHealth:
    """The cached Slack checks behind /healthz."""

    def __init__(
        self,
        client: AsyncWebClient,
        channels: Sequence[str],
        *,
        socket_connected: Callable[[], Awaitable[bool]] | None = None,
        noticed: Noticed = NOTICED,
        refresh_s: float | None = None,
        stored: Callable[[], Sequence[Failure]] | None = None,
    ) -> None:
        self.client = client
        self.channels = list(dict.fromkeys(c for c in channels if c))
        self.socket_connected = socket_connected
        self.noticed = noticed
        self.stored = stored
        self.refresh_s = REFRESH_S if refresh_s is None else refresh_s
        self.checked = False
        self._reasons: list[str] = []
        self._names: dict[str, str] = {}  # "#db-ops" -> "C0..."
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()

    async def reasons(self) -> list[str]:
        """Why dbops is degraded on the Slack side; empty when it is not. No Slack call."""
        reasons = list(self._reasons) if self.checked else ["Slack not checked yet"]
        reasons += [r for r in self.noticed.reasons() if r not in reasons]
        if self.stored is not None:
            try:
                failed = await asyncio.to_thread(self.stored)
            except Exception as exc:  # an old schema, a database blip: /healthz says those
                log.debug("healthz: the outbox could not be read: %s", exc)
                failed = []
            reasons += [r for r in outbox_reasons(failed) if r not in reasons]
        if self.socket_connected is not None:
            try:
                connected = await self.socket_connected()
            except Exception:
                connected = False
            if not connected:
                reasons.append("Socket Mode not connected to Slack")
        return reasons

    async def refresh(self) -> None:
        reasons: list[str] = []
        scopes: set[str] | None = None
        if not self.client.token:
            self._reasons, self.checked = ["SLACK_BOT_TOKEN is not set"], True
            return
        try:
            answer = await self.client.auth_test()
            header = (answer.headers or {}).get("x-oauth-scopes")
            if isinstance(header, str):
                scopes = {s.strip() for s in header.split(",") if s.strip()}
        except SlackApiError as exc:
            reasons.append(token_reason(_error(exc)))
        except Exception as exc:  # unreachable, timed out: say so, keep the old channel verdicts
            reasons.append(f"Slack unreachable: {type(exc).__name__}")
        if not reasons:
            for channel in self.channels:
                problem = await self._channel_problem(channel, scopes)
                if problem in TOKEN_ERRORS:  # revoked since auth.test
                    reasons.append(token_reason(problem))
                    break
                if problem is not None:
                    reasons.append(channel_reason(channel, problem))
        self._reasons = reasons
        self.checked = True
        for reason in reasons:
            log.warning("healthz: %s", reason)

    async def _channel_problem(self, channel: str, scopes: set[str] | None) -> str | None:
        """None when the bot could post in ``channel``, else Slack's word for why not."""
        try:
            channel_id = await self._channel_id(channel)
            if channel_id is None:
                # conversations.list shows private channels only to their members.
                return "channel_not_found (a private channel needs the bot invited)"
            info = (await self.client.conversations_info(channel=channel_id)).get("channel") or {}
        except SlackApiError as exc:
            error = _error(exc)
            if error == "missing_scope":
                return "cannot check: missing_scope (the app needs channels:read, groups:read)"
            return error
        except Exception as exc:
            return f"cannot check: {type(exc).__name__}"
        if info.get("is_archived"):
            return "is_archived"
        if info.get("is_member"):
            return None
        # Public channels take posts from non-members with chat:write.public; private never do.
        public_ok = scopes is None or "chat:write.public" in scopes
        if info.get("is_private") or not public_ok:
            return "not_in_channel"
        return None

    async def _channel_id(self, channel: str) -> str | None:
        if _CHANNEL_ID.fullmatch(channel):
            return channel
        if channel in self._names:
            return self._names[channel]
        name = channel.removeprefix("#").lower()
        cursor: str | None = None
        while True:
            page = await self.client.conversations_list(
                types="public_channel,private_channel",
                exclude_archived=True,
                limit=1000,
                cursor=cursor,
            )
            for found in page.get("channels") or []:
                if str(found.get("name", "")).lower() == name:
                    self._names[channel] = str(found["id"])
                    return self._names[channel]
            cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor:
                return None

    async def start(self) -> None:
        """The first check (waited for up to START_WAIT_S), then one every ``refresh_s``."""
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._first.wait(), START_WAIT_S)
        except TimeoutError:
            log.warning("healthz: Slack not checked within %.0fs of start", START_WAIT_S)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("healthz: the Slack check failed")
            self._first.set()
            await asyncio.sleep(self.refresh_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


def _error(exc: SlackApiError) -> str:
    response: Any = exc.response
    try:
        return str(response.get("error") or "unknown_error")
    except Exception:
        return "unknown_error"
