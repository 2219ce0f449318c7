"""The sweep's measurements, kept as a compact history (revision 0008_history).

One row is one point of one series in one tier:

* tier 0 (``SWEEP``): every sweep, kept two days;
* tier 1 (``HOUR``): one row per UTC hour, kept 30 days;
* tier 2 (``DAY``): one row per UTC day, kept two years.

core/trends.py writes tier 0 and rolls it up into the others. ``at`` is the sample's time, or
the start of an aggregate's bucket, in whole seconds since the epoch (UTC): eight bytes on
PostgreSQL, a few on SQLite (where a DateTime is a 26-character string), and bucket arithmetic
is an integer division on both. ``n`` is how many sweeps a row stands for.

How an aggregate keeps each metric (the same rule takes an hour from sweeps and a day from
hours):

=====================================  =====================================================
disk used (data and backup paths)      last value, and the maximum (``*_max``): a spike that
                                       nearly filled the disk between two hours stays seen
disk total, database size              last value (levels that move slowly)
backends, a database's connections     mean (weighted by ``n``) and maximum (``*_max``)
backup duration and size               last value (the newest backup as of the bucket's end)
=====================================  =====================================================

"Last" is the last value that was measured: a sweep that could not read a figure leaves it
NULL and does not blank the hour. On sweep rows the ``*_max`` columns are NULL (the maximum of
one sample is the sample; NULL costs nothing on PostgreSQL and a byte on SQLite).

Primary key (series, tier, at) answers a chart's question (one series, one tier, a time range);
the (tier, at) index answers the roll-up's and the expiry's (one tier, a time range, every
series). On SQLite the tables are WITHOUT ROWID: the rows live in the primary key's b-tree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    SmallInteger,
    String,
    TextClause,
    text,
)
from sqlmodel import Field, SQLModel

SWEEP, HOUR, DAY = 0, 1, 2
TIERS = (SWEEP, HOUR, DAY)
TIER_NAMES = {SWEEP: "sweep", HOUR: "hour", DAY: "day"}


def _key(name: str) -> Any:
    return Field(sa_column=Column(name, String(63), primary_key=True, autoincrement=False))


def _tier() -> Any:
    return Field(sa_column=Column("tier", SmallInteger, primary_key=True, autoincrement=False))


def _at() -> Any:
    return Field(sa_column=Column("at", BigInteger, primary_key=True, autoincrement=False))


def _big(name: str) -> Any:
    return Field(default=None, sa_column=Column(name, BigInteger, nullable=True))


def _int(name: str) -> Any:
    return Field(default=None, sa_column=Column(name, Integer, nullable=True))


def _float(name: str) -> Any:
    return Field(default=None, sa_column=Column(name, Float, nullable=True))


class ServerHistory(SQLModel, table=True):
    """A server's disk (data and backup paths) and backends."""

    __tablename__ = "history_servers"
    __table_args__ = (
        Index("ix_history_servers_tier_at", "tier", "at"),
        {"sqlite_with_rowid": False},
    )

    server: str = _key("server")
    tier: int = _tier()
    at: int = _at()
    n: int = Field(default=1, sa_column=Column("n", Integer, nullable=False))
    data_used: int | None = _big("data_used")
    data_used_max: int | None = _big("data_used_max")
    data_total: int | None = _big("data_total")
    backup_used: int | None = _big("backup_used")
    backup_used_max: int | None = _big("backup_used_max")
    backup_total: int | None = _big("backup_total")
    backends: float | None = _float("backends")
    backends_max: int | None = _int("backends_max")


class DatabaseHistory(SQLModel, table=True):
    """A customer database's size, connections and newest backup."""

    __tablename__ = "history_databases"
    __table_args__ = (
        Index("ix_history_databases_tier_at", "tier", "at"),
        {"sqlite_with_rowid": False},
    )

    customer: str = _key("customer")
    tier: int = _tier()
    at: int = _at()
    server: str = Field(sa_column=Column("server", String(63), nullable=False))
    n: int = Field(default=1, sa_column=Column("n", Integer, nullable=False))
    size_bytes: int | None = _big("size_bytes")
    connections: float | None = _float("connections")
    connections_max: int | None = _int("connections_max")
    backup_seconds: float | None = _float("backup_seconds")
    backup_bytes: int | None = _big("backup_bytes")


HISTORY_TABLES: tuple[type[SQLModel], ...] = (ServerHistory, DatabaseHistory)


def insert_missing(conn: Connection, model: type[SQLModel], rows: list[dict[str, Any]]) -> None:
    """Insert ``rows``, skipping any whose (series, tier, at) is there already: recording the
    same sweep twice, or two processes rolling up the same hour, leaves one row. A column a row
    leaves out is NULL. ``ON CONFLICT DO NOTHING`` is spelled the same on SQLite and PostgreSQL;
    the statement is text made once per table (SQLAlchemy's dialect inserts with on-conflict are
    compiled again at every call, the larger part of a sweep's cost here)."""
    if not rows:
        return
    statement, names = _insert_statement(model)
    conn.execute(statement, [{name: row.get(name) for name in names} for row in rows])


_INSERTS: dict[str, tuple[TextClause, tuple[str, ...]]] = {}


def _insert_statement(model: type[SQLModel]) -> tuple[TextClause, tuple[str, ...]]:
    table = model.__table__  # type: ignore[attr-defined]
    if table.name not in _INSERTS:
        names = tuple(c.name for c in table.columns)
        _INSERTS[table.name] = (
            text(
                f"INSERT INTO {table.name} ({', '.join(names)}) "
                f"VALUES ({', '.join(':' + n for n in names)}) ON CONFLICT DO NOTHING"
            ),
            names,
        )
    return _INSERTS[table.name]
