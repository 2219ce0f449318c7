"""Tables for incidents, escalation timers and on-call (revision 0003_incidents).

Timestamps are stored in UTC; SQLite hands them back naive, so readers go through ``aware()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    Text,
    UniqueConstraint,
)
from sqlalchemy import text as sql_text
from sqlmodel import Field, Session, SQLModel

from storage.db import is_sqlite

# An incident counts as open for deduplication until a human resolves it.
NOT_RESOLVED = "status != 'resolved'"
PENDING = "state = 'pending'"


def aware(ts: datetime | None) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite returns naive ones)."""
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def utc(ts: datetime) -> datetime:
    """A timestamp to store: aware UTC (a naive one is taken to be UTC already)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session for a read-modify-write: on SQLite its transaction takes the write lock with its
    first statement (BEGIN IMMEDIATE), so two writers never both read the old state; on
    PostgreSQL use ``with_for_update()`` on the rows read. Commits on success."""
    opts = {"sqlite_begin": "IMMEDIATE"} if is_sqlite(engine) else {}
    with (
        engine.connect().execution_options(**opts) as conn,
        Session(bind=conn, expire_on_commit=False) as session,
    ):
        yield session
        session.commit()


def _ts(nullable: bool = True, index: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


class IncidentRow(SQLModel, table=True):
    """One incident. Its timeline is the event log's events with subject ``inc-<id>``."""

    __tablename__ = "incidents"
    __table_args__ = (
        # One not-resolved incident per problem: two raisers racing on the same alert cannot
        # both open one (the loser's INSERT fails and it joins the winner's incident).
        Index(
            "uq_incidents_open_dedupe",
            "dedupe_key",
            unique=True,
            sqlite_where=sql_text(NOT_RESOLVED),
            postgresql_where=sql_text(NOT_RESOLVED),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(max_length=200)
    severity: str = Field(max_length=2)
    status: str = Field(default="open", max_length=16, index=True)
    # server_down, db_down, check, manual
    kind: str = Field(default="manual", max_length=32)
    server: str | None = Field(default=None, max_length=63, index=True)
    customers: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Customers whose own alert has recovered while the incident stays open.
    recovered_customers: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    dedupe_key: str | None = Field(default=None, max_length=200)
    # A customer's incident that a server-down incident took over.
    parent_id: int | None = Field(
        default=None,
        sa_column=Column(Integer, ForeignKey("incidents.id"), nullable=True, index=True),
    )
    owner: str | None = Field(default=None, max_length=64)
    opened_by: str | None = Field(default=None, max_length=64)
    source: str = Field(default="manual", max_length=32)
    # Changes on ack, resolve and merge: an escalation timer holding an older token is stale.
    token: str = Field(max_length=32)
    opened_at: datetime = Field(sa_column=_ts(nullable=False, index=True))
    acknowledged_at: datetime | None = Field(default=None, sa_column=_ts())
    mitigated_at: datetime | None = Field(default=None, sa_column=_ts())
    resolved_at: datetime | None = Field(default=None, sa_column=_ts())
    recovered_at: datetime | None = Field(default=None, sa_column=_ts())
    last_alert_at: datetime | None = Field(default=None, sa_column=_ts())
    alert_count: int = Field(default=0)
    cause: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Where the incident card was posted, so it can be updated in place.
    card_channel: str | None = Field(default=None, max_length=64)
    card_ts: str | None = Field(default=None, max_length=64)
    updated_at: datetime = Field(sa_column=_ts(nullable=False))


class EscalationTimer(SQLModel, table=True):
    """One step to take at ``due_at``: a page (DM or channel post) or a P0 update reminder.

    A worker claims due rows atomically and holds them for a lease; one killed mid-step leaves
    its claim to expire and another worker retries the step.
    """

    __tablename__ = "escalation_timers"
    __table_args__ = (
        UniqueConstraint("incident_id", "kind", "round", "step", "token", name="uq_timers_step"),
        Index(
            "ix_timers_pending_due",
            "due_at",
            sqlite_where=sql_text(PENDING),
            postgresql_where=sql_text(PENDING),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(
        sa_column=Column(Integer, ForeignKey("incidents.id"), nullable=False, index=True)
    )
    kind: str = Field(max_length=16)  # page, reminder
    round: int = Field(default=0)
    step: int = Field(default=0)
    target: str = Field(max_length=16)  # primary, secondary, channel, owner
    due_at: datetime = Field(sa_column=_ts(nullable=False))
    token: str = Field(max_length=32)
    state: str = Field(default="pending", max_length=16)  # pending, done, stale, cancelled, failed
    claimed_by: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(default=None, sa_column=_ts())
    attempts: int = Field(default=0)
    done_at: datetime | None = Field(default=None, sa_column=_ts())
    outcome: str | None = Field(default=None, max_length=200)


class OnCallOverride(SQLModel, table=True):
    """An admin's `/db oncall set primary @user`: wins over the rotation until cleared."""

    __tablename__ = "oncall_overrides"

    id: int | None = Field(default=None, primary_key=True)
    role: str = Field(max_length=16, index=True)  # primary, secondary
    user_id: str = Field(max_length=64)
    set_by: str = Field(max_length=64)
    set_at: datetime = Field(sa_column=_ts(nullable=False))
    ends_at: datetime | None = Field(default=None, sa_column=_ts())
    cleared_at: datetime | None = Field(default=None, sa_column=_ts())
    cleared_by: str | None = Field(default=None, max_length=64)


class OnCallState(SQLModel, table=True):
    """The on-call pair last announced, so a handoff is announced once when it changes."""

    __tablename__ = "oncall_state"

    name: str = Field(primary_key=True, max_length=32)
    primary_user: str | None = Field(default=None, max_length=64)
    secondary_user: str | None = Field(default=None, max_length=64)
    updated_at: datetime = Field(sa_column=_ts(nullable=False))
