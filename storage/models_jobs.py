"""Scheduler tables: one claim per (job, scheduled time); routine checklists and their ticks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel

from storage.models import utcnow


class JobRun(SQLModel, table=True):
    """A claimed run of a scheduled job. The unique (job_id, scheduled_for) is what makes a run
    happen once across scheduler replicas: only the process whose INSERT succeeds runs it."""

    __tablename__ = "job_runs"
    __table_args__ = (UniqueConstraint("job_id", "scheduled_for", name="uq_job_runs_slot"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(max_length=64, index=True)
    scheduled_for: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    status: str = Field(default="running", max_length=16)  # running, ok, failed
    owner: str = Field(max_length=128)
    claimed_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    # A run whose owner died is taken over once its lease has passed.
    lease_until: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    attempts: int = Field(default=1)
    error_id: str | None = Field(default=None, max_length=32)


class ChecklistRun(SQLModel, table=True):
    """One posting of a routine checklist and where it was posted."""

    __tablename__ = "checklist_runs"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, index=True)
    title: str = Field(max_length=200)
    items: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    posted_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    posted_by: str = Field(max_length=64)
    channel: str | None = Field(default=None, max_length=64)
    message_ts: str | None = Field(default=None, max_length=64)
    completed_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    nudged_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class ChecklistTick(SQLModel, table=True):
    """The current state of one item: who ticked (or unticked) it last, and when."""

    __tablename__ = "checklist_ticks"
    __table_args__ = (UniqueConstraint("run_id", "item", name="uq_checklist_ticks_item"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="checklist_runs.id", index=True)
    item: int
    done: bool
    user: str = Field(max_length=64)
    at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
