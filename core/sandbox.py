"""A sandbox fleet on this machine: real PostgreSQL clusters, optional real sshds, and faults.

``up`` builds N clusters (initdb + pg_ctl, each on its own loopback port) with customer
databases, a first backup of each, continuous WAL archiving with a first full base backup
(pgBackRest, one stanza per cluster, its repository in the sandbox directory), a pgBouncer in
front of each cluster (Debian's
/usr/sbin/pgbouncer, on a port of its own, every customer database registered) and a
fleet.toml that points at them; with ``ssh=True`` every server also gets its own OpenSSH sshd so
the SSH transport is exercised for real.
``break_fault`` puts a server or database into one of the states the health checks look for
and ``heal`` undoes exactly what was broken. Everything lives in one directory, described by
its ``sandbox.json``.

This is for demos and tests only: the clusters trust every loopback connection, and so does
each pgBouncer for the customers ``up`` seeds and for its console. Customers that provisioning
adds log in to pgBouncer with their password, as on a real server.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from core import hostile_tenant, pgbins
from core.backups import write_backup
from core.errors import DbopsError
from core.fleet import Server, load_fleet
from core.names import validate_name, validate_server_name
from core.remote import CommandResult, LocalRunner, quote_argv

DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
SSHD = Path("/usr/sbin/sshd")
PGBOUNCER = Path("/usr/sbin/pgbouncer")
PGBACKREST = Path("/usr/bin/pgbackrest")
# WAL written is archived within this long (archive_timeout): the recovery point a lost server
# would cost, at most, while the archiver works.
ARCHIVE_TIMEOUT_S = 60
# Server connections per database and user: the clusters are small (MAX_CONNECTIONS) and
# shared by several customers.
PGBOUNCER_POOL_SIZE = 5
STATE_FILE = "sandbox.json"
FLEET_FILE = "fleet.toml"
# Whose emails the sandbox's (and the demo's) are: a made-up business, so they read as a real
# operator's would and SMTP_URL set with the sandbox fleet is production-shaped.
DEMO_BUSINESS = {
    "name": "Sandbox Hosting",
    "support_email": "support@sandbox-hosting.example",
    "support_hours": "Mon-Fri 9:00-18:00 ET",
    "signature": "The Sandbox Hosting team",
}
MONITOR_ROLE = "dbops_monitor"
ADMIN_ROLE = "postgres"
# Every session a fault helper opens carries this name, so heal can find and wait for them.
FAULT_APP = "dbops-sandbox-fault"
MAX_CONNECTIONS = 30
CONNECTIONS_FAULT_SHARE = 0.96

# Target kind of each fault: a customer (its database) or a server (its cluster).
FAULTS: dict[str, str] = {
    "db-down": "customer",
    "server-down": "server",
    "connections": "server",
    "idle-txn": "customer",
    "lock": "customer",
    "log-errors": "server",
    "backup-missing": "customer",
    "pgbouncer-down": "server",
    "ssh-hang": "server",
    "hostile": "customer",
    "disk-full": "server",
}

# disk-full: the server's backup path moves onto a tmpfs this much bigger than the backups it
# already holds (they are copied onto it), then a filler file takes every byte left.
DISK_FULL_BYTES = 16 << 20
DISK_FULL_FILLER = ".sandbox-disk-full"
_PAGE = 4096

CUSTOMER_NAMES = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "soylent",
    "cyberdyne", "tyrell", "vandelay", "dunder", "oscorp", "gringotts", "monarch", "nakatomi",
    "aperture", "virtucon", "contoso", "pied_piper", "bluth", "sterling", "massive", "duff",
    "krusty", "prestige", "gekko", "dharma", "pawnee",
)  # fmt: skip

# Sized like small managed-PostgreSQL offers (the SOPs give no figures); prices in whole USD.
PLANS: dict[str, dict[str, int]] = {
    "small": {"ram_mb": 1024, "storage_gb": 10, "connection_limit": 20, "price_usd_month": 15},
    "medium": {"ram_mb": 2048, "storage_gb": 25, "connection_limit": 50, "price_usd_month": 29},
    "large": {"ram_mb": 4096, "storage_gb": 60, "connection_limit": 100, "price_usd_month": 59},
}
_PLAN_CYCLE = ("small", "medium", "small", "large")

_lock_guard = threading.Lock()


def _is_root() -> bool:
    return os.geteuid() == 0


def _run_as() -> str | None:
    # initdb and pg_ctl refuse to run as root.
    return "postgres" if _is_root() else None


def _pg_runner(name: str = "sandbox") -> LocalRunner:
    return LocalRunner(name, run_as=_run_as(), command_timeout=60)


def _chown_postgres(*paths: Path) -> None:
    if not _is_root():
        return
    for path in paths:
        shutil.chown(path, "postgres", "postgres")
        for root, dirs, files in os.walk(path):
            for entry in (*dirs, *files):
                shutil.chown(os.path.join(root, entry), "postgres", "postgres")


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def _wait_for(what: str, ready: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise DbopsError(f"sandbox: {what} did not happen within {timeout:g}s.")
        time.sleep(interval)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# --- the sandbox directory ---------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path, create: bool = False) -> Iterator[None]:
    """One sandbox operation at a time per directory, across processes and threads."""
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        load_state(directory)  # raises the "no sandbox" error
    with _lock_guard, open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_state(dir: Path) -> dict[str, Any]:
    path = Path(dir).resolve() / STATE_FILE
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise DbopsError(
            f"no sandbox in {path.parent}.", hint=f"Run `dbops sandbox up --dir {path.parent}`."
        ) from None
    except json.JSONDecodeError as exc:
        raise DbopsError(
            f"{path} is damaged ({exc}); run `dbops sandbox down` and remove it."
        ) from None


def _save_state(directory: Path, state: dict[str, Any]) -> None:
    _atomic_write(directory / STATE_FILE, _json(state))


def _customer_names(count: int) -> list[str]:
    names = list(CUSTOMER_NAMES[:count])
    round_ = 2
    while len(names) < count:
        names.extend(f"{n}{round_}" for n in CUSTOMER_NAMES[: count - len(names)])
        round_ += 1
    return names


def _closed_parent(directory: Path) -> Path | None:
    """The first parent of ``directory`` the postgres user cannot enter (root only: otherwise
    the clusters run as the caller, who can reach it)."""
    if not _is_root():
        return None
    for parent in directory.parents:
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


def _check_reachable_by_postgres(directory: Path) -> None:
    parent = _closed_parent(directory)
    if parent is not None:
        raise DbopsError(
            f"the postgres user cannot reach {directory}: {parent} is closed to others.",
            hint="Use a directory under /tmp or /srv, or chmod o+x that parent.",
        )


# Where a sandbox lives when the directory asked for is under one closed to others (root's
# 0700 home on Debian): the clusters run as postgres and must reach their data.
OPEN_ROOT = Path("/var/tmp")  # noqa: S108 (a fresh mkdtemp name, never a fixed one)


def reachable_dir(directory: Path) -> Path:
    """``directory`` itself when the postgres user can reach it; else a directory of its own
    under /var/tmp, linked from ``directory`` so that every later command may name either.
    No one's home directory is opened to do it."""
    directory = Path(directory).expanduser().absolute()
    if directory.is_symlink():
        return directory.resolve()
    if _closed_parent(directory) is None or (directory / STATE_FILE).exists():
        return directory
    if directory.exists():
        if any(directory.iterdir()):
            raise DbopsError(
                f"the postgres user cannot reach {directory}, and it is not empty.",
                hint="Remove it, or name a directory under /tmp or /srv with --dir.",
            )
        directory.rmdir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A new name no one else can have made first (mkdtemp), opened to postgres only then.
    target = Path(tempfile.mkdtemp(prefix="dbops-sandbox-", dir=OPEN_ROOT))
    target.chmod(0o755)
    directory.symlink_to(target, target_is_directory=True)
    return target


