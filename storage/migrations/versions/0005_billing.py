"""provisioning jobs, billing accounts, SLA credits, operation locks

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "provision_jobs",
        sa.Column("customer", sa.String(length=63), primary_key=True),
        sa.Column("server", sa.String(length=63), nullable=False),
        sa.Column("plan", sa.String(length=63), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("names_claimed", sa.Boolean(), nullable=False),
        sa.Column("welcome", sa.String(length=16), nullable=False),
        sa.Column("welcome_sent_at", TS, nullable=True),
        sa.Column("stripe_customer", sa.String(length=64), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_table(
        "billing_accounts",
        sa.Column("customer", sa.String(length=63), primary_key=True),
        sa.Column("stripe_customer", sa.String(length=64), nullable=False),
        sa.Column("stripe_subscription", sa.String(length=64), nullable=True),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("stripe_customer"),
    )
    op.create_table(
        "sla_credits",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("customer", sa.String(length=63), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("stripe_customer", sa.String(length=64), nullable=False),
        sa.Column("stripe_txn", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("applied_at", TS, nullable=False),
        sa.UniqueConstraint("incident_id", "customer", name="uq_sla_credits_once"),
        sa.UniqueConstraint("idempotency_key"),
    )
    op.create_index("ix_sla_credits_incident_id", "sla_credits", ["incident_id"])
    op.create_table(
        "op_locks",
        sa.Column("name", sa.String(length=128), primary_key=True),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=True),
        sa.Column("acquired_at", TS, nullable=False),
        sa.Column("lease_until", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("op_locks")
    op.drop_index("ix_sla_credits_incident_id", table_name="sla_credits")
    op.drop_table("sla_credits")
    op.drop_table("billing_accounts")
    op.drop_table("provision_jobs")
