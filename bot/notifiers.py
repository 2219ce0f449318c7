"""Notifiers the worker side uses: Slack's Web API (sync, for scheduler threads) and a console
one for the shell and the demo. Both implement core.notify.Notifier; every message sent is an
event ("message.sent" with where it went, never its body's secrets: the event log redacts).

Both also take files (``FileSender``: a checklist's chart into its thread): Slack's uploads with
slack_sdk's ``files_upload_v2`` (scope ``files:write``), the console's saves the PNG in its
charts directory and prints the path. ``upload_all`` finds the sender behind any notifier (the
outbox's renders with a SlackNotifier) and never raises: a file that did not go is an error
string for the caller to tell people about.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, runtime_checkable

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)
from slack_sdk.models.blocks import ButtonElement

from bot.attachments import save
from bot.slack.health import NOTICED
from bot.views import blocks
from core.capacity import Attachment
from core.errors import DbopsError
from core.notify import Message, MessageRef, Notifier, NotifyError, inert_markup, inert_payload
from core.outbox import placeholder_id
from core.settings import Settings
from storage.events import EventLog

if TYPE_CHECKING:
    from bot.commands.router import Registry

log = logging.getLogger("dbops.notifier")
_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")

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

    def upload(self, channel: str, attachment: Attachment, thread_ts: str | None = None) -> None:
        """Share ``attachment`` in ``channel`` (an id, or a name looked up), in ``thread_ts``'s
        thread if given; NotifyError as ``_call`` raises it."""
        channel_id = self._channel_id(channel)
        comment = inert_markup(blocks.escape(attachment.comment)) if attachment.comment else None
        try:
            self.client.files_upload_v2(
                channel=channel_id,
                file=attachment.png,
                filename=attachment.filename,
                title=attachment.title,
                initial_comment=comment,
                thread_ts=thread_ts,
            )
        except SlackApiError as exc:
            error = str(exc.response.get("error", "unknown_error"))
            raise NotifyError(
                f"Slack files upload failed: {error}", permanent=error in PERMANENT
            ) from None
        except (SlackRequestError, OSError) as exc:  # the bytes' POST (urllib) failed
            raise NotifyError(f"Slack files upload failed: {type(exc).__name__}") from None
        if self.events is not None:
            what = {"how": "upload", "ts": thread_ts, "file": attachment.filename}
            what["text"] = attachment.title[:500]
            self.events.append("message.sent", channel, what, actor="dbops")

    def _channel_id(self, channel: str) -> str:
        """Uploads take a channel id only: a name (the ops channel as configured) is looked up
        with conversations.list (a GET, as the outbox looks it up)."""
        if _CHANNEL_ID.fullmatch(channel):
            return channel
        name = channel.removeprefix("#").lower()
        params: dict[str, Any] = {
            "types": "public_channel,private_channel",
            "exclude_archived": "true",
            "limit": 1000,
        }
        for _ in range(20):  # 20,000 channels
            try:
                response = self.client.api_call(
                    "conversations.list", http_verb="GET", params=params
                )
            except SlackApiError as exc:
                error = str(exc.response.get("error", "unknown_error"))
                raise NotifyError(
                    f"Slack conversations.list failed: {error}", permanent=error in PERMANENT
                ) from None
            except OSError as exc:
                raise NotifyError(
                    f"Slack conversations.list failed: {type(exc).__name__}"
                ) from None
            page = response.data if isinstance(response.data, dict) else {}
            for found in page.get("channels") or []:
                if str(found.get("name", "")).lower() == name and found.get("id"):
                    return str(found["id"])
            params["cursor"] = (page.get("response_metadata") or {}).get("next_cursor") or None
            if not params["cursor"]:
                break
        raise NotifyError(f"Slack has no channel {channel} that I can see", permanent=True)


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
    """Prints what would go to Slack (the shell and the demo); a file is saved in
    ``charts_dir`` (the current directory unless given) and its path printed."""

    def __init__(
        self,
        out: TextIO | None = None,
        events: EventLog | None = None,
        *,
        charts_dir: Path | None = None,
    ) -> None:
        self.out = out or sys.stdout
        self.events = events
        self.charts_dir = charts_dir
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

    def upload(self, channel: str, attachment: Attachment, thread_ts: str | None = None) -> None:
        try:
            path = save(attachment, self.charts_dir or Path.cwd())
        except OSError as exc:
            raise NotifyError(f"could not save {attachment.filename}: {exc.strerror}") from None
        message = Message(text=f"{attachment.title}: saved to {path}\n{attachment.comment}")
        self._emit("file in", channel, message, thread_ts)


@runtime_checkable
class FileSender(Protocol):
    """A notifier that takes files too (SlackNotifier, ConsoleNotifier)."""

    def upload(
        self, channel: str, attachment: Attachment, thread_ts: str | None = None
    ) -> None: ...


def file_sender(notifier: Notifier, events: EventLog | None = None) -> FileSender | None:
    """Who sends ``notifier``'s files: the notifier itself when it can; behind the outbox, its
    Slack client (recording each upload in ``events``); None for one that sends nothing (the
    quiet one, a test's recorder)."""
    if isinstance(notifier, FileSender):
        return notifier
    render = getattr(notifier, "render", None)  # bot.outbox.OutboxNotifier
    if isinstance(render, SlackNotifier):
        return SlackNotifier(render.client, events)
    return None


def upload_all(
    notifier: Notifier,
    channel: str,
    files: Sequence[Attachment],
    *,
    thread_ts: str | None = None,
    events: EventLog | None = None,
) -> list[str]:
    """Send ``files`` to ``channel`` (in ``thread_ts``'s thread) through ``notifier``'s
    sender; why each one that did not go failed (empty when all went, or when the notifier
    sends no files). Never raises: the posting they go with is already out. A thread still
    waiting in the outbox has no ts yet: the files then go to the channel itself."""
    sender = file_sender(notifier, events) if files else None
    if sender is None:
        return []
    if placeholder_id(thread_ts) is not None:
        thread_ts = None
    failed: list[str] = []
    for attachment in files:
        try:
            sender.upload(channel, attachment, thread_ts)
        except NotifyError as exc:
            log.warning("could not send %s: %s", attachment.filename, exc.message)
            failed.append(exc.message)
        except Exception:
            log.exception("could not send %s", attachment.filename)
            failed.append(f"{attachment.filename}: an internal error (see the log)")
    return failed
