"""Slack through the outbox (core/outbox.py): the notifier every worker-side sender uses, the
Web API transport behind it, and the worker thread of `dbops serve` and `dbops scheduler`.

``OutboxNotifier`` implements core.notify.Notifier. ``post``/``dm``/``update`` store the message
(a row and its ``message.queued`` event, one transaction) and then try it at once, so the
common path is one Slack call as before; what Slack does not take now (a 429, a timeout, a
restart) the worker sends later, and the caller already holds a MessageRef it can update or
reply under (``outbox:<id>`` until the ts is known). An error no retry can fix raises
NotifyError(permanent=True) to the caller as before, and a person is told (core.outbox).

``SlackTransport`` sends with no retries of its own (a retried post whose first answer was lost
is a duplicate): every post carries its outbox key as Slack message metadata
(``event_type: dbops_outbox``), and a row in doubt is looked for with conversations.history
(conversations.replies in a thread) before it is sent again. That needs the history scopes of
the channels posted to (manifest.yml); without them a row in doubt is sent again.
"""

from __future__ import annotations

import http.client
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.notifiers import SlackNotifier
from bot.slack.health import TOKEN_ERRORS
from core.notify import Message, MessageRef, NotifyError, inert_payload
from core.outbox import (
    Courier,
    Landed,
    Outbox,
    Row,
    SendError,
    placeholder,
    placeholder_id,
)
from core.settings import Settings
from storage.events import EventLog, EventLogUnavailable

if TYPE_CHECKING:
    from bot.commands.router import Registry

log = logging.getLogger("dbops.outbox")

EVENT_TYPE = "dbops_outbox"
TIMEOUT_S = 10
HISTORY_PAGE = 200
HISTORY_PAGES = 10  # 2,000 messages since the first attempt: far more than a channel gets
# Slack's errors that say "try again", and for which the message may have been taken anyway.
IN_DOUBT = {"internal_error", "fatal_error", "request_timeout", "service_unavailable"}
TRANSIENT = {"ratelimited", "team_added_to_org"}


def outbox_client(settings: Settings) -> WebClient:
    """A Web API client with no retries: the outbox retries, knowing what was taken."""
    base = str(settings.slack_api_url)
    return WebClient(
        token=settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None,
        base_url=base if base.endswith("/") else base + "/",
        timeout=TIMEOUT_S,
        retry_handlers=[],
    )


def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, Mapping):
        return None
    for key, value in headers.items():
        if str(key).lower() == name:
            if isinstance(value, list | tuple):
                value = value[0] if value else None
            return None if value is None else str(value)
    return None


def _send_error(exc: Exception) -> SendError:
    """What a failed Web API call means for the outbox."""
    if isinstance(exc, SlackApiError):
        response: Any = exc.response
        status = int(getattr(response, "status_code", 200) or 200)
        try:
            error = str(response.get("error") or "")
        except Exception:
            error = ""
        if status == 429 or error == "ratelimited":
            after = _header(getattr(response, "headers", None), "retry-after")
            try:
                seconds = float(after) if after is not None else 1.0
            except ValueError:
                seconds = 1.0
            return SendError("ratelimited", retry_after=seconds)
        if status >= 500 or error in IN_DOUBT:
            return SendError(error or f"http_{status}", in_doubt=True)
        if error in TRANSIENT:
            return SendError(error, transient=True)
        return SendError(error or f"http_{status}")
    # No answer (refused, reset, timed out): the message may or may not be in Slack.
    return SendError(type(exc).__name__, in_doubt=True)


_NO_ANSWER = (OSError, http.client.HTTPException, TimeoutError)


