"""A logical replication slot on a real PostgreSQL 15: the ``replication_slots`` check.

A subscriber that stops consuming leaves its logical slot holding WAL: the check is warn with
the bytes the slot retains (as the server itself counts them). Once ``max_slot_wal_keep_size``
is small, a checkpoint invalidates the slot (``wal_status = 'lost'``: the subscriber can never
catch up) and the check is crit, naming the slot.

Logical slots need ``wal_level = logical``, which the session's sandbox does not run with (and
changing it needs a restart): this file starts a cluster of its own, from the machine's
PostgreSQL 15, with the default 16 MB WAL segments (so ~200 MB is 13 switched segments, as a
real server's would be), and reads it through a monitoring role with pg_monitor, as a fleet's
DSN does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core import health, pgbins
from core.fleet import DEFAULT_THRESHOLDS, Fleet, Server
from tests.pgserver import free_port

MB = 2**20
SLOT = "acme_subscriber"
SEGMENTS = 13  # 13 segments of 16 MB: about 208 MB held, between warn (100MB) and crit (1GB)


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class Cluster:
    """A PostgreSQL 15 cluster with wal_level = logical, and a fleet that monitors it."""

    def __init__(self, port: int) -> None:
        self.admin_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        monitor = f"host=127.0.0.1 port={port} user=dbops_monitor dbname=postgres"
        self.server = Server(name="vps1", transport="local", dsn=monitor, admin_dsn=self.admin_dsn)
        self.fleet = Fleet(servers=[self.server])

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def check(self) -> health.Check:
        """dbops's replication_slots check, as a sweep runs it (the fleet's default limits)."""
        found = health.check_cluster(self.server, self.fleet)
        return next(c for c in found if c.name == "replication_slots")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    pg_bin = pgbins.server_bin(15)
    base = Path(tempfile.mkdtemp(prefix="dbops-slots-"))
    data, port = base / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    initdb = [str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    subprocess.run(_as_postgres([*initdb, "--no-sync"]), check=True, capture_output=True)
    # fsync and wal_init_zero off: each switched segment costs no 16 MB of zeros on disk; the
    # WAL's positions, the slot's bookkeeping and the checkpoint's removal are as on any server.
    opts = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c wal_level=logical"
        " -c fsync=off -c wal_init_zero=off -c max_wal_size=1GB -c checkpoint_timeout=1h"
    )
    ctl = [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(base / "log")]
    subprocess.run(_as_postgres([*ctl, "-o", opts, "-w", "start"]), check=True, capture_output=True)
    try:
        found = Cluster(port)
        with found.admin() as conn:
            conn.execute("CREATE ROLE dbops_monitor LOGIN IN ROLE pg_monitor")
        yield found
    finally:
        subprocess.run(_as_postgres([*ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _wal_switches(conn: psycopg.Connection[Any], count: int) -> None:
    """``count`` WAL segments retired: a row written, then a switch to the next segment."""
    conn.execute("CREATE TABLE IF NOT EXISTS public.orders (n int)")
    for n in range(count):
        conn.execute("INSERT INTO public.orders VALUES (%s)", (n,))
        conn.execute("SELECT pg_switch_wal()")


def _retained(conn: psycopg.Connection[Any]) -> int:
    """The server's own count of the WAL the slot holds back."""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (SLOT,),
    ).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def _wal_status(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
    ).fetchone()
    assert row is not None
    return str(row[0])


def test_a_logical_slot_holding_wal_is_warn_then_lost_is_crit(cluster: Cluster) -> None:
    assert DEFAULT_THRESHOLDS["replication_slots"] == {"warn": "100MB", "crit": "1GB"}
    with cluster.admin() as conn:
        assert conn.info.server_version // 10000 == 15
        none = cluster.check()
        assert (none.verdict, none.value, none.detail) == ("ok", 0, "no replication slots")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
        try:
            fresh = cluster.check()
            assert fresh.verdict == "ok" and isinstance(fresh.value, int), fresh
            assert fresh.value < 16 * MB, fresh

            # The subscriber stops consuming: ~200 MB of WAL later the slot still holds it all.
            _wal_switches(conn, SEGMENTS)
            before = _retained(conn)
            got = cluster.check()
            after = _retained(conn)
            assert got.verdict == "warn", got
            assert isinstance(got.value, int)
            assert before <= got.value <= after, (before, got.value, after)
            assert abs(got.value - before) <= 0.05 * before, (before, got)
            assert SEGMENTS * 16 * MB - 16 * MB <= got.value <= (SEGMENTS + 1) * 16 * MB, got
            assert got.warn == 100 * MB and got.crit == 1024 * MB, got
            assert got.detail.startswith(f"{SLOT} retains "), got
            assert f"inactive: {SLOT}" in got.detail, got
            assert "max_slot_wal_keep_size = -1" in got.detail, got  # nothing caps it yet
            assert _wal_status(conn) in ("reserved", "extended")

            # A small max_slot_wal_keep_size: the next checkpoint gives up on the slot.
            conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '32MB'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while _wal_status(conn) != "lost":
                assert time.monotonic() < deadline, _wal_status(conn)
                _wal_switches(conn, 1)
                conn.execute("CHECKPOINT")
            lost = cluster.check()
            assert lost.verdict == "crit", lost
            assert f"lost (its WAL is gone, the consumer must be re-synced): {SLOT}" in (
                lost.detail
            ), lost
            assert lost.value == 0, lost  # an invalidated slot has no restart_lsn: holds nothing
            assert "max_slot_wal_keep_size" not in lost.detail, lost  # a limit is set now
            assert f"inactive: {SLOT}" not in lost.detail, lost  # lost says more than inactive
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
    assert cluster.check().verdict == "ok"
