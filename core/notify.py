"""How core talks to people: a Notifier that the Slack app, the terminal shell and tests implement.

core builds a ``Message`` (text, and optionally Block Kit blocks as plain dicts built by the
caller) and hands it to a Notifier; it never imports slack_sdk. A transport that fails raises
``NotifyError`` (``permanent=True`` when retrying cannot help, e.g. an unknown channel), and
the caller decides whether to retry.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

_ANGLES = str.maketrans({"<": "\u2039", ">": "\u203a"})  # single angle quotation marks


def inert(text: object) -> str:
    """Someone else's words (an alert's summary, an incident title) for a message: angle
    brackets become look-alikes, so `<!channel>` or a link in them is shown, never acted on."""
    return str(text).translate(_ANGLES)


# The only control sequence dbops itself writes into a message: a user mention, <@U012ABC>.
_OWN_MARKUP = re.compile(r"<@[UW][A-Z0-9_]{2,}>")


def inert_markup(text: str) -> str:
    """``text`` with every Slack control sequence but our own user mentions made inert: each
    other ``<`` becomes ``&lt;``, so a ``<!channel>``, ``<!here>`` or ``<https://evil|x>`` that
    reached a message unescaped is shown as text. Already escaped text is unchanged
    (``&lt;`` stays ``&lt;``), so applying it at the transport costs callers nothing."""
    if "<" not in text:
        return text
    out, last = [], 0
    for own in _OWN_MARKUP.finditer(text):
        out.append(text[last : own.start()].replace("<", "&lt;"))
        out.append(own.group())
        last = own.end()
    out.append(text[last:].replace("<", "&lt;"))
    return "".join(out)


def inert_payload(payload: Any) -> Any:
    """A copy of a Slack message or view payload whose top-level ``text`` and every mrkdwn text
    object went through ``inert_markup``: the one place every Slack transport sends through,
    so no caller can forget. plain_text objects render no markup and are left as they are."""
    if isinstance(payload, list):
        return [inert_payload(item) for item in payload]
    if not isinstance(payload, dict):
        return payload
    out = {key: inert_payload(value) for key, value in payload.items()}
    text = out.get("text")
    if isinstance(text, str) and payload.get("type") in (None, "mrkdwn"):
        out["text"] = inert_markup(text)
    return out


@dataclass(frozen=True)
class Message:
    text: str
    blocks: list[dict[str, Any]] | None = None
    # What the message is about, for a transport that adds its own controls: e.g.
    # {"incident": 12, "actions": ["ack"]} lets the Slack notifier attach an Ack button.
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class MessageRef:
    """Where a message landed: enough to update it or reply in its thread."""

    channel: str
    ts: str


class NotifyError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@runtime_checkable
class Notifier(Protocol):
    def dm(self, user: str, message: Message) -> MessageRef: ...

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef: ...

    def update(self, ref: MessageRef, message: Message) -> None: ...


@dataclass(frozen=True)
class Sent:
    """One thing a RecordingNotifier was asked to send."""

    how: Literal["dm", "post", "update"]
    to: str
    message: Message
    thread_ts: str | None
    ref: MessageRef
    at: datetime


@dataclass
class RecordingNotifier:
    """Keeps every message instead of sending it (tests, dry runs). Thread-safe.

    ``fail_with`` makes the next sends raise it (a transport outage), until set back to None.
    """

    sent: list[Sent] = field(default_factory=list)
    fail_with: NotifyError | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _seq: int = 0

    def _add(
        self, how: Literal["dm", "post", "update"], to: str, message: Message, thread: str | None
    ) -> MessageRef:
        with self._lock:
            if self.fail_with is not None:
                raise self.fail_with
            self._seq += 1
            ref = MessageRef(to, f"{1_700_000_000 + self._seq}.{self._seq:06d}")
            self.sent.append(Sent(how, to, message, thread, ref, datetime.now(UTC)))
            return ref

    def dm(self, user: str, message: Message) -> MessageRef:
        return self._add("dm", user, message, None)

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        return self._add("post", channel, message, thread_ts)

    def update(self, ref: MessageRef, message: Message) -> None:
        with self._lock:
            if self.fail_with is not None:
                raise self.fail_with
            self.sent.append(Sent("update", ref.channel, message, None, ref, datetime.now(UTC)))

    def dms(self, user: str | None = None) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.how == "dm" and (user is None or s.to == user)]

    def posts(self, channel: str | None = None) -> list[Sent]:
        with self._lock:
            return [
                s for s in self.sent if s.how == "post" and (channel is None or s.to == channel)
            ]

    def clear(self) -> None:
        with self._lock:
            self.sent.clear()


class JsonlNotifier:
    """Appends each message as one JSON line to a file (the escalation worker's dry-run mode,
    and the cross-process tests, which read the file back). Each line is written with a single
    O_APPEND write, so concurrent writers never interleave lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seq = 0

    def _write(self, record: dict[str, Any]) -> MessageRef:
        with self._lock:
            self._seq += 1
            ref = MessageRef(str(record["to"]), f"{os.getpid()}.{self._seq:06d}")
            line = json.dumps({**record, "ts": ref.ts, "at": datetime.now(UTC).isoformat()})
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode("utf-8"))
            finally:
                os.close(fd)
            return ref

    def dm(self, user: str, message: Message) -> MessageRef:
        return self._write({"how": "dm", "to": user, "text": message.text})

    def post(self, channel: str, message: Message, thread_ts: str | None = None) -> MessageRef:
        return self._write(
            {"how": "post", "to": channel, "text": message.text, "thread": thread_ts}
        )

    def update(self, ref: MessageRef, message: Message) -> None:
        self._write({"how": "update", "to": ref.channel, "text": message.text, "ref": ref.ts})
