"""Tables for maintenance windows and check states (revision 0009_maintenance).

``maintenance_windows``: one planned window on a server or a customer (core/maintenance.py says
what it does). Its reason and end are mandatory: the CHECK constraints hold that even for a
row written around the service. ``seen`` keeps what failed inside the window, per alert key,
for the summary posted when it ends and for the alerts still firing then.

``check_states``: the last state (firing, ok) of every alert key that has fired, with its
changes in the last 30 minutes: how flapping is told (core/flapping.py). A key that has been
quiet and ok for that long is dropped.

Timestamps are stored in UTC; read them through ``storage.models_incidents.aware``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, Column, DateTime, Index, Text
from sqlalchemy import text as sql_text
from sqlmodel import Field, SQLModel

# Windows whose end has not been handled yet (summary, end notices, alerts still firing).
NOT_CLOSED = "closed_at IS NULL"


def _ts(nullable: bool = True, index: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


class MaintenanceWindowRow(SQLModel, table=True):
    __tablename__ = "maintenance_windows"
    __table_args__ = (
        CheckConstraint("length(trim(reason)) > 0", name="ck_maintenance_reason"),
        CheckConstraint("ends_at > starts_at", name="ck_maintenance_end"),
        CheckConstraint("target_kind IN ('server', 'customer')", name="ck_maintenance_kind"),
        # The sweep's question every minute: which windows still need their end handled?
        Index(
            "ix_maintenance_open_ends",
            "ends_at",
            sqlite_where=sql_text(NOT_CLOSED),
            postgresql_where=sql_text(NOT_CLOSED),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    target_kind: str = Field(max_length=16)  # server, customer
    target: str = Field(max_length=63, index=True)
    starts_at: datetime = Field(sa_column=_ts(nullable=False))
    ends_at: datetime = Field(sa_column=_ts(nullable=False))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    notify: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    created_by: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    # An early end (``/db maintenance end``); at or before starts_at it is a cancellation.
    ended_at: datetime | None = Field(default=None, sa_column=_ts())
    ended_by: str | None = Field(default=None, max_length=64)
    # The end handled (claimed once, whoever runs the sweep): its summary, notices, replays.
    closed_at: datetime | None = Field(default=None, sa_column=_ts())
    # Where the bot announced the window: the summary goes in that message's thread.
    announcement_channel: str | None = Field(default=None, max_length=64)
    announcement_ts: str | None = Field(default=None, max_length=64)
    summary_posted_at: datetime | None = Field(default=None, sa_column=_ts())
    # What failed inside the window, per alert key (core/windows.py: Seen).
    seen: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class CheckStateRow(SQLModel, table=True):
    __tablename__ = "check_states"

    key: str = Field(primary_key=True, max_length=200)  # the alert's dedupe key
    state: str = Field(max_length=8)  # firing, ok
    changed_at: datetime = Field(sa_column=_ts(nullable=False))
    # ISO times of the changes in the last 30 minutes, oldest first.
    changes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    flapping: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    flapping_since: datetime | None = Field(default=None, sa_column=_ts())
    # Sweeps seen since the last change, counted while flapping (two clear it).
    stable: int = Field(default=0)
    episodes: int = Field(default=0)  # how many times it has been marked flapping
    updated_at: datetime = Field(sa_column=_ts(nullable=False))
