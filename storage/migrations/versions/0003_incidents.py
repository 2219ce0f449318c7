"""incidents, escalation timers, on-call overrides

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NOT_RESOLVED = sa.text("status != 'resolved'")
PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("severity", sa.String(length=2), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("server", sa.String(length=63), nullable=True),
        sa.Column("customers", sa.JSON(), nullable=False),
        sa.Column("recovered_customers", sa.JSON(), nullable=False),
        sa.Column("dedupe_key", sa.String(length=200), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("opened_by", sa.String(length=64), nullable=True),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mitigated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recovered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_alert_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("alert_count", sa.Integer(), nullable=False),
        sa.Column("cause", sa.Text(), nullable=True),
        sa.Column("card_channel", sa.String(length=64), nullable=True),
        sa.Column("card_ts", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["parent_id"], ["incidents.id"]),
    )
    op.create_index("ix_incidents_status", "incidents", ["status"])
    op.create_index("ix_incidents_server", "incidents", ["server"])
    op.create_index("ix_incidents_parent_id", "incidents", ["parent_id"])
    op.create_index("ix_incidents_opened_at", "incidents", ["opened_at"])
    op.create_index(
        "uq_incidents_open_dedupe",
        "incidents",
        ["dedupe_key"],
        unique=True,
        sqlite_where=NOT_RESOLVED,
        postgresql_where=NOT_RESOLVED,
    )

    op.create_table(
        "escalation_timers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=16), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"]),
        sa.UniqueConstraint("incident_id", "kind", "round", "step", "token", name="uq_timers_step"),
    )
    op.create_index("ix_escalation_timers_incident_id", "escalation_timers", ["incident_id"])
    op.create_index(
        "ix_timers_pending_due",
        "escalation_timers",
        ["due_at"],
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )

    op.create_table(
        "oncall_overrides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("set_by", sa.String(length=64), nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cleared_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_oncall_overrides_role", "oncall_overrides", ["role"])

    op.create_table(
        "oncall_state",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("primary_user", sa.String(length=64), nullable=True),
        sa.Column("secondary_user", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("oncall_state")
    op.drop_table("oncall_overrides")
    op.drop_table("escalation_timers")
    op.drop_table("incidents")
