"""What identifies one delivery from Slack, so a retried delivery is recognised."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from slack_bolt.request.async_request import AsyncBoltRequest


def delivery_key(kind: str, body: dict[str, Any], request: AsyncBoltRequest) -> str:
    """``trigger_id`` is unique per slash command and per button press, and a retry repeats the
    same body; without one, the body's hash is the identity."""
    trigger = trigger_of(body)
    if trigger is not None:
        return f"{kind}:{trigger}"
    raw = request.raw_body.encode("utf-8")
    return f"{kind}:sha256:{hashlib.sha256(raw).hexdigest()}"


@dataclass(frozen=True)
class Destination:
    """Where a reply goes: Slack's response_url, else the channel (ephemeral to ``user``)."""

    response_url: str | None = None
    channel: str | None = None
    user: str | None = None


def trigger_of(body: dict[str, Any]) -> str | None:
    """Slack's trigger_id, which lets the reply open a modal (for 3 seconds)."""
    trigger = body.get("trigger_id")
    return trigger if isinstance(trigger, str) and 0 < len(trigger) <= 150 else None
