"""The attacker of the event-log tests: full write access to the database, not to the key.

The database refuses UPDATE and DELETE on events (migration 0007's triggers), so an attacker who
owns the database first lifts that guard, as its owner can, does the edit in raw SQL, and puts
the guard back so nothing looks amiss.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text


def tamper(engine: Engine, *statements: str | tuple[str, dict[str, Any]]) -> None:
    """Run ``statements`` (SQL, or (SQL, params)) against events with the guard lifted."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            triggers = conn.execute(
                text(
                    "SELECT name, sql FROM sqlite_master"
                    " WHERE type = 'trigger' AND tbl_name = 'events'"
                )
            ).all()
            for name, _sql in triggers:
                conn.execute(text(f'DROP TRIGGER "{name}"'))
        else:
            conn.execute(text("ALTER TABLE events DISABLE TRIGGER USER"))
        for statement in statements:
            sql, params = statement if isinstance(statement, tuple) else (statement, {})
            conn.execute(text(sql), params)
        if engine.dialect.name == "sqlite":
            for _name, sql in triggers:
                conn.execute(text(sql))
        else:
            conn.execute(text("ALTER TABLE events ENABLE TRIGGER USER"))
