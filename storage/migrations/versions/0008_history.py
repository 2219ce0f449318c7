"""measurement history: the sweep's figures, downsampled as they age (issue 20)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Two tables, one row per point of a series in a tier (0 sweep, 1 hour, 2 day); storage/
models_history.py says what each column keeps. ``at`` is epoch seconds (UTC). On SQLite the
tables are WITHOUT ROWID, so each row is stored once, in its primary key.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _series(key: str) -> list:
    return [
        sa.Column(key, sa.String(length=63), primary_key=True, autoincrement=False),
        sa.Column("tier", sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.BigInteger(), primary_key=True, autoincrement=False),
    ]


def upgrade() -> None:
    op.create_table(
        "history_servers",
        *_series("server"),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("data_used", sa.BigInteger(), nullable=True),
        sa.Column("data_used_max", sa.BigInteger(), nullable=True),
        sa.Column("data_total", sa.BigInteger(), nullable=True),
        sa.Column("backup_used", sa.BigInteger(), nullable=True),
        sa.Column("backup_used_max", sa.BigInteger(), nullable=True),
        sa.Column("backup_total", sa.BigInteger(), nullable=True),
        sa.Column("backends", sa.Float(), nullable=True),
        sa.Column("backends_max", sa.Integer(), nullable=True),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_history_servers_tier_at", "history_servers", ["tier", "at"])
    op.create_table(
        "history_databases",
        *_series("customer"),
        sa.Column("server", sa.String(length=63), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("connections", sa.Float(), nullable=True),
        sa.Column("connections_max", sa.Integer(), nullable=True),
        sa.Column("backup_seconds", sa.Float(), nullable=True),
        sa.Column("backup_bytes", sa.BigInteger(), nullable=True),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_history_databases_tier_at", "history_databases", ["tier", "at"])


def downgrade() -> None:
    op.drop_index("ix_history_databases_tier_at", table_name="history_databases")
    op.drop_table("history_databases")
    op.drop_index("ix_history_servers_tier_at", table_name="history_servers")
    op.drop_table("history_servers")