def _pg_ctl(spec: dict[str, Any], *args: str) -> list[str]:
    return [
        f"{spec['pg_bin']}/pg_ctl",
        "-D",
        spec["data_path"],
        "-l",
        spec["log_path"],
        "-w",
        "-t",
        "30",
        *args,
    ]


def _admin_conninfo(spec: dict[str, Any], dbname: str = "postgres", user: str = ADMIN_ROLE) -> str:
    return make_conninfo(host="127.0.0.1", port=str(spec["port"]), user=user, dbname=dbname)


def customer_conninfo(state: dict[str, Any], customer: str, pgbouncer: bool = False) -> str:
    """How the customer's application would connect (their role, their database): straight to
    the cluster, or through the server's pgBouncer."""
    entry = _customer(state, customer)
    spec = _server(state, entry["server"])
    conninfo = _admin_conninfo(spec, dbname=entry["database"], user=entry["role"])
    if pgbouncer:
        if not spec.get("pgbouncer_port"):
            raise DbopsError(f"{spec['name']} has no pgBouncer in this sandbox.")
        conninfo = make_conninfo(conninfo, port=str(spec["pgbouncer_port"]))
    return conninfo


@contextlib.contextmanager
def _admin(spec: dict[str, Any], dbname: str = "postgres") -> Iterator[psycopg.Connection[Any]]:
    try:
        # search_path pinned, as dbops's own sessions have it: a tenant's own (the hostile
        # fault sets one) must not pick what the sandbox's admin sessions call.
        conn = psycopg.connect(
            _admin_conninfo(spec, dbname),
            autocommit=True,
            connect_timeout=5,
            options=hostile_tenant.PINNED,
        )
    except psycopg.OperationalError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no answer"
        raise DbopsError(
            f"sandbox: cannot connect to {spec['name']}'s PostgreSQL: {last}"
        ) from None
    with conn:
        yield conn


def _cluster_conf(spec: dict[str, Any], socket_dir: Path) -> str:
    settings = {
        "port": spec["port"],
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(socket_dir),
        "external_pid_file": str(Path(spec["data_path"]).parent / "postgres.pid"),
        "max_connections": MAX_CONNECTIONS,
        # No superuser-only slots: the `connections` fault then fills the server to a share of
        # max_connections that every monitor sees the same way, and leaves it one connection.
        "superuser_reserved_connections": 0,
        # Lets the prepared_txns check meet a real prepared transaction (the default is 0).
        "max_prepared_transactions": 5,
        "shared_buffers": "16MB",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_wal_size": "64MB",
        "min_wal_size": "32MB",
        "logging_collector": "off",
        "log_destination": "stderr",
        "log_line_prefix": "%m [%p] %q%u@%d %a ",
        "log_timezone": "UTC",
        "timezone": "UTC",
        "lc_messages": "C",
    }
    if spec.get("pgbackrest_dir"):
        settings.update(_archive_settings(spec))
    lines = ["# Written by dbops sandbox; sandbox only, never for production."]
    for key, value in settings.items():
        shown = value if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"
        lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


# --- WAL archiving (pgBackRest) ----------------------------------------------------------------


def _pgbackrest_conf(spec: dict[str, Any]) -> Path:
    return Path(spec["pgbackrest_dir"]) / "pgbackrest.conf"


def _pgbackrest_argv(spec: dict[str, Any], *args: str) -> list[str]:
    config = f"--config={_pgbackrest_conf(spec)}"
    return [str(PGBACKREST), config, f"--stanza={spec['name']}", *args]


def _archive_settings(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "archive_mode": "on",
        "archive_command": quote_argv(_pgbackrest_argv(spec, "archive-push")) + " %p",
        "archive_timeout": f"{ARCHIVE_TIMEOUT_S}s",
        # New segments, not recycled ones: the rest of a segment switched by archive_timeout is
        # then zeros, which the repository stores in a few kilobytes instead of 16 MB of old WAL.
        "wal_recycle": "off",
        # As production runs: a point-in-time restore of one database (pgbackrest restore
        # --db-include) leaves the others' files zeroed, and replaying WAL onto them needs the
        # full-page images this writes after each checkpoint.
        "full_page_writes": "on",
    }


def _write_pgbackrest_conf(spec: dict[str, Any], socket_dir: Path) -> None:
    """The stanza's configuration: the repository, logs, locks and spool in the server's
    directory, and how pgBackRest reaches the cluster (its socket, as the admin role). No
    password anywhere: the clusters trust their own socket. Rewritten when the port changes."""
    base = Path(spec["pgbackrest_dir"])
    paths = {sub: base / sub for sub in ("repo", "log", "lock", "spool")}
    for path in (base, *paths.values()):
        path.mkdir(mode=0o700, exist_ok=True)
    options = {
        "global": {
            "repo1-path": paths["repo"],
            "repo1-retention-full": 2,
            "log-path": paths["log"],
            "lock-path": paths["lock"],
            "spool-path": paths["spool"],
            "log-level-console": "warn",
            "log-level-file": "info",
            "compress-type": "lz4",
            # Small files bundled into larger ones: a new cluster's ~1,600 files otherwise cost a
            # repository file (and an fsync) each, which doubles the first backup's time.
            "repo1-bundle": "y",
            # Checkpoint at once when a backup starts, rather than spread over minutes.
            "start-fast": "y",
        },
        spec["name"]: {
            "pg1-path": spec["data_path"],
            "pg1-port": spec["port"],
            "pg1-socket-path": socket_dir,
            "pg1-user": ADMIN_ROLE,
        },
    }
    text = "# Written by dbops sandbox; sandbox only, never for production.\n"
    for section, values in options.items():
        text += f"\n[{section}]\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    conf = _pgbackrest_conf(spec)
    conf.write_text(text, encoding="utf-8")
    conf.chmod(0o600)
    _chown_postgres(base)


def _first_base_backup(spec: dict[str, Any]) -> None:
    """stanza-create, then a full backup: the start of the server's recovery window."""
    runner = _pg_runner(spec["name"])
    runner.run(_pgbackrest_argv(spec, "stanza-create")).check()
    runner.run(_pgbackrest_argv(spec, "--type=full", "backup"), timeout=300).check()
    spec["first_base_backup_at"] = _utc_now().isoformat()


def _cluster_running(spec: dict[str, Any]) -> bool:
    result = _pg_runner().run([f"{spec['pg_bin']}/pg_ctl", "-D", spec["data_path"], "status"])
    return result.exit_code == 0


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _start_cluster(spec: dict[str, Any], taken: set[int], socket_dir: Path) -> None:
    """pg_ctl start; a port another process grabbed since we picked it gets a fresh one."""
    conf = Path(spec["data_path"]) / "sandbox.conf"
    for _attempt in range(3):
        result = _pg_runner(spec["name"]).run(_pg_ctl(spec, "start"))
        if result.ok:
            return
        if "already in use" not in _log_tail(spec["log_path"], 20):
            break
        spec["port"] = _free_port(taken)
        conf.write_text(_cluster_conf(spec, socket_dir), encoding="utf-8")
        _chown_postgres(conf)
        if spec.get("pgbackrest_dir"):
            _write_pgbackrest_conf(spec, socket_dir)
    raise DbopsError(
        f"sandbox: PostgreSQL {spec['name']} did not start: "
        f"{_log_tail(spec['log_path'], 3) or result.stderr.strip()}"
    )


