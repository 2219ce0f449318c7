"""Notifiers the worker side uses: Slack's Web API (sync, for scheduler threads) and a console
one for the shell and the demo. Both implement core.notify.Notifier; every message sent is an
event ("message.sent" with where it went, never its body's secrets: the event log redacts)."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, TextIO

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)
from slack_sdk.models.blocks import ButtonElement

from bot.slack.health import NOTICED
from bot.views import blocks
from core.errors import DbopsError
from core.notify import Message, MessageRef, NotifyError, inert_payload
from core.settings import Settings
from storage.events import EventLog

if TYPE_CHECKING:
    from bot.commands.router import Registry

log = logging.getLogger("dbops.notifier")

# Errors no retry can fix: the caller should not try again.
PERMANENT = {
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "user_not_found",
    "invalid_auth",
    "account_inactive",
    "token_revoked",
    "missing_scope",
    "cannot_dm_bot",
    "invalid_blocks",
    "msg_too_long",
}


def web_client(settings: Settings) -> WebClient:
    base = str(settings.slack_api_url)
    return WebClient(
        token=settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None,
        base_url=base if base.endswith("/") else base + "/",
        timeout=10,
        retry_handlers=[
            RateLimitErrorRetryHandler(max_retry_count=3),
            ConnectionErrorRetryHandler(max_retry_count=2),
        ],
    )


def _ack_target(meta: dict[str, Any] | None) -> int | None:
    """The incident a message offers to ack: core's ``{"incident": 12, "actions": ["ack"]}``."""
    if not meta or "ack" not in (meta.get("actions") or ()):
        return None
    incident = meta.get("incident")
    if isinstance(incident, bool) or not isinstance(incident, int) or incident <= 0:
        return None
    return incident


class SlackNotifier:
    """chat.postMessage / chat.update / conversations.open over the Web API.

    A message whose meta offers the ack action (an escalation page) gets an Ack button, made by
    ``registry`` (the runtime's: bot/commands/catalog.py) so a press runs `/db incident ack N`
    with its role check; without a registry (a checkpoint's poster) no message gets buttons.
    The text stays as it was, typed command and all: it is what a phone's notification shows.
    """

    def __init__(
        self, client: WebClient, events: EventLog | None = None, *, registry: Registry | None = None
    ) -> None:
        self.client = client
        self.events = events
        self._registry = registry
        self._dm_channels: dict[str, str] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        where = str(kwargs.get("channel") or kwargs.get("users") or method)
        try:
            response = self.client.api_call(method, json=inert_payload(kwargs))
        except SlackApiError as exc:
            error = str(exc.response.get("error", "unknown_error"))
            if error in PERMANENT:
                NOTICED.failed(where, error)  # shown by /healthz until a send there works
            raise NotifyError(
                f"Slack {method} failed: {error}", permanent=error in PERMANENT
            ) from None
        except OSError as exc:
            raise NotifyError(f"Slack {method} failed: {type(exc).__name__}") from None
        NOTICED.succeeded(where)
        return dict(response.data) if isinstance(response.data, dict) else {}

    def _record(self, how: str, to: str, message: Message, ts: str | None) -> None:
        if self.events is not None:
            self.events.append(
                "message.sent",
                to,
                {"how": how, "ts": ts, "text": message.text[:500]},
                actor="dbops",
            )

    def body(self, message: Message, *, update: bool = False) -> dict[str, Any]:
        """The Web API body of ``message``: text, blocks, a page's Ack button. An update always
        carries blocks: chat.update keeps the old ones when none are sent (a page's Ack button
        would stay). The outbox stores this body and sends it later."""
        body = self._message(message)
        if update:
            body.setdefault("blocks", [blocks.section(message.text).to_dict()])
        return body

    def _message(self, message: Message) -> dict[str, Any]:
        body: dict[str, Any] = {"text": message.text}
        if message.blocks:
            body["blocks"] = message.blocks
        incident = _ack_target(message.meta)
        if incident is not None:
            button = self._ack_button(incident)
            if button is not None:
                # With blocks, Slack shows them and keeps ``text`` for notifications: the words
                # go in a section, so nothing is lost on screen.
                head = list(message.blocks or [blocks.section(message.text).to_dict()])
                if len(head) < blocks.MAX_BLOCKS:
                    body["blocks"] = [*head, blocks.actions([button]).to_dict()]
        return body

    def _ack_button(self, incident: int) -> ButtonElement | None:
        """The Ack button for ``incident``, or None: a button must never cost a page, and the
        page's text still says the command to type."""
        if self._registry is None:
            return None
        try:
            return self._registry.button(f"incident ack {incident}")
        except (DbopsError, ValueError) as exc:
            log.warning("no Ack button for inc-%s: %s", incident, exc)
        except Exception:
            log.exception("no Ack button for inc-%s", incident)
        return None

    def dm(self, user: str, message: Message) -> MessageRef:
        with self._lock:
            channel = self._dm_channels.get(user)
        if channel is None:
            opened = self._call("conversations.open", users=user)
            channel = str((opened.get("channel") or {}).get("id") or user)
            with self._lock:
                self._dm_channels[user] = channel
        data = self._call("chat.postMessage", channel=channel, **self._message(message))
        ref = MessageRef(str(data.get("channel") or channel), str(data.get("ts") or ""))
        self._record("dm", user, message, ref.ts)
        return ref

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        extra = {"thread_ts": thread_ts} if thread_ts else {}
        data = self._call("chat.postMessage", channel=channel, **self._message(message), **extra)
        ref = MessageRef(str(data.get("channel") or channel), str(data.get("ts") or ""))
        self._record("post", channel, message, ref.ts)
        return ref

    def update(self, ref: MessageRef, message: Message) -> None:
        body = self.body(message, update=True)
        self._call("chat.update", channel=ref.channel, ts=ref.ts, **body)
        self._record("update", ref.channel, message, ref.ts)


class QuietNotifier:
    """Sends nothing (the shell, or no Slack token): the command's reply shows the card."""

    def __init__(self) -> None:
        self._seq = 0
        self._lock = threading.Lock()

    def _ref(self, to: str) -> MessageRef:
        with self._lock:
            self._seq += 1
            return MessageRef(to, f"quiet.{self._seq:06d}")

    def dm(self, user: str, message: Message) -> MessageRef:
        return self._ref(user)

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        return self._ref(channel)

    def update(self, ref: MessageRef, message: Message) -> None:
        return None


class ConsoleNotifier:
    """Prints what would go to Slack (the shell and the demo)."""

    def __init__(self, out: TextIO | None = None, events: EventLog | None = None) -> None:
        self.out = out or sys.stdout
        self.events = events
        self._seq = 0
        self._lock = threading.Lock()

    def _emit(self, how: str, to: str, message: Message, thread: str | None) -> MessageRef:
        with self._lock:
            self._seq += 1
            ts = f"console.{self._seq:06d}"
            where = f"{how} {to}" + (f" (thread {thread})" if thread else "")
            self.out.write(f"\n--- {where} ---\n{message.text}\n")
            self.out.flush()
        if self.events is not None:
            self.events.append(
                "message.sent",
                to,
                {"how": how, "ts": ts, "text": message.text[:500]},
                actor="dbops",
            )
        return MessageRef(to, ts)

    def dm(self, user: str, message: Message) -> MessageRef:
        return self._emit("DM to", user, message, None)

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        return self._emit("post in", channel, message, thread_ts)

    def update(self, ref: MessageRef, message: Message) -> None:
        self._emit("update of", f"{ref.channel} {ref.ts}", message, None)
