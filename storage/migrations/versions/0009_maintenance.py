"""maintenance windows and check states (issue 18)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10

``maintenance_windows``: planned windows on a server or a customer, with a mandatory reason
and end (CHECK constraints), what failed inside each (``seen``) and where it was announced.
``check_states``: the last state of every alert key that has fired and its recent changes,
for flap damping. storage/models_maintenance.py says what each column keeps.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

NOT_CLOSED = sa.text("closed_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "maintenance_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=63), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("notify", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_by", sa.String(length=64), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("announcement_channel", sa.String(length=64), nullable=True),
        sa.Column("announcement_ts", sa.String(length=64), nullable=True),
        sa.Column("summary_posted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seen", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("length(trim(reason)) > 0", name="ck_maintenance_reason"),
        sa.CheckConstraint("ends_at > starts_at", name="ck_maintenance_end"),
        sa.CheckConstraint("target_kind IN ('server', 'customer')", name="ck_maintenance_kind"),
    )
    op.create_index("ix_maintenance_windows_target", "maintenance_windows", ["target"])
    op.create_index(
        "ix_maintenance_open_ends",
        "maintenance_windows",
        ["ends_at"],
        sqlite_where=NOT_CLOSED,
        postgresql_where=NOT_CLOSED,
    )
    op.create_table(
        "check_states",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("flapping", sa.Boolean(), nullable=False),
        sa.Column("flapping_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stable", sa.Integer(), nullable=False),
        sa.Column("episodes", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("check_states")
    op.drop_index("ix_maintenance_open_ends", table_name="maintenance_windows")
    op.drop_index("ix_maintenance_windows_target", table_name="maintenance_windows")
    op.drop_table("maintenance_windows")
