"""The fleet file (fleet.toml): servers, plans, thresholds, on-call and escalation.

Customers are not here: provisioning adds them, so they live in the database (storage.models).

A minimal file::

    [[servers]]
    name = "vps1"
    host = "10.0.0.11"
    dsn = "host=10.0.0.11 port=5432 user=dbops_monitor dbname=postgres"

Everything else has the Debian defaults below. A bad file raises a DbopsError naming the field
(``servers[1].ssh_port``) and what is wrong with it.

A server with pgBouncer in front of its cluster says where its pgbouncer.ini is::

    pgbouncer_ini = "/etc/pgbouncer/pgbouncer.ini"

Provisioning then registers each new database there and reloads pgBouncer, and the health sweep
checks it (the ``pgbouncer`` check) on the server's monitoring host at ``pgbouncer_port``, in
its admin console, as the monitoring role: that role must be in pgbouncer.ini's
``stats_users`` (and able to log in there, e.g. its secret in the auth_file). A server without
``pgbouncer_ini`` has no pgbouncer check.

Customer emails (the welcome email, incident notices) speak for the business in ``[business]``::

    [business]
    name = "Example Hosting"
    support_email = "support@example-hosting.com"
    support_hours = "Mon-Fri 9:00-18:00 ET"     # optional
    signature = "The Example Hosting team"      # optional; "The database team" otherwise

Without it they are neutral ("Your database host"); with SMTP_URL set, name and support_email
are required (core.email.require_branding). A server's ``ssl`` says what it enforces for
customers ("require", "prefer" or "off"); left out, provisioning reads it from the customer's
own first connection.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from datetime import time as dt_time
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import DbopsError
from core.names import NAME_RE, SERVER_RE

_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
# Every session dbops opens to a fleet server says so (pg_stat_activity, the server log's %a):
# ``dsn`` and ``admin_dsn`` get it unless they name an application_name of their own, so what
# connects through them (psql, pg_dump, pg_restore) carries it too.
APP_NAME = "dbops"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | float) -> timedelta:
    """'90s', '5m', '1h', '2d', or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration; write it like 30s, 5m, 1h or 2d")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Server(_Strict):
    name: str
    host: str = "127.0.0.1"
    transport: Literal["ssh", "local"] = "ssh"
    ssh_user: str = "root"
    ssh_port: int = Field(22, ge=1, le=65535)
    ssh_key: str | None = None
    # libpq connection string of a monitoring role that has pg_monitor (never a superuser password
    # in the file: use ~/.pgpass or trust on a private network).
    dsn: str
    # The maintenance database and role used for provisioning and restores (superuser or CREATEDB).
    admin_dsn: str | None = None
    pg_bin: str = "/usr/lib/postgresql/15/bin"
    # The client programs (pg_dump, pg_restore, pg_dumpall, psql, createdb, dropdb) backups,
    # restore tests and restores run, at least as new as the server. Unset: the newest found on
    # the server, in pg_bin and /usr/lib/postgresql/*/bin (core.backups.client).
    client_bin: str | None = None
    data_path: str = "/var/lib/postgresql/15/main"
    wal_path: str | None = None
    backup_path: str = "/var/backups/postgresql"
    log_path: str = "/var/log/postgresql/postgresql-15-main.log"
    restart_command: str = "pg_ctlcluster 15 main restart"
    start_command: str = "pg_ctlcluster 15 main start"
    reload_command: str = "pg_ctlcluster 15 main reload"
    pgbouncer_ini: str | None = None
    pgbouncer_reload_command: str = "systemctl reload pgbouncer"
    # Where pgBouncer listens (Debian's listen_port), on the host of ``dsn``.
    pgbouncer_port: int = Field(6432, ge=1, le=65535)
    # Run commands as this user with runuser (e.g. postgres), when the SSH user is root.
    run_as: str | None = None
    # What customers' connections get, as the welcome email states it: "require" (hostssl-only
    # rules, or pgBouncer's client_tls_sslmode = require: not readable without superuser, so
    # only from here), "prefer" (offered, not enforced) or "off" (not offered). Unset: what
    # the customer's first connection (through pgBouncer when there is one) negotiated.
    ssl: Literal["require", "prefer", "off"] | None = None
    # Continuous WAL archiving with pgBackRest (core.pitr): the configuration file of the
    # cluster's stanza on the server, and the stanza's name (the server's name when unset).
    # Unset: the server has no archiving, so no point-in-time recovery and no recovery window.
    pgbackrest_config: str | None = None
    pgbackrest_stanza: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SERVER_RE.fullmatch(value):
            raise ValueError("a server name is a lowercase letter then letters, digits, - or _")
        return value

    @field_validator("dsn", "admin_dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            named = "application_name" in conninfo_to_dict(value)
        except ProgrammingError:
            # Not the parser's message: it quotes the string, password and all.
            raise ValueError("cannot parse the libpq connection string") from None
        return value if named else make_conninfo(value, application_name=APP_NAME)

    @field_validator(
        "restart_command", "start_command", "reload_command", "pgbouncer_reload_command"
    )
    @classmethod
    def _command(cls, value: str) -> str:
        try:
            if not shlex.split(value):
                raise ValueError("a command cannot be empty")
        except ValueError as exc:
            raise ValueError(f"cannot parse the command: {exc}") from None
        return value

    @property
    def wal_dir(self) -> str:
        return self.wal_path or f"{self.data_path.rstrip('/')}/pg_wal"

    def argv(self, command: str) -> list[str]:
        """A configured command as an argument list (each argument is quoted when sent)."""
        return shlex.split(command)


class Plan(_Strict):
    ram_mb: int = Field(gt=0)
    storage_gb: int = Field(gt=0)
    connection_limit: int = Field(gt=0)
    price_usd_month: int = Field(ge=0, description="whole dollars a month")
    stripe_price: str | None = None


class Threshold(_Strict):
    warn: str | int | float | None = None
    crit: str | int | float | None = None


# check_postgres's defaults where it has them; ours (backup_age, the pgbouncer ones) where it
# does not.
DEFAULT_THRESHOLDS: dict[str, dict[str, Any]] = {
    "backends": {"warn": "90%", "crit": "95%"},
    "txn_wraparound": {"warn": 1_300_000_000, "crit": 1_400_000_000},
    "txn_idle": {
        "warn": "10s",
        "crit": "30s",
    },  # check_postgres needs them given; SOP-101 uses these
    "txn_time": {"warn": "5m", "crit": "15m"},
    "query_time": {"warn": "2m", "crit": "5m"},
    "locks": {"warn": 100, "crit": 150},
    "prepared_txns": {"warn": 1, "crit": 30},  # seconds, as check_postgres
    # check_postgres's replication_slots and checkpoint need thresholds given; ours: WAL a slot
    # retains (crit at the default max_wal_size, what the server itself would keep), and the
    # last checkpoint's age (over twice a checkpoint_timeout of 30 minutes and its completion).
    "replication_slots": {"warn": "100MB", "crit": "1GB"},
    "checkpoint": {"warn": "1h", "crit": "2h"},
    # Time left before the major's end of life (ours): warn its last 6 months, crit past it.
    "version": {"warn": "182d", "crit": "0d"},
    "disk_space": {"warn": "90%", "crit": "95%"},
    # Days until the data or backup path is full at its recent growth (ours): a number of days
    # or a time with its unit ("30d", "4w"), read by core.health.runway.parse_days.
    "disk_runway": {"warn": "30d", "crit": "7d"},
    "hitratio": {"warn": "90%", "crit": "80%"},
    "database_size": {"warn": "10G", "crit": "20G"},
    "last_vacuum": {"warn": "1d", "crit": "2d"},
    "logfile": {"warn": 1, "crit": 10},
    "backup_age": {"warn": "26h", "crit": "50h"},
    # The pgbouncer check's, under the names of check_postgres's actions with the same meaning
    # (which take no defaults): clients of one database waiting for a server connection, and
    # how long the oldest of them has waited. A waiting client is a customer's request stalled;
    # pgBouncer drops it at query_wait_timeout (120s), so crit comes well before that.
    "pgb_pool_cl_waiting": {"warn": 5, "crit": 20},
    "pgb_pool_maxwait": {"warn": "5s", "crit": "30s"},
}


class OnCall(_Strict):
    primary: str | None = None
    secondary: str | None = None
    escalation_channel: str | None = None
    rotation: list[str] = Field(default_factory=list)


class Escalation(_Strict):
    ack_timeout: timedelta = timedelta(minutes=5)
    channel_after: timedelta = timedelta(minutes=15)
    repeat: int = Field(3, ge=0, le=20)

    @field_validator("ack_timeout", "channel_after", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return value if isinstance(value, timedelta) else parse_duration(value)


class Backups(_Strict):
    """``[backups]``: the dumps' retention, and for servers that archive their WAL with
    pgBackRest (``pgbackrest_config``) the nightly base backups and the dead-man's switch::

        [backups]
        keep_daily = 7           # pg_dump: one a day for a week
        keep_weekly = 4          # and one a week for four more
        full_backup_day = "sun"  # pgBackRest: a full backup on this day (UTC), differential else
        retention_full = 2       # --repo1-retention-full: full backups kept (WAL back to them)
        retention_diff = 7       # --repo1-retention-diff: differential backups kept
        deadline = "06:00"       # the nightly run reports success by then (TIMEZONE), else P1
    """

    keep_daily: int = Field(7, ge=1)
    keep_weekly: int = Field(4, ge=0)
    full_backup_day: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"] = "sun"
    retention_full: int = Field(2, ge=1, le=9999999)
    retention_diff: int = Field(7, ge=1, le=9999999)
    deadline: dt_time = dt_time(6, 0)


_EMAIL_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")


class Business(_Strict):
    """Whose emails these are: ``[business]``. Every field is one line of plain text."""

    name: str | None = Field(None, max_length=80)
    support_email: str | None = Field(None, max_length=120)
    support_hours: str | None = Field(None, max_length=80)  # e.g. "Mon-Fri 9:00-18:00 ET"
    signature: str | None = Field(None, max_length=80)  # "The database team" when unset

    @field_validator("name", "support_email", "support_hours", "signature")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            raise ValueError("cannot be empty (leave the field out instead)")
        if any(ch in value for ch in "\r\n"):
            raise ValueError("must be one line")
        return value

    @field_validator("support_email")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL_ADDRESS.fullmatch(value):
            raise ValueError(f"{value[:60]!r} is not an email address")
        return value

    @property
    def branded(self) -> bool:
        """Enough to send customer email in production: a name and a support address."""
        return self.name is not None and self.support_email is not None


class Fleet(_Strict):
    servers: list[Server] = Field(min_length=1)
    plans: dict[str, Plan] = Field(default_factory=dict)
    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    oncall: OnCall = OnCall()
    escalation: Escalation = Escalation()
    backups: Backups = Backups()
    business: Business = Business()
    known_hosts: str | None = None
    # Where the file was read from; relative paths in it are resolved against this directory.
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _unique(self) -> Fleet:
        names = [s.name for s in self.servers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"server names must be unique; repeated: {', '.join(dupes)}")
        for plan in self.plans:
            if not NAME_RE.fullmatch(plan):
                raise ValueError(f"plan name {plan!r} must be a lowercase identifier")
        return self

    def server(self, name: str) -> Server:
        from core.names import not_found, validate_server_name

        validate_server_name(name)
        for server in self.servers:
            if server.name == name:
                return server
        raise not_found("server", name, [s.name for s in self.servers])

    def plan(self, name: str) -> Plan:
        from core.names import not_found

        if name not in self.plans:
            raise not_found("plan", name, self.plans)
        return self.plans[name]

    def threshold(self, check: str) -> dict[str, Any]:
        merged = dict(DEFAULT_THRESHOLDS.get(check, {}))
        if check in self.thresholds:
            own = self.thresholds[check]
            merged.update(
                {k: v for k, v in (("warn", own.warn), ("crit", own.crit)) if v is not None}
            )
        return merged

    @property
    def known_hosts_path(self) -> Path:
        path = Path(self.known_hosts or "known_hosts").expanduser()
        return path if path.is_absolute() else self.base_dir / path


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def parse_fleet(data: dict[str, Any], base_dir: Path | None = None, source: str = "fleet") -> Fleet:
    try:
        return Fleet.model_validate({**data, "base_dir": base_dir or Path(".")})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check its spelling)"
            lines.append(f"{_where(err['loc'])}: {msg}")
        raise DbopsError(f"{source} is not valid: " + "; ".join(lines)) from None


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DbopsError(
            f"no fleet file at {path}.", hint="Set DBOPS_FLEET to the path of your fleet.toml."
        ) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DbopsError(f"{path} is not valid TOML: {exc}") from None
    return parse_fleet(data, base_dir=path.parent.resolve(), source=str(path))