def _init_cluster(spec: dict[str, Any], taken: set[int], socket_dir: Path) -> None:
    base = Path(spec["data_path"]).parent
    base.mkdir(parents=True)
    # The customers' dumps go here: the postgres user's alone, as on a real server.
    Path(spec["backup_path"]).mkdir(mode=0o700)
    _chown_postgres(base)
    _pg_runner(spec["name"]).run(
        [f"{spec['pg_bin']}/initdb", "-D", spec["data_path"], "-U", ADMIN_ROLE, "--auth=trust",
         "-E", "UTF8", "--locale=C", "--no-sync",
         # 14 added --no-instructions; 13's initdb refuses it.
         *(["--no-instructions"] if pgbins.major_of(spec["pg_bin"]) >= 14 else [])],
    ).check()  # fmt: skip
    data = Path(spec["data_path"])
    # Loopback only, and only in the sandbox, is trusted without a password.
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8"
    )
    (data / "sandbox.conf").write_text(_cluster_conf(spec, socket_dir), encoding="utf-8")
    with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write("\ninclude 'sandbox.conf'\n")
    _chown_postgres(data / "pg_hba.conf", data / "sandbox.conf")
    if spec.get("pgbackrest_dir"):
        _write_pgbackrest_conf(spec, socket_dir)
    _start_cluster(spec, taken, socket_dir)


def _seed_customer(spec: dict[str, Any], customer: dict[str, Any], index: int) -> None:
    name = customer["name"]
    ident = sql.Identifier(name)
    with _admin(spec) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(ident, ident))
        conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(ident))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
                ident, ident, sql.Identifier(MONITOR_ROLE)
            )
        )
    accounts = 100 + 10 * (index % 10)
    conninfo = _admin_conninfo(spec, dbname=name, user=name)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " email text NOT NULL UNIQUE, created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " account_id bigint NOT NULL REFERENCES accounts,"
            " total_cents integer NOT NULL CHECK (total_cents >= 0),"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO accounts (email, created_at) SELECT 'user' || g || '@example.com',"
            " now() - g * interval '3 hours' FROM generate_series(1, %s) AS g",
            (accounts,),
        )
        conn.execute(
            "INSERT INTO orders (account_id, total_cents, created_at)"
            " SELECT 1 + g %% %s, (g * 3709) %% 20000, now() - g * interval '47 minutes'"
            " FROM generate_series(1, %s) AS g",
            (accounts, accounts * 3),
        )
        # A live server's tables have a vacuum on record (autovacuum's, or the load's); freshly
        # seeded ones have none, and last_vacuum would be unknown on a new sandbox.
        conn.execute("VACUUM ANALYZE accounts, orders")


def _build_server(
    spec: dict[str, Any],
    customers: list[tuple[int, dict[str, Any]]],
    taken: set[int],
    socket_dir: Path,
) -> None:
    _init_cluster(spec, taken, socket_dir)
    monitor = sql.Identifier(MONITOR_ROLE)
    with _admin(spec) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(monitor))
        conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(monitor))
        conn.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(monitor))
    server = _server_config(spec, ssh=False)
    runner = _pg_runner(spec["name"])
    for index, customer in customers:
        _seed_customer(spec, customer, index)
        write_backup(runner, server, customer["name"], customer["database"])
    if spec.get("pgbackrest_dir"):
        _first_base_backup(spec)
    _write_pgbouncer_files(spec, [c for _, c in customers])
    _start_pgbouncer(spec, taken)


# --- pgBouncer ---------------------------------------------------------------------------------


def _pgbouncer_paths(spec: dict[str, Any]) -> dict[str, Path]:
    base = Path(spec["pgbouncer_dir"])
    return {
        "ini": base / "pgbouncer.ini",
        "hba": base / "pgbouncer_hba.conf",
        "users": base / "userlist.txt",
        "pid": base / "pgbouncer.pid",
        "log": base / "pgbouncer.log",
    }


def _write_pgbouncer_files(spec: dict[str, Any], customers: list[dict[str, Any]]) -> None:
    """pgbouncer.ini with every customer database in [databases] (as provisioning writes an
    entry), its auth_file and an HBA file. Written once: provisioning edits them afterwards."""
    paths = _pgbouncer_paths(spec)
    Path(spec["pgbouncer_dir"]).mkdir(mode=0o700)
    entries = "".join(
        f"{c['database']} = host=127.0.0.1 port={spec['port']} dbname={c['database']}\n"
        for c in customers
    )
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": spec["pgbouncer_port"],
        "unix_socket_dir": "",  # TCP only: no socket left in /tmp
        "auth_type": "hba",
        "auth_hba_file": paths["hba"],
        "auth_file": paths["users"],
        "admin_users": ADMIN_ROLE,
        "stats_users": MONITOR_ROLE,
        "pool_mode": "session",
        "default_pool_size": PGBOUNCER_POOL_SIZE,
        "pidfile": paths["pid"],
        "logfile": paths["log"],
    }
    paths["ini"].write_text(
        ";; Written by dbops sandbox; sandbox only, never for production.\n"
        f"[databases]\n{entries}\n[pgbouncer]\n"
        + "".join(f"{key} = {value}\n" for key, value in settings.items()),
        encoding="utf-8",
    )
    # The console for the monitoring and admin roles, and the customers seeded here, without a
    # password, as the clusters trust loopback; everyone else (the customers provisioning adds)
    # with the SCRAM secret provisioning writes to the auth_file. "trust" still wants the user
    # listed in the auth_file.
    seeded = [c["role"] for c in customers]
    hba = f"host pgbouncer {MONITOR_ROLE},{ADMIN_ROLE} 127.0.0.1/32 trust\n"
    if seeded:
        hba += f"host all {','.join(seeded)} 127.0.0.1/32 trust\n"
    hba += "host all all 127.0.0.1/32 scram-sha-256\n"
    paths["hba"].write_text(hba, encoding="utf-8")
    paths["users"].write_text(
        "".join(f'"{user}" ""\n' for user in (MONITOR_ROLE, ADMIN_ROLE, *seeded)),
        encoding="utf-8",
    )
    for path in (paths["ini"], paths["hba"], paths["users"]):
        path.chmod(0o600)
    _chown_postgres(Path(spec["pgbouncer_dir"]))


def _pgbouncer_pid(spec: dict[str, Any]) -> int | None:
    try:
        pid = int(_pgbouncer_paths(spec)["pid"].read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _cmdline_has(pid, spec["pgbouncer_dir"]) else None


def _pgbouncer_up(spec: dict[str, Any]) -> bool:
    return _pgbouncer_pid(spec) is not None and _port_open(spec["pgbouncer_port"])


def _log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _start_pgbouncer(spec: dict[str, Any], taken: set[int] | None) -> None:
    """Start the server's pgBouncer as the cluster's user; with ``taken``, a port another
    process grabbed since we picked it gets a fresh one (and the ini says so)."""
    if not spec.get("pgbouncer_dir") or _pgbouncer_pid(spec) is not None:
        return
    if not PGBOUNCER.exists():
        raise DbopsError(
            f"sandbox: {PGBOUNCER} is missing.", hint="Install it: apt-get install pgbouncer."
        )
    paths = _pgbouncer_paths(spec)
    # A pid file whose process is gone (killed, or not ours): pgBouncer refuses to start over a
    # live one, and ours was checked above.
    paths["pid"].unlink(missing_ok=True)
    detail = ""
    for _attempt in range(3):
        offset = paths["log"].stat().st_size if paths["log"].exists() else 0
        result = _pg_runner(spec["name"]).run([str(PGBOUNCER), "-d", str(paths["ini"])])
        if result.ok:
            # -d forks before it listens: wait until it listens, or says why it cannot.
            def settled(at: int = offset) -> bool:
                return _pgbouncer_up(spec) or "FATAL" in _log_since(paths["log"], at)

            with contextlib.suppress(DbopsError):
                _wait_for(f"pgbouncer of {spec['name']}", settled, 10)
            if _pgbouncer_up(spec):
                return
        detail = (_log_since(paths["log"], offset) or result.stderr).strip()
        if taken is None or "Address already in use" not in detail:
            break
        spec["pgbouncer_port"] = _free_port(taken)
        text = paths["ini"].read_text(encoding="utf-8")
        paths["ini"].write_text(
            re.sub(r"(?m)^listen_port\s*=.*$", f"listen_port = {spec['pgbouncer_port']}", text),
            encoding="utf-8",
        )
    last = detail.splitlines()[-2:] if detail else ["no answer"]
    raise DbopsError(f"sandbox: pgbouncer for {spec['name']} did not start: {' '.join(last)}")


def _stop_pgbouncer(spec: dict[str, Any]) -> None:
    pid = _pgbouncer_pid(spec)
    if pid is None:
        return
    _signal(pid, signal.SIGTERM)  # pgBouncer's immediate shutdown
    with contextlib.suppress(DbopsError):
        _wait_for("pgbouncer to exit", lambda: not _alive(pid), 5)
    _signal(pid, signal.SIGKILL)


# --- sshd --------------------------------------------------------------------------------------


def _ssh_keygen(path: Path, comment: str) -> None:
    LocalRunner("sandbox").run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
    ).check()


