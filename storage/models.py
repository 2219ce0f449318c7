"""SQLModel tables. Every change here needs an Alembic revision in storage/migrations/versions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(SQLModel, table=True):
    """One entry of the append-only, hash-chained event log."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("source", "source_id", name="uq_events_source"),)

    # Assigned by EventLog.append under its lock (head + 1), so ids have no gaps.
    id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    ts: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    kind: str = Field(max_length=64, index=True)
    actor: str | None = Field(default=None, max_length=64, index=True)
    subject: str | None = Field(default=None, max_length=200, index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    source: str = Field(default="dbops", max_length=64)
    source_id: str | None = Field(default=None, max_length=200)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)
    # The key that sealed the event and its HMAC; NULL on an unkeyed event (storage/eventkeys.py).
    key_id: str | None = Field(default=None, max_length=16)
    mac: str | None = Field(default=None, max_length=64)


class Customer(SQLModel, table=True):
    """A customer and where its database lives. Provisioning and `dbops fleet import` add them."""

    __tablename__ = "customers"

    name: str = Field(primary_key=True, max_length=63)
    server: str = Field(max_length=63, index=True)
    database: str = Field(max_length=63)
    role: str = Field(max_length=63)
    plan: str | None = Field(default=None, max_length=63)
    email: str | None = Field(default=None, max_length=254)
    status: str = Field(default="active", max_length=16)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
