"""The fallback `make test` uses where no PostgreSQL answers: a throwaway cluster made with the
machine's own initdb/pg_ctl, which the suite can create databases on and which is gone after."""

from __future__ import annotations

import psycopg

from tests.pgserver import Databases, throwaway_cluster


def test_throwaway_cluster_serves_and_goes_away() -> None:
    with throwaway_cluster() as conninfo:
        dbs = Databases(conninfo)
        url = dbs.create()
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        dbs.drop_all()
    try:
        psycopg.connect(conninfo, connect_timeout=2).close()
    except psycopg.OperationalError:
        pass
    else:
        raise AssertionError("the throwaway cluster still answers after the session")