class SlackTransport:
    """core.outbox.Transport over Slack's Web API."""

    def __init__(self, client: WebClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._dms: dict[str, str] = {}  # user -> D... (conversations.open)
        self._ids: dict[str, str] = {}  # "#db-ops" -> C... (conversations.list)

    def method(self, row: Row) -> str:
        return "chat.update" if row.kind == "update" else "chat.postMessage"

    def _call(self, method: str, **body: Any) -> dict[str, Any]:
        try:
            response = self.client.api_call(method, json=body)
        except (SlackApiError, *_NO_ANSWER) as exc:
            raise _send_error(exc) from None
        return dict(response.data) if isinstance(response.data, dict) else {}

    def _get(self, method: str, **params: Any) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if v is not None}
        try:
            response = self.client.api_call(method, http_verb="GET", params=params)
        except (SlackApiError, *_NO_ANSWER) as exc:
            raise _send_error(exc) from None
        return dict(response.data) if isinstance(response.data, dict) else {}

    def _dm_channel(self, user: str) -> str:
        with self._lock:
            known = self._dms.get(user)
        if known is not None:
            return known
        opened = self._call("conversations.open", users=user)
        channel = str((opened.get("channel") or {}).get("id") or "")
        if not channel:
            raise SendError("channel_not_found")
        with self._lock:
            self._dms[user] = channel
        return channel

    def send(self, row: Row, channel: str, thread: str | None) -> Landed:
        body = inert_payload(dict(row.payload))
        if row.kind == "update":
            data = self._call("chat.update", channel=channel, ts=thread, **body)
            return Landed(str(data.get("channel") or channel), str(data.get("ts") or thread))
        if row.kind == "dm":
            channel = self._dm_channel(channel)
        body["metadata"] = {"event_type": EVENT_TYPE, "event_payload": {"key": row.key}}
        if thread:
            body["thread_ts"] = thread
        data = self._call("chat.postMessage", channel=channel, **body)
        ts = str(data.get("ts") or "")
        if not ts:
            raise SendError("no ts in Slack's answer", in_doubt=True)
        return Landed(str(data.get("channel") or channel), ts)

    def find(self, row: Row, channel: str, thread: str | None, oldest: datetime) -> Landed | None:
        channel_id = self._dm_channel(channel) if row.kind == "dm" else self._channel_id(channel)
        if channel_id is None:
            return None  # no such channel visible: nothing was posted there
        method, extra = "conversations.history", {}
        if thread:
            method, extra = "conversations.replies", {"ts": thread}
        cursor: str | None = None
        for _ in range(HISTORY_PAGES):
            page = self._get(
                method,
                channel=channel_id,
                oldest=f"{oldest.timestamp():.6f}",
                include_all_metadata="true",
                limit=HISTORY_PAGE,
                cursor=cursor,
                **extra,
            )
            for message in page.get("messages") or []:
                meta = message.get("metadata") or {}
                said = meta.get("event_payload") or {}
                if meta.get("event_type") == EVENT_TYPE and said.get("key") == row.key:
                    return Landed(channel_id, str(message["ts"]))
            cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
            if not page.get("has_more") or not cursor:
                return None
        log.warning("outbox row %s: not found in %s pages of %s", row.id, HISTORY_PAGES, method)
        return None

    def _channel_id(self, channel: str) -> str | None:
        if channel[:1] in ("C", "G", "D") and channel.isalnum() and channel.isupper():
            return channel
        with self._lock:
            known = self._ids.get(channel)
        if known is not None:
            return known
        name = channel.removeprefix("#").lower()
        cursor: str | None = None
        while True:
            page = self._get(
                "conversations.list",
                types="public_channel,private_channel",
                exclude_archived="true",
                limit=1000,
                cursor=cursor,
            )
            for found in page.get("channels") or []:
                if str(found.get("name", "")).lower() == name:
                    with self._lock:
                        self._ids[channel] = str(found["id"])
                    return str(found["id"])
            cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor:
                return None