def _sshd_config(spec: dict[str, Any], authorized_keys: Path) -> str:
    base = Path(spec["sshd_dir"])
    options = [
        ("ListenAddress", "127.0.0.1"),
        ("Port", str(spec["ssh_port"])),
        ("HostKey", str(base / "ssh_host_ed25519_key")),
        ("PidFile", str(base / "sshd.pid")),
        ("AuthorizedKeysFile", str(authorized_keys)),
        ("PubkeyAuthentication", "yes"),
        ("PasswordAuthentication", "no"),
        ("KbdInteractiveAuthentication", "no"),
        ("PermitRootLogin", "prohibit-password"),
        ("AllowUsers", getpass.getuser()),
        # PAM's session modules (loginuid, motd) fail or dawdle in containers; keys suffice here.
        ("UsePAM", "no"),
        # The sandbox directory may sit under a group-writable parent such as /tmp.
        ("StrictModes", "no"),
        ("PrintMotd", "no"),
        ("PrintLastLog", "no"),
        ("MaxStartups", "50:30:100"),
        ("LogLevel", "ERROR"),
    ]
    # Sessions start in a home of the sandbox's own: bash sources ~/.bashrc for every command
    # sshd runs, and a developer's (pyenv init, nvm, ...) costs ~150 ms a command, which a
    # sweep pays for every check. A real server's user has its own; the sandbox's has none.
    env = [("HOME", str(_session_home(spec))), *_moved_clock_env()]
    options.append(("SetEnv", " ".join(f'"{key}={value}"' for key, value in env)))
    return "".join(f"{key} {value}\n" for key, value in options)


def _session_home(spec: dict[str, Any]) -> Path:
    """The (empty) home directory of the sandbox's SSH sessions."""
    return Path(spec["sshd_dir"]) / "home"


def _moved_clock_env() -> list[tuple[str, str]]:
    """libfaketime's variables when the sandbox runs under it (``make test-later``), else none.

    The clusters and pgBouncers inherit them from us; sshd gives its sessions a fresh
    environment, so without these a command sent over SSH (a restart, a dump) would run on the
    real clock while everything else runs on the moved one.
    """
    if "libfaketime" not in os.environ.get("LD_PRELOAD", ""):
        return []
    return sorted(
        (key, value)
        for key, value in os.environ.items()
        if (key == "LD_PRELOAD" or key.startswith("FAKETIME")) and '"' not in value
    )


