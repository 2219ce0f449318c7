"""event log guard: keyed chain segments, checkpoints, UPDATE/DELETE refused (issue 16)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

``key_id`` and ``mac``: the key that sealed an event and its HMAC (NULL on unkeyed events, which
keep the plain sha256 chain). Triggers make the database itself refuse UPDATE, DELETE (and on
PostgreSQL TRUNCATE) of events, whoever asks; the app role's grants (README) refuse them too.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_SQLITE_TRIGGERS = [
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE refused'); END",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
    "BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE refused'); END",
]
_PG_TRIGGERS = [
    """CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'events are append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$""",
    "CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events "
    "FOR EACH ROW EXECUTE FUNCTION events_append_only()",
    "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()",
]


def upgrade() -> None:
    op.add_column("events", sa.Column("key_id", sa.String(length=16), nullable=True))
    op.add_column("events", sa.Column("mac", sa.String(length=64), nullable=True))
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in _SQLITE_TRIGGERS if sqlite else _PG_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS events_no_update")
        op.execute("DROP TRIGGER IF EXISTS events_no_delete")
    else:
        op.execute("DROP TRIGGER IF EXISTS events_no_update_delete ON events")
        op.execute("DROP TRIGGER IF EXISTS events_no_truncate ON events")
        op.execute("DROP FUNCTION IF EXISTS events_append_only()")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("mac")
        batch.drop_column("key_id")