class OutboxNotifier:
    """core.notify.Notifier through the outbox: store, then try at once (see the module)."""

    def __init__(
        self,
        outbox: Outbox,
        courier: Courier,
        render: SlackNotifier,
    ) -> None:
        self.outbox = outbox
        self.courier = courier
        self.render = render

    def dm(self, user: str, message: Message) -> MessageRef:
        return self._send("dm", user, self.render.body(message), message)

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        return self._send("post", channel, self.render.body(message), message, thread_ts)

    def update(self, ref: MessageRef, message: Message) -> None:
        row_id = placeholder_id(ref.ts)
        if row_id is not None and self.outbox.get(row_id) is None:
            # Its row was pruned (sent over 30 days ago, core.outbox.KEEP): nothing to rewrite.
            log.info("not updating %s: that message is no longer in the outbox", ref.ts)
            return
        self._send("update", ref.channel, self.render.body(message, update=True), message, ref.ts)

    def _send(
        self,
        kind: str,
        target: str,
        body: dict[str, Any],
        message: Message,
        thread: str | None = None,
    ) -> MessageRef:
        key = str((message.meta or {}).get("outbox_key") or "") or None
        try:
            row = self.outbox.enqueue(kind, target, body, thread=thread, key=key)
        except Exception as exc:
            # Nothing can be stored (the database is down, the event log refuses this process):
            # a message must not be lost to that, so it goes as it did before the outbox, with
            # its key (a row that did commit meanwhile is then found, not sent twice).
            if isinstance(exc, EventLogUnavailable):
                log.warning("the outbox is unavailable (%s): sending directly", exc)
            else:
                log.exception("the outbox could not store a message: sending directly")
            return self._direct(kind, target, body, thread, key or uuid.uuid4().hex)
        if row.status == "sending" and row.lease_owner == self.outbox.owner:
            row = self.courier.deliver(row)
        return self._ref(row)

    def _ref(self, row: Row) -> MessageRef:
        if row.status == "sent" and row.channel and row.ts:
            return MessageRef(row.channel, row.ts)
        if row.status == "failed":
            raise NotifyError(f"Slack refused the message: {row.error}", permanent=True)
        return MessageRef(row.target, placeholder(row.id))

    def _direct(
        self, kind: str, target: str, body: dict[str, Any], thread: str | None, key: str
    ) -> MessageRef:
        if placeholder_id(thread) is not None:
            if kind == "update":
                raise NotifyError("the message to update is not sent yet and the outbox is down")
            thread = None
        row = Row.unsaved(kind, target, body, key, thread)
        try:
            landed = self.courier.transport.send(row, target, thread)
        except SendError as exc:
            raise NotifyError(
                f"Slack refused the message: {exc.error}", permanent=not exc.transient
            ) from None
        return MessageRef(landed.channel, landed.ts)

    def flush(self) -> int:
        """Send whatever is due now (a one-shot process, before it exits)."""
        return self.courier.run_once()


_built: dict[tuple[Any, ...], OutboxNotifier] = {}
_built_lock = threading.Lock()


def outbox_notifier(
    settings: Settings,
    events: EventLog,
    *,
    registry: Registry | None,
    clock: Callable[[], datetime] | None = None,
) -> OutboxNotifier:
    """The process's outbox notifier for ``events.engine``, these Slack settings and
    ``registry`` (a page's Ack button: bot.notifiers.SlackNotifier)."""
    key = (
        events.engine,
        registry,
        str(settings.slack_api_url),
        settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None,
        settings.ops_channel,
        tuple(settings.dbops_admins),
        clock,
    )
    with _built_lock:
        made = _built.get(key)
        if made is None:
            made = _built[key] = build_outbox_notifier(
                settings, events, registry=registry, clock=clock
            )
        return made


def build_outbox_notifier(
    settings: Settings,
    events: EventLog,
    *,
    registry: Registry | None = None,
    clock: Callable[[], datetime] | None = None,
    owner: str | None = None,
    lease_s: float | None = None,
) -> OutboxNotifier:
    from bot.notifiers import web_client

    extra: dict[str, Any] = {}
    if clock is not None:
        extra["clock"] = clock
    if lease_s is not None:
        extra["lease_s"] = lease_s
    outbox = Outbox(events.engine, events, owner=owner, **extra)
    courier = Courier(
        outbox,
        SlackTransport(outbox_client(settings)),
        admins=settings.dbops_admins,
        ops_channel=settings.ops_channel,
        quiet_errors=TOKEN_ERRORS,
    )
    return OutboxNotifier(outbox, courier, SlackNotifier(web_client(settings), registry=registry))


def forget_outbox_notifiers() -> None:
    """Tests that change the settings between cases."""
    with _built_lock:
        _built.clear()


def start_outbox_worker(
    settings: Settings, events: EventLog, registry: Registry
) -> Callable[[], None]:
    """The worker thread that sends what the callers' own attempts did not (`dbops serve`,
    `dbops scheduler`); returns the function that stops it. Without a Slack token: nothing."""
    if settings.slack_bot_token is None:
        return lambda: None
    return outbox_notifier(settings, events, registry=registry).courier.start()