def _sshd_pid(spec: dict[str, Any]) -> int | None:
    try:
        pid = int((Path(spec["sshd_dir"]) / "sshd.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _cmdline_has(pid, spec["sshd_dir"]) else None


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _start_sshd(spec: dict[str, Any], taken: set[int], authorized_keys: Path) -> None:
    if _sshd_pid(spec) is not None:
        return
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's privsep directory
    base = Path(spec["sshd_dir"])
    config, log = base / "sshd_config", base / "sshd.log"
    result: CommandResult | None = None
    _session_home(spec).mkdir(mode=0o700, exist_ok=True)
    for _attempt in range(3):
        config.write_text(_sshd_config(spec, authorized_keys), encoding="utf-8")
        runner = LocalRunner("sandbox")
        runner.run([str(SSHD), "-t", "-f", str(config)]).check()
        # sshd re-executes itself, so it must be started by absolute path; it forks into the
        # background once it is listening, so a zero exit means the port is bound.
        result = runner.run([str(SSHD), "-f", str(config), "-E", str(log)])
        if result.ok:
            _wait_for(f"sshd of {spec['name']}", lambda: _sshd_pid(spec) is not None, 10)
            _wait_for(f"sshd of {spec['name']} to listen", lambda: _port_open(spec["ssh_port"]), 10)
            return
        if "Address already in use" not in _log_tail(str(log), 5):
            break
        spec["ssh_port"] = _free_port(taken)
    detail = _log_tail(str(log), 2) or (result.stderr.strip() if result else "")
    raise DbopsError(f"sandbox: sshd for {spec['name']} did not start: {detail}")


def _stop_sshd(spec: dict[str, Any]) -> None:
    pid = _sshd_pid(spec)
    if pid is None:
        return
    _continue_tree(pid)  # an ssh-hang not healed (down --remove) would ignore the TERM
    _signal(pid, signal.SIGTERM)
    with contextlib.suppress(DbopsError):
        _wait_for("sshd to exit", lambda: not _alive(pid), 5)
    _signal(pid, signal.SIGKILL)


def _break_ssh_hang(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    """The server's SSH stops answering, connections already open included: its sshd and every
    process under it (one per connection, and their commands) are stopped with SIGSTOP. The
    kernel still completes new TCP connects into the listen backlog, so a client connects and
    then hears nothing (no banner), and a command sent on an open connection gets no reply."""
    if not spec.get("sshd_dir"):
        raise DbopsError(f"{target} has no sshd: the sandbox was made without --ssh.")
    master = _sshd_pid(spec)
    if master is None:
        raise DbopsError(f"the sshd of {target} is not running.")
    stopped = [master]
    _signal(master, signal.SIGSTOP)  # first, so it forks no new connection process meanwhile
    for _round in range(5):  # a connection process may be forking its session right now
        more = [pid for pid in _descendants(master) if pid not in stopped]
        if not more:
            break
        for pid in more:
            _signal(pid, signal.SIGSTOP)
        stopped += more
    return {"stopped": stopped}


def _heal_ssh_hang(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    # SIGCONT is harmless to a process that is running, so no care for reused pids is needed.
    for pid in fault.get("stopped", []):
        _signal(pid, signal.SIGCONT)
    master = _sshd_pid(spec)
    if master is not None:
        _continue_tree(master)


def _continue_tree(pid: int) -> None:
    for each in [pid, *_descendants(pid)]:
        _signal(each, signal.SIGCONT)


# --- processes ---------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid``, children before grandchildren (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(") ", 1)[-1].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(0), [])
        found += children
        todo += children
    return found


def _cmdline_has(pid: int, needle: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return needle.encode() in raw


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes; its parent just has not reaped it yet.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    return True


def _signal(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


# --- fleet file --------------------------------------------------------------------------------


def _server_config(spec: dict[str, Any], ssh: bool, client_key: Path | None = None) -> Server:
    run_as = _run_as()
    fields: dict[str, Any] = {
        "name": spec["name"],
        "host": "127.0.0.1",
        "transport": "ssh" if ssh else "local",
        "dsn": _admin_conninfo(spec, user=MONITOR_ROLE),
        "admin_dsn": _admin_conninfo(spec),
        "pg_bin": spec["pg_bin"],
        "data_path": spec["data_path"],
        "backup_path": spec["backup_path"],
        "log_path": spec["log_path"],
        "restart_command": quote_argv(_pg_ctl(spec, "restart", "-m", "fast")),
        "start_command": quote_argv(_pg_ctl(spec, "start")),
        "reload_command": quote_argv(
            [f"{spec['pg_bin']}/pg_ctl", "-D", spec["data_path"], "reload"]
        ),
        "run_as": run_as,
    }
    if spec.get("pgbackrest_dir"):
        fields.update(pgbackrest_config=str(_pgbackrest_conf(spec)), pgbackrest_stanza=spec["name"])
    if spec.get("pgbouncer_dir"):
        paths = _pgbouncer_paths(spec)
        fields.update(
            pgbouncer_ini=str(paths["ini"]),
            pgbouncer_port=spec["pgbouncer_port"],
            # SIGHUP, as Debian's `systemctl reload pgbouncer` sends it; no sudo needed here.
            pgbouncer_reload_command=quote_argv(
                ["sh", "-c", 'kill -HUP "$(cat -- "$1")"', "pgbouncer-reload", str(paths["pid"])]
            ),
        )
    if ssh:
        fields.update(
            ssh_user=getpass.getuser(), ssh_port=spec["ssh_port"], ssh_key=str(client_key)
        )
    return Server(**fields)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(str(value))


def _toml_table(header: str, values: dict[str, Any]) -> str:
    body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)
    return f"\n{header}\n{body}"


def _fleet_toml(servers: list[Server], known_hosts: Path | None) -> str:
    out = "# Sandbox fleet written by `dbops sandbox up`: loopback clusters that trust everyone.\n"
    if known_hosts is not None:
        out += f"known_hosts = {_toml_value(known_hosts)}\n"
    keys = [
        "name",
        "host",
        "transport",
        "ssh_user",
        "ssh_port",
        "ssh_key",
        "dsn",
        "admin_dsn",
        "pg_bin",
        "data_path",
        "backup_path",
        "log_path",
        "restart_command",
        "start_command",
        "reload_command",
        "pgbouncer_ini",
        "pgbouncer_port",
        "pgbouncer_reload_command",
        "run_as",
        "pgbackrest_config",
        "pgbackrest_stanza",
    ]
    for server in servers:
        dumped = server.model_dump()
        if server.transport == "local":
            dumped = {k: v for k, v in dumped.items() if not k.startswith("ssh_")}
        if not server.pgbouncer_ini:
            dumped = {k: v for k, v in dumped.items() if not k.startswith("pgbouncer_")}
        out += _toml_table("[[servers]]", {k: dumped.get(k) for k in keys})
    for plan, values in PLANS.items():
        out += _toml_table(f"[plans.{plan}]", values)
    out += _toml_table(
        "[oncall]",
        {"primary": "U_ALICE", "secondary": "U_CAROL", "escalation_channel": "#db-escalations"},
    )
    out += _toml_table("[escalation]", {"ack_timeout": "5m", "channel_after": "15m", "repeat": 3})
    out += _toml_table("[backups]", {"keep_daily": 7, "keep_weekly": 4})
    out += _toml_table("[business]", DEMO_BUSINESS)
    return out


# --- up / down ---------------------------------------------------------------------------------


def up(
    dir: Path, servers: int = 3, customers: int = 15, ssh: bool = False,
    pg_bin: Path = DEFAULT_PG_BIN, pg_version: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Create and start a sandbox fleet in ``dir`` (or start the one already there).
    ``pg_version`` (13 to 18) picks that major's programs (core.pgbins) over ``pg_bin``."""
    if pg_version is not None:
        pg_bin = pgbins.server_bin(pg_version)
    closed = _closed_parent(Path(pg_bin))
    if closed is not None:
        raise DbopsError(
            f"the postgres user cannot run the programs in {pg_bin}: {closed} is closed to others.",
            hint="Unset DBOPS_PG_CACHE (root's cache is /var/cache/dbops/pg) and fetch again.",
        )
    if not 1 <= servers <= 20:
        raise DbopsError("a sandbox has 1 to 20 servers.")
    if not 1 <= customers <= 200:
        raise DbopsError("a sandbox has 1 to 200 customers.")
    directory = Path(dir).expanduser().resolve()
    with _locked(directory, create=True):
        if (directory / STATE_FILE).exists():
            if (directory / FLEET_FILE).exists():
                had = {s["pg_bin"] for s in load_state(directory)["servers"]}
                if pg_version is not None and had != {str(pg_bin)}:
                    raise DbopsError(
                        f"{directory} already holds a sandbox running {', '.join(sorted(had))}.",
                        hint="Reuse it without --pg-version, or bring one up in another dir.",
                    )
                return _restart(directory, servers, customers, ssh)
            # An `up` that was killed half-way (the fleet file is written last): start over.
            _teardown(directory, remove_contents=True)
        leftovers = [p.name for p in directory.iterdir() if p.name != ".lock"]
        if leftovers:
            raise DbopsError(
                f"{directory} is not empty and holds no sandbox.",
                hint="Choose a new or empty directory.",
            )
        socket_dir = directory / "run"
        if len(str(socket_dir / ".s.PGSQL.65535.lock")) > 100:
            raise DbopsError(
                f"{directory} is too long a path for PostgreSQL's unix sockets.",
                hint="Use a shorter directory, such as /tmp/dbops-sandbox.",
            )
        _check_reachable_by_postgres(directory)
        directory.chmod(0o755)
        try:
            return _create(directory, servers, customers, ssh, pg_bin)
        except BaseException:
            _teardown(directory, remove_contents=True)
            raise


# The newest PostgreSQL major each pgBackRest release reads (its release notes); bookworm's
# 2.45 stops at 15 (stanza-create on 16 fails: "are all available clusters in recovery?").
_PGBACKREST_MAJORS = (((2, 56), 18), ((2, 53), 17), ((2, 46), 16))


def _pgbackrest_newest_major() -> int:
    out = subprocess.run(
        [str(PGBACKREST), "version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    match = re.search(r"(\d+)\.(\d+)", out)
    release = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return next((major for since, major in _PGBACKREST_MAJORS if release >= since), 15)


def _create(
    directory: Path, servers: int, customers: int, ssh: bool, pg_bin: Path
) -> dict[str, Any]:
    if not PGBACKREST.exists():
        raise DbopsError(
            f"sandbox: {PGBACKREST} is missing (WAL archiving).",
            hint="Install it: apt-get install pgbackrest (or `make system-deps` as root).",
        )
    # A major newer than the installed pgBackRest knows runs without WAL archiving (no
    # point-in-time recovery on it); its stanza-create would fail.
    archiving = pgbins.major_of(pg_bin) <= _pgbackrest_newest_major()
    taken: set[int] = set()
    socket_dir = directory / "run"
    socket_dir.mkdir()
    _chown_postgres(socket_dir)
    specs = []
    for number in range(1, servers + 1):
        name = f"vps{number}"
        base = directory / name
        spec: dict[str, Any] = {
            "name": name,
            "port": _free_port(taken),
            "pg_bin": str(pg_bin),
            "data_path": str(base / "data"),
            "backup_path": str(base / "backups"),
            "log_path": str(base / "postgresql.log"),
            "pgbouncer_port": _free_port(taken),
            "pgbouncer_dir": str(base / "pgbouncer"),
        }
        if archiving:
            spec["pgbackrest_dir"] = str(base / "pgbackrest")
        if ssh:
            spec["ssh_port"] = _free_port(taken)
            spec["sshd_dir"] = str(base / "sshd")
        specs.append(spec)
    people = []
    for index, name in enumerate(_customer_names(customers)):
        people.append(
            {
                "name": name,
                "server": specs[index % servers]["name"],
                "database": name,
                "role": name,
                "plan": _PLAN_CYCLE[index % len(_PLAN_CYCLE)],
                "email": f"ops@{name.replace('_', '-')}.example.com",
            }
        )
    # Written first so that a failed `up` can still be torn down by what it records.
    state: dict[str, Any] = {
        "dir": str(directory),
        "fleet": str(directory / FLEET_FILE),
        "ssh": ssh,
        "servers": specs,
        "customers": people,
        "faults": [],
    }
    _save_state(directory, state)

    def build(spec: dict[str, Any]) -> None:
        mine = [(i, c) for i, c in enumerate(people) if c["server"] == spec["name"]]
        _build_server(spec, mine, taken, socket_dir)

    with ThreadPoolExecutor(max_workers=min(servers, 4)) as pool:
        for future in [pool.submit(build, spec) for spec in specs]:
            future.result()

    if ssh:
        keys = directory / "ssh"
        keys.mkdir(mode=0o700)
        client_key = keys / "id_ed25519"
        _ssh_keygen(client_key, "dbops-sandbox")
        authorized = keys / "authorized_keys"
        authorized.write_text(client_key.with_suffix(".pub").read_text(encoding="utf-8"))
        for spec in specs:
            Path(spec["sshd_dir"]).mkdir(mode=0o700)
            _ssh_keygen(Path(spec["sshd_dir"]) / "ssh_host_ed25519_key", spec["name"])
            _start_sshd(spec, taken, authorized)
    _write_fleet(directory, state)
    _save_state(directory, state)
    return state


def _write_fleet(directory: Path, state: dict[str, Any]) -> None:
    """fleet.toml (and known_hosts) from the state; rewritten whenever a port changes."""
    known_hosts: Path | None = None
    client_key: Path | None = None
    if state["ssh"]:
        client_key = directory / "ssh" / "id_ed25519"
        known_hosts = directory / "known_hosts"
        lines = []
        for spec in state["servers"]:
            public = Path(spec["sshd_dir"]) / "ssh_host_ed25519_key.pub"
            kind, blob = public.read_text(encoding="utf-8").split()[:2]
            lines.append(f"[127.0.0.1]:{spec['ssh_port']} {kind} {blob}\n")
        _atomic_write(known_hosts, "".join(lines))
    configs = [_server_config(spec, state["ssh"], client_key) for spec in state["servers"]]
    _atomic_write(directory / FLEET_FILE, _fleet_toml(configs, known_hosts))
    load_fleet(directory / FLEET_FILE)  # what we wrote must be what the bot accepts


def _restart(directory: Path, servers: int, customers: int, ssh: bool) -> dict[str, Any]:
    state = load_state(directory)
    shape = (len(state["servers"]), len(state["customers"]), bool(state["ssh"]))
    if shape != (servers, customers, ssh):
        raise DbopsError(
            f"{directory} already holds a sandbox with {shape[0]} servers, {shape[1]} customers"
            f" and ssh={'on' if shape[2] else 'off'}.",
            hint="Reuse it as it is, or run `dbops sandbox down --dir` on it and use another dir.",
        )
    taken = {
        s.get(key, 0) for s in state["servers"] for key in ("port", "ssh_port", "pgbouncer_port")
    }
    for spec in state["servers"]:
        if not _cluster_running(spec) and not _broken(state, "server-down", spec["name"]):
            _start_cluster(spec, taken, directory / "run")
        if not _broken(state, "pgbouncer-down", spec["name"]):
            _start_pgbouncer(spec, taken)
        if state["ssh"]:
            _start_sshd(spec, taken, directory / "ssh" / "authorized_keys")
    _write_fleet(directory, state)
    _save_state(directory, state)
    return state


def down(dir: Path, remove: bool = False) -> dict[str, Any]:
    """Heal what is broken, stop every sshd and cluster; with ``remove``, delete the directory."""
    directory = Path(dir).expanduser().resolve()
    with _locked(directory):
        state = load_state(directory)
        if not remove:
            with contextlib.suppress(DbopsError):
                _heal(directory, state)
        _teardown(directory, remove_contents=False)
    if remove:
        shutil.rmtree(directory, ignore_errors=True)
    return state


def _teardown(directory: Path, remove_contents: bool) -> None:
    """Stop whatever the sandbox in ``directory`` started; used by down and by a failed up."""
    try:
        state = load_state(directory)
    except DbopsError:
        state = {"servers": [], "faults": []}
    for fault in state.get("faults", []):
        if fault.get("pid"):
            _stop_helper(int(fault["pid"]), graceful=False)
        if fault.get("fault") == "disk-full":
            with contextlib.suppress(Exception):
                _release_disk_full(fault)

    def stop(spec: dict[str, Any]) -> None:
        if spec.get("sshd_dir"):
            _stop_sshd(spec)
        if spec.get("pgbouncer_dir"):
            _stop_pgbouncer(spec)
        if Path(spec["data_path"], "postmaster.pid").exists():
            stopped = _pg_runner(spec["name"]).run(_pg_ctl(spec, "stop", "-m", "fast"))
            if not stopped.ok:
                _pg_runner(spec["name"]).run(_pg_ctl(spec, "stop", "-m", "immediate"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(stop, state.get("servers", [])))
    if remove_contents:
        for path in directory.iterdir():
            if path.name != ".lock":
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


# --- faults ------------------------------------------------------------------------------------

_Breaker = Callable[[Path, dict[str, Any], dict[str, Any], str], dict[str, Any]]
_Healer = Callable[[Path, dict[str, Any], dict[str, Any], dict[str, Any]], None]


def _server(state: dict[str, Any], name: str) -> dict[str, Any]:
    for spec in state["servers"]:
        if spec["name"] == name:
            return dict(spec)
    raise DbopsError(f"no server {name!r} in the sandbox.")


def _customer(state: dict[str, Any], name: str) -> dict[str, Any]:
    for entry in state["customers"]:
        if entry["name"] == name:
            return dict(entry)
    raise DbopsError(f"no customer {name!r} in the sandbox.")


def _broken(state: dict[str, Any], fault: str, target: str) -> bool:
    return any(f["fault"] == fault and f["target"] == target for f in state["faults"])


def _validate_fault(state: dict[str, Any], fault: str, target: str) -> str:
    """The server the fault hits; a DbopsError listing the valid choices otherwise."""
    if fault not in FAULTS:
        raise DbopsError(f"unknown fault {fault!r}.", hint=f"Valid faults: {', '.join(FAULTS)}.")
    kind = FAULTS[fault]
    names = [entry["name"] for entry in state["customers" if kind == "customer" else "servers"]]
    valid = f"{fault} takes a {kind}: {', '.join(names)}."
    if kind == "customer":
        validate_name(target)
    else:
        validate_server_name(target)
    if target not in names:
        raise DbopsError(f"no {kind} {target!r} in the sandbox.", hint=valid)
    return str(_customer(state, target)["server"]) if kind == "customer" else target


# Faults that can be broken while the server's cluster is down.
_WITHOUT_CLUSTER = ("server-down", "backup-missing", "pgbouncer-down", "disk-full")


def break_fault(dir: Path, fault: str, target: str) -> dict[str, Any]:
    """Break ``target`` (a customer or a server, as the fault needs) in the way ``fault`` names.

    Breaking what is already broken is a no-op. Returns the fault as recorded for heal.
    """
    directory = Path(dir).expanduser().resolve()
    with _locked(directory):
        state = load_state(directory)
        server = _validate_fault(state, fault, target)
        for existing in state["faults"]:
            if existing["fault"] == fault and existing["target"] == target:
                return dict(existing)
        spec = _server(state, server)
        if fault not in _WITHOUT_CLUSTER and not _cluster_running(spec):
            raise DbopsError(
                f"{server} is down in the sandbox; heal it before breaking {target} again."
            )
        record: dict[str, Any] = {"fault": fault, "target": target, "server": server}
        record.update(_BREAKERS[fault](directory, state, spec, target))
        state["faults"].append(record)
        _save_state(directory, state)
        return record


def heal(dir: Path) -> list[dict[str, Any]]:
    """Undo every fault currently broken; healing a healthy sandbox does nothing."""
    directory = Path(dir).expanduser().resolve()
    with _locked(directory):
        return _heal(directory, load_state(directory))


def _heal(directory: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    # A stopped server first: the other undos need it running. Then the rest, newest first.
    faults = list(state["faults"])
    order = [f for f in faults if f["fault"] == "server-down"]
    order += [f for f in reversed(faults) if f["fault"] != "server-down"]
    healed = []
    for fault in order:
        spec = _server(state, fault["server"])
        _HEALERS[fault["fault"]](directory, state, spec, fault)
        state["faults"].remove(fault)
        _save_state(directory, state)
        healed.append(fault)
    # Faults leave ERROR/FATAL lines behind (a down database refuses every check): rotate the
    # logs they touched so a healed sandbox reads as clean as a new one.
    for server in sorted({f["server"] for f in healed}):
        _rotate_log(_server(state, server))
    return healed


def _rotate_log(spec: dict[str, Any]) -> None:
    log = Path(spec["log_path"])
    if not log.exists():
        return
    # copytruncate, as logrotate does it: PostgreSQL appends to the file it already has open.
    with open(log, "rb") as src, open(log.with_name(log.name + ".1"), "ab") as dst:
        shutil.copyfileobj(src, dst)
    os.truncate(log, 0)


def _break_db_down(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    database = _customer(state, target)["database"]
    with _admin(spec) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(database))
        )
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        )
    return {}


def _heal_db_down(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    database = _customer(state, fault["target"])["database"]
    with _admin(spec) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(database))
        )


def _break_server_down(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    if _cluster_running(spec):
        _pg_runner(spec["name"]).run(_pg_ctl(spec, "stop", "-m", "fast")).check()
    # pg_ctl returns once postmaster.pid is gone; make sure nothing answers on the port either,
    # so "server down" means connections are refused, not accepted and dropped.
    _wait_for(
        f"{spec['name']}'s port {spec['port']} to close",
        lambda: not _port_open(spec["port"]),
        timeout=10,
    )
    return {}


def _heal_server_down(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    if not _cluster_running(spec):
        _pg_runner(spec["name"]).run(_pg_ctl(spec, "start")).check()


def _break_log_errors(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    marker = f"dbops_sandbox_{int(time.time() * 1000)}"
    with _admin(spec) as conn:
        for statement in ("SELECT 1/0", f"SELECT * FROM {marker}_missing_table"):
            with contextlib.suppress(psycopg.Error):
                conn.execute(statement)
    for user, dbname in ((ADMIN_ROLE, f"{marker}_nodb"), (f"{marker}_norole", "postgres")):
        conninfo = _admin_conninfo(spec, dbname=dbname, user=user)
        with contextlib.suppress(psycopg.Error), psycopg.connect(conninfo, connect_timeout=5):
            pass
    _wait_for(
        f"errors in {spec['name']}'s log",
        lambda: _log_tail(spec["log_path"], 200).count(marker) >= 3,
        5,
    )
    return {}


def _heal_nothing(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    """The log rotation every heal ends with is the whole cure."""


def _break_backup_missing(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    root = Path(spec["backup_path"]) / target
    moved = []
    for status in sorted(root.glob("*/status")):
        hidden = status.with_name("status.sandbox-hidden")
        status.rename(hidden)
        moved.append(str(hidden))
    if not moved:
        raise DbopsError(f"{target} has no complete backup in the sandbox to hide.")
    return {"moved": moved}


def _heal_backup_missing(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    for hidden in fault.get("moved", []):
        path = Path(hidden)
        if path.exists():
            path.rename(path.with_name("status"))


def _break_pgbouncer_down(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    if not spec.get("pgbouncer_dir"):
        raise DbopsError(
            f"{spec['name']} has no pgBouncer in this sandbox (made before sandboxes had one).",
            hint="Run `dbops sandbox down` and `up` in a new directory.",
        )
    _stop_pgbouncer(spec)
    _wait_for(
        f"{spec['name']}'s pgbouncer port {spec['pgbouncer_port']} to close",
        lambda: not _port_open(spec["pgbouncer_port"]),
        timeout=10,
    )
    return {}


def _heal_pgbouncer_down(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    # On its own port again: the fleet file (and whoever loaded it) points there.
    _start_pgbouncer(spec, None)


def _helper_breaker(mode: str) -> _Breaker:
    def breaker(
        directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
    ) -> dict[str, Any]:
        hold: dict[str, Any] = {"mode": mode}
        if mode == "connections":
            with _admin(spec) as conn:
                row = conn.execute(
                    "SELECT current_setting('max_connections')::int, count(*) - 1"
                    " FROM pg_stat_activity WHERE backend_type = 'client backend'"
                ).fetchone()
            limit, others = (int(row[0]), int(row[1])) if row else (MAX_CONNECTIONS, 0)
            hold["conninfo"] = _admin_conninfo(spec)
            hold["count"] = max(math.ceil(CONNECTIONS_FAULT_SHARE * limit) - others, 0)
        else:
            hold["conninfo"] = customer_conninfo(state, target)
            hold["table"] = "accounts"
        pid = _start_helper(directory, f"{mode}-{target}", hold)
        if mode != "connections":
            database = _customer(state, target)["database"]
            try:
                _wait_for(
                    f"the {mode} fault on {target}",
                    lambda: _session_state_visible(spec, mode, database),
                    10,
                )
            except DbopsError:
                _stop_helper(pid, graceful=False)
                raise
        return {"pid": pid}

    return breaker


def _session_state_visible(spec: dict[str, Any], mode: str, database: str) -> bool:
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        " AND state = 'idle in transaction' AND application_name = %s"
        if mode == "idle-txn"
        else "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE d.datname = %s AND NOT l.granted AND a.application_name = %s"
    )
    with _admin(spec) as conn:
        row = conn.execute(query, (database, FAULT_APP)).fetchone()
    return bool(row and row[0] > 0)


def _start_helper(directory: Path, label: str, hold: dict[str, Any]) -> int:
    """Start a detached process that holds sessions open until heal sends it SIGTERM."""
    run = directory / "run"
    ready, log = run / f"fault-{label}.ready", run / f"fault-{label}.log"
    ready.unlink(missing_ok=True)
    package_root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
    }
    argv = [sys.executable, "-m", "core.sandbox", "hold", json.dumps({**hold, "ready": str(ready)})]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=directory,
        )
    try:
        _wait_for(f"the {label} helper", lambda: ready.exists() or proc.poll() is not None, 20)
    except DbopsError:
        _stop_helper(proc.pid, graceful=False)
        raise
    if proc.poll() is not None:
        raise DbopsError(f"sandbox: the {label} helper failed: {_log_tail(str(log), 1)}")
    return proc.pid


def _stop_helper(pid: int, graceful: bool) -> None:
    # The pid may have been reused since the state was written: only signal our own helper.
    if not _alive(pid) or not _cmdline_has(pid, "core.sandbox"):
        return
    if graceful:
        _signal(pid, signal.SIGTERM)
        with contextlib.suppress(DbopsError):
            _wait_for("the fault helper to exit", lambda: not _alive(pid), 10)
    _signal(pid, signal.SIGKILL, group=True)
    with contextlib.suppress(DbopsError):
        _wait_for("the fault helper to die", lambda: not _alive(pid), 5)


def _heal_helper(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    _stop_helper(int(fault["pid"]), graceful=True)
    if not _cluster_running(spec):
        return
    with _admin(spec) as conn:

        def gone() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (FAULT_APP,)
            ).fetchone()
            return row is not None and row[0] == 0

        _wait_for(f"the {fault['fault']} sessions on {spec['name']} to end", gone, 10)


def _break_hostile(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    """The customer turns hostile (core.hostile_tenant): what it plants runs as whoever calls
    it and tries to make the customer's role a superuser. The roles are noted first, so heal
    can take back anything it gained."""
    role = _customer(state, target)["role"]
    with _admin(spec) as conn:
        roles = hostile_tenant.snapshot_roles(conn)
    planted = hostile_tenant.plant(customer_conninfo(state, target), role, ADMIN_ROLE, MONITOR_ROLE)
    return {**planted.as_json(), "roles": roles}


def _heal_hostile(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    hostile_tenant.remove(customer_conninfo(state, fault["target"]), fault["databases"])
    with _admin(spec) as conn:
        hostile_tenant.restore_roles(conn, fault["roles"])


def _break_disk_full(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], target: str
) -> dict[str, Any]:
    """The server's backup path on a small filesystem of its own, full to the last byte: the
    path is moved aside (kept as it is, for heal), a tmpfs is mounted in its place with the
    same owner and mode, the backups are copied onto it, and a filler file takes the rest.
    df, pg_dump and everything else on the path meet a really full disk (ENOSPC).

    Mounting needs root (CAP_SYS_ADMIN); without it the fault is refused and nothing moves."""
    path = Path(spec["backup_path"])
    held = path.with_name(path.name + ".sandbox-disk-full")
    source = f"dbops-disk-full-{spec['name']}"
    filler = path / DISK_FULL_FILLER
    if os.path.ismount(path) or held.exists():
        raise DbopsError(
            f"{path} is already a mount point, or {held} is left over from an earlier disk-full.",
            hint="Run `dbops sandbox heal`, or unmount it and move it back by hand.",
        )
    st = path.stat()
    size = DISK_FULL_BYTES + _tmpfs_bytes(path)
    path.rename(held)
    try:
        path.mkdir()
        os.chown(path, st.st_uid, st.st_gid)
        mounted = LocalRunner("sandbox").run(
            ["mount", "-t", "tmpfs", "-o",
             f"size={size},mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}",
             source, str(path)]
        )  # fmt: skip
        if not mounted.ok:
            detail = " ".join((mounted.stderr or mounted.stdout).split())[:200]
            raise DbopsError(
                f"sandbox: cannot mount a tmpfs for disk-full on {path} ({detail or 'no reason'}).",
                hint="disk-full needs root (CAP_SYS_ADMIN), as `mount` does.",
            )
        try:
            LocalRunner("sandbox").run(["cp", "-a", "--", f"{held}/.", f"{path}/"]).check()
            fill(filler)
        except BaseException:
            _unmount(path)
            raise
    except BaseException:
        if path.is_dir() and not os.path.ismount(path):
            shutil.rmtree(path)
        held.rename(path)
        raise
    return {"mount": str(path), "held": str(held), "source": source, "size_bytes": size,
            "filler": str(filler)}  # fmt: skip


def _tmpfs_bytes(root: Path) -> int:
    """What the files under ``root`` take on a tmpfs (whole pages)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += -(-os.lstat(os.path.join(dirpath, name)).st_size // _PAGE) * _PAGE
    return total


def fill(path: Path) -> int:
    """Append zeros to ``path`` until its filesystem has no byte left (ENOSPC); the bytes
    written. Used by disk-full, and by tests that fill a freed disk again."""
    written = 0
    chunk = bytes(1 << 16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                n = os.write(fd, chunk if written % len(chunk) == 0 else chunk[:_PAGE])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            if n == 0:
                break
            written += n
    finally:
        os.close(fd)
    return written


def _mount_source(path: Path) -> str | None:
    """What is mounted on ``path`` (the device column of /proc/mounts; the top one when
    mounts are stacked), or None."""
    found = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            # /proc/mounts escapes spaces and the like as octal; the sandbox's paths have none.
            if len(fields) > 1 and fields[1] == str(path):
                found = fields[0]
    return found


def _unmount(path: Path) -> None:
    runner = LocalRunner("sandbox")
    if not runner.run(["umount", "--", str(path)]).ok:
        # Something still has a file open there (a dump that hung): detach it now, the kernel
        # frees it when the last user lets go.
        runner.run(["umount", "-l", "--", str(path)]).check()


def _heal_disk_full(
    directory: Path, state: dict[str, Any], spec: dict[str, Any], fault: dict[str, Any]
) -> None:
    """The filler goes, and the path, back on the real disk, holds what the full disk held: the
    backups from before, and whatever was written while it was full (as on a disk that was
    freed). If the mount is already gone, the path gets back what it held before the fault."""
    path, held = Path(fault["mount"]), Path(fault["held"])
    if _mount_source(path) == fault["source"]:
        Path(fault["filler"]).unlink(missing_ok=True)
        staging = path.with_name(path.name + ".sandbox-healed")
        shutil.rmtree(staging, ignore_errors=True)
        LocalRunner("sandbox").run(["cp", "-a", "--", str(path), str(staging)]).check()
        _unmount(path)
        path.rmdir()
        staging.rename(path)
        shutil.rmtree(held, ignore_errors=True)
    elif held.exists():
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        held.rename(path)


def _release_disk_full(fault: dict[str, Any]) -> None:
    """For a sandbox going down with disk-full still broken: unmount, and put the original
    path back, so nothing stays mounted under a directory about to be removed."""
    path, held = Path(fault["mount"]), Path(fault["held"])
    if _mount_source(path) == fault.get("source"):
        _unmount(path)
    if held.exists():
        shutil.rmtree(path, ignore_errors=True)
        held.rename(path)


_BREAKERS: dict[str, _Breaker] = {
    "db-down": _break_db_down,
    "server-down": _break_server_down,
    "connections": _helper_breaker("connections"),
    "idle-txn": _helper_breaker("idle-txn"),
    "lock": _helper_breaker("lock"),
    "log-errors": _break_log_errors,
    "backup-missing": _break_backup_missing,
    "pgbouncer-down": _break_pgbouncer_down,
    "ssh-hang": _break_ssh_hang,
    "hostile": _break_hostile,
    "disk-full": _break_disk_full,
}
_HEALERS: dict[str, _Healer] = {
    "db-down": _heal_db_down,
    "server-down": _heal_server_down,
    "connections": _heal_helper,
    "idle-txn": _heal_helper,
    "lock": _heal_helper,
    "log-errors": _heal_nothing,
    "backup-missing": _heal_backup_missing,
    "pgbouncer-down": _heal_pgbouncer_down,
    "ssh-hang": _heal_ssh_hang,
    "hostile": _heal_hostile,
    "disk-full": _heal_disk_full,
}


# --- the fault helper process ------------------------------------------------------------------


def _hold(spec: dict[str, Any]) -> int:
    """Body of the helper process: open the sessions a fault needs, keep them until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())

    def connect(autocommit: bool) -> psycopg.Connection[Any]:
        return psycopg.connect(
            spec["conninfo"], application_name=FAULT_APP, autocommit=autocommit, connect_timeout=5
        )

    conns: list[psycopg.Connection[Any]] = []
    waiter: threading.Thread | None = None
    mode = spec["mode"]
    if mode == "connections":
        conns = [connect(True) for _ in range(int(spec["count"]))]
    else:
        table = sql.Identifier(spec["table"])
        count = sql.SQL("SELECT count(*) FROM {}").format(table)
        holder = connect(False)
        if mode == "idle-txn":
            holder.execute(count)
            conns = [holder]
        else:
            holder.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
            blocked = connect(False)
            conns = [holder, blocked]

            def wait_for_lock() -> None:
                with contextlib.suppress(psycopg.Error):
                    blocked.execute(count)

            waiter = threading.Thread(target=wait_for_lock, daemon=True)
            waiter.start()
    Path(spec["ready"]).write_text(str(os.getpid()), encoding="utf-8")
    while not stop.wait(1.0):
        pass
    # Let go of the lock first so the waiting query completes normally: cancelling it or
    # dropping its connection mid-query would put ERROR/FATAL lines in the server log.
    for conn in conns[:1]:
        conn.close()
    if waiter is not None:
        waiter.join(5)
    for conn in conns[1:]:
        conn.close()
    return 0


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "hold":
        return _hold(json.loads(argv[1]))
    print("usage: python -m core.sandbox hold SPEC_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
