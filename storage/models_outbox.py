"""The Slack outbox (revision 0006_outbox): every message dbops posts, DMs or updates, as a row
written in the same transaction as its ``message.queued`` event and kept until Slack took it.

core/outbox.py says how rows move: pending -> sending (claimed under a lease) -> sent, or back
to pending (a 429, a transient error), or failed (an error no retry can fix). An update waits
for the message it updates, a thread reply for its parent (``parent_id``); ``superseded`` is an
update that a newer one of the same message made pointless.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from storage.models import utcnow

STATUSES = ("pending", "sending", "sent", "failed", "superseded")


class OutboxRow(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("key", name="uq_outbox_key"),
        # The worker's question, "what is due?", and the healthz one, "what failed?".
        Index("ix_outbox_status_next_at", "status", "next_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    # The idempotency key: the same key enqueued twice is one message. Also what the posted
    # message carries in its Slack metadata, so a send whose answer was lost can be found.
    key: str = Field(max_length=200)
    kind: str = Field(max_length=8)  # post, dm, update
    target: str = Field(max_length=200)  # a channel (name or id) or, for a DM, a user id
    # A post's thread_ts, or the ts of the message an update rewrites (when it was known).
    thread: str | None = Field(default=None, max_length=64)
    # The outbox row whose ts this one needs first (a thread's parent, an update's message).
    parent_id: int | None = Field(default=None, index=True)
    # Which message an update rewrites ("outbox:<id>" or "<channel>/<ts>"): updates of one
    # message go in order and only the newest is sent.
    about: str | None = Field(default=None, max_length=200, index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", max_length=16)
    attempts: int = Field(default=0)
    next_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    first_attempt_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    # An earlier attempt may have reached Slack (no answer, or its sender died mid-send): look
    # for the message before sending it again.
    in_doubt: bool = Field(default=False)
    channel: str | None = Field(default=None, max_length=64)  # where it landed (Slack's id)
    ts: str | None = Field(default=None, max_length=64, index=True)
    error: str | None = Field(default=None, max_length=300)
    # 0: a message dbops meant to send; 1: a notice that one failed; 2: a notice that a
    # notice DM failed, in the ops channel. Nothing past 2 is ever sent about a failure.
    depth: int = Field(default=0)
    notice_of: int | None = Field(default=None)
    # A failed row stops counting for /healthz once a later send to the same place worked.
    cleared_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    sent_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
