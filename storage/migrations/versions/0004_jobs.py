"""scheduler claims and checklists

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("scheduled_for", TS, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("claimed_at", TS, nullable=False),
        sa.Column("lease_until", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_id", sa.String(length=32), nullable=True),
        sa.UniqueConstraint("job_id", "scheduled_for", name="uq_job_runs_slot"),
    )
    op.create_index("ix_job_runs_job_id", "job_runs", ["job_id"])
    op.create_table(
        "checklist_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("items", sa.JSON(), nullable=False),
        sa.Column("posted_at", TS, nullable=False),
        sa.Column("posted_by", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=True),
        sa.Column("message_ts", sa.String(length=64), nullable=True),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("nudged_at", TS, nullable=True),
    )
    op.create_index("ix_checklist_runs_name", "checklist_runs", ["name"])
    op.create_table(
        "checklist_ticks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("checklist_runs.id"), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.UniqueConstraint("run_id", "item", name="uq_checklist_ticks_item"),
    )
    op.create_index("ix_checklist_ticks_run_id", "checklist_ticks", ["run_id"])


def downgrade() -> None:
    op.drop_table("checklist_ticks")
    op.drop_table("checklist_runs")
    op.drop_table("job_runs")
