"""Slack outbox (issue 14)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("thread", sa.String(length=64), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("about", sa.String(length=200), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", TS, nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("first_attempt_at", TS, nullable=True),
        sa.Column("in_doubt", sa.Boolean(), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=True),
        sa.Column("ts", sa.String(length=64), nullable=True),
        sa.Column("error", sa.String(length=300), nullable=True),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("notice_of", sa.Integer(), nullable=True),
        sa.Column("cleared_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("sent_at", TS, nullable=True),
        sa.UniqueConstraint("key", name="uq_outbox_key"),
    )
    op.create_index("ix_outbox_status_next_at", "outbox", ["status", "next_at"])
    op.create_index("ix_outbox_parent_id", "outbox", ["parent_id"])
    op.create_index("ix_outbox_about", "outbox", ["about"])
    op.create_index("ix_outbox_ts", "outbox", ["ts"])


def downgrade() -> None:
    op.drop_table("outbox")
