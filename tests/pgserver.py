"""A PostgreSQL server for the test session.

In order: ``TEST_DATABASE_URL`` when set; the server at 127.0.0.1:5432 when one answers (unless
``TEST_PG_THROWAWAY=1``); else a throwaway cluster made with the machine's own initdb/pg_ctl (as
the ``postgres`` user when we are root, since initdb refuses to run as root), stopped when the
session ends.

``TEST_PG_THROWAWAY=1`` is for ``make test-later``: the suite runs under libfaketime a year
ahead, and only a server it starts itself inherits that clock (the machine's own runs on the
real one, and its ``now()`` would disagree with everything else the tests compare).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg import sql

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def _answers(conninfo: str) -> bool:
    try:
        with psycopg.connect(conninfo, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """initdb + pg_ctl start a cluster on a free port; yields its admin conninfo."""
    base = Path(tempfile.mkdtemp(prefix="dbops-testpg-"))
    data, port = base / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "log"),
                "-o",
                opts,
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def admin_conninfo() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url.replace("postgresql+psycopg://", "postgresql://")
        return
    local = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    if os.environ.get("TEST_PG_THROWAWAY") != "1" and _answers(local):
        yield local
        return
    with throwaway_cluster() as conninfo:
        yield conninfo


def sqlalchemy_url(conninfo: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = params.get("user", "postgres")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", 5432)
    password = params.get("password")
    auth = f"{user}:{password}" if password else str(user)
    return f"postgresql+psycopg://{auth}@{host}:{port}/{params.get('dbname', 'postgres')}"


class Databases:
    """Creates and drops scratch databases on one server."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.made: list[str] = []

    def create(self, template: str | None = None) -> str:
        """A new database: empty, or a copy of ``template`` (one made here, nobody connected)."""
        name = f"dbops_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            if template is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            else:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                        sql.Identifier(name), sql.Identifier(template)
                    )
                )
            # A scratch database need not outlive a crash of the server: commits return without
            # waiting for the WAL flush (the machine's server fsyncs; the suite commits a lot).
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
                    sql.Identifier(name)
                )
            )
        self.made.append(name)
        return sqlalchemy_url(psycopg.conninfo.make_conninfo(self.conninfo, dbname=name))

    def drop_all(self) -> None:
        """Drops what was made, eight at a time: each DROP DATABASE waits for a checkpoint
        (~0.5 s here), which drops running together share (70 databases: ~40 s -> ~8 s)."""

        def drop(name: str) -> None:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(drop, self.made))
        self.made.clear()


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(interval)
    return False
