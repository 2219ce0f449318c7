"""Point-in-time recovery with pgBackRest: the recovery window, the archiver's health, and one
customer database taken out of the cluster as it was at a moment.

Every server with ``pgbackrest_config`` in fleet.toml archives its WAL continuously into the
repository of a pgBackRest stanza (``archive_command = 'pgbackrest ... archive-push %p'``) and
has full and differential base backups there. pgBackRest does the archiving, the backups and
the restore; this module only reads what it says and drives it, on the server, through the
server's runner (SSH or local), as argument lists, as ``run_as``.

The recovery window of a server (``recovery_window``), from ``pgbackrest info --output=json``:

- ``earliest``: the stop time of the oldest backup in the repository. A recovery must replay
  to the end of its base backup before it is consistent; a target inside the backup (between
  its start and stop) is refused by PostgreSQL itself ("before consistent recovery point").
- ``latest``: the time the newest WAL segment in the archive was stored, as the repository
  lists it (``pgbackrest repo-ls``: the file's time). Read from the repository, not from the
  server: it is what survives if the server is lost. The segment holds nothing committed after
  that time, so this is an upper bound, late by the archiver's own delay (milliseconds).
- ``rpo_seconds``: now minus ``latest``: the committed work that a loss of the server now
  would cost. With ``archive_timeout = 60s`` a written segment is switched and archived within
  a minute, so it stays under 120 s while archiving works.

A restore to a time T (``restore_to_time``) never touches the live cluster's data: the
stanza's backup set is restored (``pgbackrest restore --db-include``: the customer's database
and the system ones, not the other customers') into a scratch data directory next to the
cluster's, with a port of its own and a private socket directory (0700; no TCP listener), a
recovery target of T and ``recovery_target_action = promote``; archiving is off there, so the
scratch instance never writes into the repository. It is started, the customer's database is
dumped from it by ``pg_dump`` logged in as the customer's own role (never a superuser:
DESIGN.md, "Trust boundaries"), in core.backups' format (``write_backup``: a backup stamped T,
with its sha256 and row counts), and the scratch instance is stopped and removed in a
``finally``, on failure and on deadline too. ``core.backups.Backups.restore(customer, stamp)``
then brings that dump in through the safe swap.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from core.backups.common import HEADROOM_FRACTION, HEADROOM_MAX_BYTES, stamp_of
from core.backups.dump import read_free_space, write_backup
from core.backups.server import run_sql, script_error, sql_json
from core.errors import DbopsError
from core.fleet import Server
from core.names import validate_name, validate_server_name
from core.remote import Runner
from core.units import pretty_age, pretty_bytes

PGBACKREST = "pgbackrest"  # Debian's /usr/bin/pgbackrest, on the server's PATH
INFO_TIMEOUT_S = 60.0
RESTORE_DEADLINE_S = 3600.0
# The cleanup of a scratch instance gets this long of its own, whatever the deadline left.
CLEANUP_TIMEOUT_S = 60.0
# Nothing archived for this long while WAL waits to be: the archiving check is crit.
ARCHIVE_CRIT_AFTER = timedelta(minutes=15)
# How long archive_now waits for the segment it switched to reach the repository.
ARCHIVE_WAIT_S = 60.0
SCRATCH_PREFIX = "dbops-pitr-"
SYSTEM_DATABASES = ("postgres", "template0", "template1")

Verdict = Literal["ok", "warn", "crit", "unknown"]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- the stanza -------------------------------------------------------------------------------


def stanza_of(server: Server) -> tuple[str, str]:
    """(configuration file, stanza name) of the server's pgBackRest stanza."""
    if not server.pgbackrest_config:
        raise DbopsError(
            f"{server.name} has no WAL archiving, so no point-in-time recovery.",
            hint="Set up pgBackRest there and name its stanza's file as pgbackrest_config in "
            "fleet.toml.",
        )
    return server.pgbackrest_config, validate_server_name(server.pgbackrest_stanza or server.name)


def pgbackrest_argv(server: Server, *args: str) -> list[str]:
    config, stanza = stanza_of(server)
    return [PGBACKREST, f"--config={config}", f"--stanza={stanza}", *args]


@dataclass(frozen=True)
class BaseBackup:
    """One backup set in the repository (a full, differential or incremental backup)."""

    label: str
    type: str
    start: datetime
    stop: datetime
    size_bytes: int  # the cluster's size when it was taken
    repo_bytes: int  # what it takes in the repository
    wal_start: str  # the first WAL segment a restore of it replays
    wal_stop: str

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "type": self.type,
            "start": _iso(self.start),
            "stop": _iso(self.stop),
            "size_bytes": self.size_bytes,
            "repo_bytes": self.repo_bytes,
        }


@dataclass(frozen=True)
class StanzaInfo:
    stanza: str
    status: str  # pgBackRest's status message ("ok", "no valid backups", ...)
    backups: tuple[BaseBackup, ...]  # oldest first, of the current database id
    archive_id: str | None
    wal_min: str | None
    wal_max: str | None


def _epoch(value: object) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DbopsError("pgbackrest info gave a backup without its times.")
    return datetime.fromtimestamp(value, UTC)


def parse_info(data: object, stanza: str) -> StanzaInfo:
    """``pgbackrest info --output=json`` of one stanza, read. The current database id only
    (after a major upgrade the older one's backups cannot restore this cluster)."""
    entries = data if isinstance(data, list) else []
    entry = next((e for e in entries if isinstance(e, dict) and e.get("name") == stanza), None)
    if entry is None:
        raise DbopsError(f"pgbackrest has no stanza {stanza}.")
    status = str((entry.get("status") or {}).get("message", "unknown"))
    dbs = [d for d in entry.get("db") or [] if isinstance(d, dict)]
    current = max((int(d.get("id", 0)) for d in dbs), default=None)
    backups = []
    for b in entry.get("backup") or []:
        if (b.get("database") or {}).get("id") != current or b.get("error"):
            continue
        stamps, info, archive = (
            b.get("timestamp") or {},
            b.get("info") or {},
            b.get("archive") or {},
        )
        backups.append(
            BaseBackup(
                label=str(b.get("label")),
                type=str(b.get("type")),
                start=_epoch(stamps.get("start")),
                stop=_epoch(stamps.get("stop")),
                size_bytes=int(info.get("size") or 0),
                repo_bytes=int((info.get("repository") or {}).get("size") or 0),
                wal_start=str(archive.get("start") or ""),
                wal_stop=str(archive.get("stop") or ""),
            )
        )
    archives = [
        a
        for a in entry.get("archive") or []
        if isinstance(a, dict) and (a.get("database") or {}).get("id") == current
    ]
    archive = archives[-1] if archives else {}
    return StanzaInfo(
        stanza=stanza,
        status=status,
        backups=tuple(sorted(backups, key=lambda b: b.stop)),
        archive_id=archive.get("id"),
        wal_min=archive.get("min"),
        wal_max=archive.get("max"),
    )


def read_info(runner: Runner, server: Server, *, timeout: float = INFO_TIMEOUT_S) -> StanzaInfo:
    result = runner.run(pgbackrest_argv(server, "--output=json", "info"), timeout=timeout)
    if not result.ok:
        raise script_error(result, "pgbackrest info")
    try:
        data = json.loads(result.stdout)
    except ValueError:
        raise DbopsError(f"pgbackrest info on {server.name} did not give JSON.") from None
    return parse_info(data, stanza_of(server)[1])


def newest_wal_time(
    runner: Runner, server: Server, info: StanzaInfo, *, timeout: float = INFO_TIMEOUT_S
) -> datetime | None:
    """When the newest archived WAL segment was stored, as the repository lists it."""
    if not (info.archive_id and info.wal_max and len(info.wal_max) == 24):
        return None
    path = f"archive/{info.stanza}/{info.archive_id}/{info.wal_max[:16]}"
    argv = pgbackrest_argv(server, "--output=json", f"--filter=^{info.wal_max}-", "repo-ls", path)
    result = runner.run(argv, timeout=timeout)
    if not result.ok:
        raise script_error(result, "pgbackrest repo-ls")
    try:
        files = json.loads(result.stdout or "{}")
        times = [int(f["time"]) for f in files.values() if f.get("type") == "file"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DbopsError(f"pgbackrest repo-ls on {server.name} did not give JSON.") from None
    return datetime.fromtimestamp(max(times), UTC) if times else None


@dataclass(frozen=True)
class RecoveryWindow:
    earliest: datetime
    latest: datetime
    rpo_seconds: int

    def as_json(self) -> dict[str, Any]:
        """DESIGN.md's ``recovery``: ``{earliest, latest, rpo_seconds}``, times in UTC."""
        return {
            "earliest": _iso(self.earliest),
            "latest": _iso(self.latest),
            "rpo_seconds": self.rpo_seconds,
        }


def window_of(info: StanzaInfo, latest: datetime | None, now: datetime) -> RecoveryWindow | None:
    """The window, or None when there is nothing to recover from (no backup, no archive)."""
    if not info.backups or latest is None:
        return None
    earliest = info.backups[0].stop
    latest = max(latest, earliest)
    return RecoveryWindow(earliest, latest, max(0, int((now - latest).total_seconds())))


def recovery_window(
    runner: Runner,
    server: Server,
    *,
    now: datetime | None = None,
    timeout: float = INFO_TIMEOUT_S,
) -> RecoveryWindow | None:
    """The server's recovery window (see the module's docstring): what every customer
    database on it can be restored to. None when the stanza has no backup or archive yet.
    ``timeout``: for each of the two pgBackRest commands."""
    info = read_info(runner, server, timeout=timeout)
    latest = newest_wal_time(runner, server, info, timeout=timeout)
    return window_of(info, latest, now or _utcnow())


# --- the archiving check ----------------------------------------------------------------------

# One row for the archiving check, as the monitoring role (pg_monitor may read the archive
# status directory): pg_stat_archiver, archive_mode, and the segments waiting to be archived
# (.ready files) with the time the oldest of them was written.
ARCHIVER_SQL = """
SELECT pg_catalog.json_build_object(
  'archive_mode', pg_catalog.current_setting('archive_mode'),
  'archived_count', a.archived_count, 'last_archived_wal', a.last_archived_wal,
  'last_archived_time', a.last_archived_time, 'failed_count', a.failed_count,
  'last_failed_wal', a.last_failed_wal, 'last_failed_time', a.last_failed_time,
  'stats_reset', a.stats_reset,
  'ready_count', (SELECT pg_catalog.count(*) FROM pg_catalog.pg_ls_archive_statusdir() s
                  WHERE s.name OPERATOR(pg_catalog.~~) '%.ready'),
  'oldest_ready_time', (SELECT pg_catalog.min(s.modification)
                        FROM pg_catalog.pg_ls_archive_statusdir() s
                        WHERE s.name OPERATOR(pg_catalog.~~) '%.ready'))
FROM pg_catalog.pg_stat_archiver a
"""


@dataclass(frozen=True)
class ArchivingVerdict:
    """The ``archiving`` check's fields (core.health's Check without the name)."""

    verdict: Verdict
    value: int | None  # seconds since the last successful archive
    warn: str | None
    crit: str | None
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": "archiving",
            "verdict": self.verdict,
            "value": self.value,
            "warn": self.warn,
            "crit": self.crit,
            "detail": self.detail,
        }


def _when(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return None


def archiving_verdict(
    row: Mapping[str, Any], now: datetime, *, crit_after: timedelta = ARCHIVE_CRIT_AFTER
) -> ArchivingVerdict:
    """The archiver's health from one ``ARCHIVER_SQL`` row at ``now``.

    - crit: WAL has waited to be archived for ``crit_after`` (the oldest .ready segment is that
      old) and nothing was archived in that time either. An idle server that archived nothing
      for hours has nothing waiting: not an alert.
    - warn: the archiver's last failure is later than its last success (or it has failed and
      never succeeded): archive_command is failing now. A failure older than the last success
      (yesterday's, with successes since) is not an alert.
    - warn: archive_mode is off: nothing is archived, no point-in-time recovery.
    """
    warn = "failed after the last success"
    crit = f"nothing archived for {pretty_age(crit_after.total_seconds())} with WAL waiting"
    archived, failed = _when(row.get("last_archived_time")), _when(row.get("last_failed_time"))
    ready = int(row.get("ready_count") or 0)
    oldest_ready = _when(row.get("oldest_ready_time"))
    since = int((now - archived).total_seconds()) if archived else None

    def out(verdict: Verdict, detail: str) -> ArchivingVerdict:
        return ArchivingVerdict(verdict, since, warn, crit, detail)

    if str(row.get("archive_mode", "on")) == "off":
        return out("warn", "archive_mode is off: no WAL is archived, no point-in-time recovery")
    waited = now - oldest_ready if (ready and oldest_ready) else None
    quiet = archived is None or now - archived >= crit_after
    if waited is not None and waited >= crit_after and quiet:
        last = f"last archived {pretty_age(since)} ago" if since is not None else "never archived"
        return out(
            "crit",
            f"{ready} WAL segment(s) waiting, the oldest for "
            f"{pretty_age(int(waited.total_seconds()))}; {last}",
        )
    if failed is not None and (archived is None or failed > archived):
        wal = row.get("last_failed_wal") or "a segment"
        ago = pretty_age((now - failed).total_seconds())
        success = "never" if archived is None else _iso(archived)
        return out(
            "warn",
            f"archive_command is failing: {wal} failed {ago} ago, after the last success "
            f"({success})",
        )
    if archived is None:
        return out("ok", "nothing archived yet; no WAL waiting" if not ready else "")
    return out(
        "ok",
        f"last archived {row.get('last_archived_wal')} {pretty_age(since or 0)} ago; "
        f"{ready} segment(s) waiting",
    )


def read_archiver(runner: Runner, server: Server) -> dict[str, Any]:
    """The ``ARCHIVER_SQL`` row, read on the server (as the admin: psql on the server)."""
    row = sql_json(runner, server, ARCHIVER_SQL)
    return dict(row or {})


def archive_now(runner: Runner, server: Server, *, timeout: float = ARCHIVE_WAIT_S) -> str:
    """Put the WAL written so far into the repository: a commit record (an empty transaction
    with a transaction id: a recovery to a time stops at the first commit after it, and must
    find one), a WAL switch, then wait until the archiver has stored that segment. Returns the
    segment's name. Touches no one's data."""
    out = run_sql(
        runner,
        server,
        [
            "SELECT pg_catalog.txid_current() IS NULL",
            "SELECT pg_catalog.pg_walfile_name(pg_catalog.pg_switch_wal())",
        ],
    )
    segment = out.strip().splitlines()[-1].strip()
    query = (
        "SELECT pg_catalog.json_build_object('archived', last_archived_wal, 'failed',"
        " last_failed_wal) FROM pg_catalog.pg_stat_archiver"
    )
    deadline = time.monotonic() + timeout
    while True:
        row = sql_json(runner, server, query) or {}
        if str(row.get("archived") or "") >= segment:
            return segment
        if time.monotonic() > deadline:
            raise DbopsError(
                f"the WAL of {server.name} up to now did not reach the archive within "
                f"{timeout:g}s (segment {segment}; the last failure: {row.get('failed')}).",
                hint="`archiving` in /db status says whether archive_command is failing.",
            )
        time.sleep(0.2)


# --- a restore to a time: the plan -----------------------------------------------------------


_TIME_OF_DAY = re.compile(r"^[0-9]{1,2}:[0-9]{2}")  # 02:00, 9:30:00-05:00


def is_time_of_day(word: str) -> bool:
    """Whether ``word`` starts like a time of day: the second half of a moment typed with a
    space (`--to 2026-11-22 09:30`), which the command line split off into the next word."""
    return bool(_TIME_OF_DAY.match(word))


def parse_target(text: str, timezone: str) -> datetime:
    """``--to``: ISO 8601 with an offset or ``Z``; without one, in ``timezone`` (TIMEZONE)."""
    value = text.strip()
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise DbopsError(
            f"{value[:40]!r} is not a time.",
            hint="Write it as ISO 8601, e.g. 2026-11-22T14:30:00Z or 2026-11-22 09:30-05:00.",
        ) from None
    if when.tzinfo is None:
        try:
            when = when.replace(tzinfo=ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            raise DbopsError(f"unknown time zone {timezone!r} (TIMEZONE).") from None
    try:
        return when.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 shifted past the calendar's end
        raise DbopsError(f"{value[:40]!r} is out of range.") from None


def segment_number(name: str, segment_bytes: int) -> int:
    """A WAL file name's segment number (its timeline left out)."""
    if len(name) != 24:
        raise ValueError(f"{name!r} is not a WAL segment name")
    return int(name[8:16], 16) * (0x100000000 // segment_bytes) + int(name[16:24], 16)


class Refused(DbopsError):
    """A restore to a time that cannot be done; nothing was changed. ``window``: the recovery
    window, when it was read (what can be restored to instead)."""

    def __init__(
        self, message: str, *, hint: str | None = None, window: RecoveryWindow | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.window = window


@dataclass(frozen=True)
class RestorePlan:
    """What the restore modal and the shell show before anything happens."""

    server: str
    database: str
    target: datetime
    window: RecoveryWindow
    backup: BaseBackup  # the newest base backup that ended before the target
    wal_segments: int  # at most this many replayed: from the backup to the newest archived
    wal_bytes: int
    need_bytes: int  # on the scratch directory's filesystem
    free_bytes: int
    total_bytes: int
    scratch_root: str

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "database": self.database,
            "target": _iso(self.target),
            "window": self.window.as_json(),
            "backup": self.backup.as_json(),
            "wal_segments": self.wal_segments,
            "wal_bytes": self.wal_bytes,
            "need_bytes": self.need_bytes,
            "free_bytes": self.free_bytes,
            "scratch_root": self.scratch_root,
        }

    def lines(self) -> list[str]:
        """The plan in words, for the modal and the shell."""
        return [
            f"Target: {_iso(self.target)} ({self.database} on {self.server})",
            f"Recoverable: {_iso(self.window.earliest)} to {_iso(self.window.latest)}",
            f"Base backup: {self.backup.label} ({self.backup.type}, ended "
            f"{_iso(self.backup.stop)})",
            f"WAL to replay: up to {self.wal_segments} segment(s), {pretty_bytes(self.wal_bytes)}"
            + (
                " (what was written since the newest archived segment is archived first)"
                if self.target > self.window.latest
                else ""
            ),
            f"Disk: needs ~{pretty_bytes(self.need_bytes)} on {self.server}, "
            f"{pretty_bytes(self.free_bytes)} free",
        ]


@dataclass(frozen=True)
class _Sizes:
    database: int
    system: int
    segment: int
    max_wal: int


_SIZES_SQL = """
SELECT pg_catalog.json_build_object(
  'database', (SELECT pg_catalog.pg_database_size(oid) FROM pg_catalog.pg_database
               WHERE datname OPERATOR(pg_catalog.=) {db}),
  'system', (SELECT pg_catalog.sum(pg_catalog.pg_database_size(oid)) FROM pg_catalog.pg_database
             WHERE datname OPERATOR(pg_catalog.=) ANY ({system})),
  'segment', pg_catalog.pg_size_bytes(pg_catalog.current_setting('wal_segment_size')),
  'max_wal', pg_catalog.pg_size_bytes(pg_catalog.current_setting('max_wal_size')))
"""


def _sizes(runner: Runner, server: Server, database: str) -> _Sizes:
    query = sql.SQL(_SIZES_SQL).format(
        db=sql.Literal(database), system=sql.Literal(list(SYSTEM_DATABASES))
    )
    row = sql_json(runner, server, query) or {}
    if row.get("database") is None:
        raise Refused(f"there is no database {database} on {server.name}.")
    return _Sizes(
        int(row["database"]), int(row.get("system") or 0), int(row["segment"]), int(row["max_wal"])
    )


def scratch_root(server: Server) -> str:
    """Where scratch data directories go: beside the cluster's own (the postgres user's, on
    the cluster's filesystem)."""
    parent = server.data_path.rstrip("/").rpartition("/")[0]
    return parent or "/"


def decide(
    info: StanzaInfo,
    window: RecoveryWindow | None,
    target: datetime,
    now: datetime,
    *,
    sizes: _Sizes,
    free_bytes: int,
    total_bytes: int,
    server: str,
    database: str,
    root: str,
) -> RestorePlan:
    """The plan for a restore of ``database`` to ``target``, or a Refused saying why not:
    a target outside the window (before the oldest backup ended, or in the future), no base
    backup before it, or too little disk for the scratch instance."""
    if window is None:
        raise Refused(
            f"{server} has no base backup with archived WAL yet: nothing to recover to a time "
            "from; nothing was changed."
        )
    if target > now:
        raise Refused(
            f"{_iso(target)} is in the future (now is {_iso(now)}); nothing was changed.",
            hint=f"{database} can be restored to {_iso(window.earliest)} .. now.",
            window=window,
        )
    if target < window.earliest:
        raise Refused(
            f"{_iso(target)} is before the recovery window of {server}, which starts at "
            f"{_iso(window.earliest)} (the oldest base backup); nothing was changed.",
            hint="The nightly dumps (`/db backups`) may reach further back.",
            window=window,
        )
    before = [b for b in info.backups if b.stop <= target]
    if not before:  # cannot happen when target >= earliest; kept for a hand-made info
        raise Refused(f"no base backup of {server} ended before {_iso(target)}.", window=window)
    backup = before[-1]
    try:
        first = segment_number(backup.wal_start, sizes.segment)
        last = segment_number(info.wal_max or backup.wal_stop, sizes.segment)
        segments = max(1, last - first + 1)
    except ValueError:
        segments = 1
    wal_bytes = segments * sizes.segment
    # The scratch cluster holds the system databases and the customer's (the others are
    # restored as empty sparse files), or the whole cluster when the customer's database is
    # younger than the backup (see restore_to_time), plus the WAL being replayed (recovery
    # keeps about max_wal_size), plus PostgreSQL's headroom on the disk it shares, as a dump's.
    headroom = min(int(total_bytes * HEADROOM_FRACTION), HEADROOM_MAX_BYTES)
    data = max(sizes.database + sizes.system, backup.size_bytes)
    need = data + min(wal_bytes, sizes.max_wal) + 2 * sizes.segment
    need += headroom
    plan = RestorePlan(
        server,
        database,
        target,
        window,
        backup,
        segments,
        wal_bytes,
        need,
        free_bytes,
        total_bytes,
        root,
    )
    if free_bytes < need:
        raise Refused(
            f"not enough disk on {server} for the scratch instance: needs "
            f"~{pretty_bytes(need)}, {pretty_bytes(free_bytes)} free at {root}; nothing was "
            "changed.",
            hint="Free space there first.",
            window=window,
        )
    return plan


def plan_restore(
    runner: Runner, server: Server, database: str, target: datetime, *, now: datetime | None = None
) -> RestorePlan:
    """What a restore of ``database`` to ``target`` would do (see ``decide``); reads only."""
    database = validate_name(database, "database")
    now = now or _utcnow()
    info = read_info(runner, server)
    window = window_of(info, newest_wal_time(runner, server, info), now)
    sizes = _sizes(runner, server, database)
    root = scratch_root(server)
    total, free = read_free_space(runner, server, root)
    return decide(
        info,
        window,
        target.astimezone(UTC),
        now,
        sizes=sizes,
        free_bytes=free,
        total_bytes=total,
        server=server.name,
        database=database,
        root=root,
    )


# --- a restore to a time: the scratch instance -------------------------------------------------

# The scratch directory and its private socket directory, the postgres user's alone.
_MKDIR_SCRIPT = r"""set -eu
umask 077
mkdir -- "$1" "$1/data" "$1/run"
"""

# After pgbackrest restore: the scratch instance's own settings, appended to
# postgresql.auto.conf (read last, so they win over the cluster's own): its port, its socket
# directory only (no TCP), no pid file of the live cluster's, its own HBA file (the socket
# directory is 0700: only the server's OS user reaches it), archiving off, no hot standby (no
# session before the target is reached). A cluster whose postgresql.conf lives in /etc
# (Debian's) gets an empty one.
_CONFIGURE_SCRIPT = r"""set -eu
umask 077
data=$1; run=$2; port=$3
[ -e "$data/postgresql.conf" ] || : > "$data/postgresql.conf"
printf 'local all all trust\n' > "$data/dbops_pitr_hba.conf"
: > "$data/dbops_pitr_ident.conf"
cat >> "$data/postgresql.auto.conf" <<EOF
# dbops point-in-time recovery: a scratch instance
port = $port
listen_addresses = ''
unix_socket_directories = '$run'
external_pid_file = '${data%/*}/postgres.pid'
hba_file = '$data/dbops_pitr_hba.conf'
ident_file = '$data/dbops_pitr_ident.conf'
archive_mode = off
archive_command = ''
hot_standby = off
ssl = off
logging_collector = off
log_destination = 'stderr'
cluster_name = 'dbops-pitr'
EOF
"""

# pg_ctl -w returns once the postmaster runs; with hot_standby off it accepts connections only
# when the recovery has reached its target and promoted. Wait for that, or for it to die (a
# target it could not reach is a FATAL), or for the time given. Exit 3: it stopped; 4: time.
_WAIT_SCRIPT = r"""set -u
data=$1; run=$2; port=$3; bin=$4; limit=$5
end=$((SECONDS + limit))
while :; do
  if "$bin/pg_isready" -q -h "$run" -p "$port"; then exit 0; fi
  [ -f "$data/postmaster.pid" ] || exit 3
  pid=$(head -n 1 -- "$data/postmaster.pid")
  kill -0 "$pid" 2>/dev/null || exit 3
  [ "$SECONDS" -lt "$end" ] || exit 4
  sleep 0.2
done
"""

# Stop the scratch instance (immediately: nothing in it is kept), kill it if that fails, and
# remove its directory. Only a directory named like ours, under the root given.
_CLEANUP_SCRIPT = r"""set -u
dir=$1; bin=$2
case "${dir##*/}" in dbops-pitr-*) ;; *) echo "not a scratch directory: $dir" >&2; exit 2;; esac
if [ -f "$dir/data/postmaster.pid" ]; then
  pid=$(head -n 1 -- "$dir/data/postmaster.pid")
  "$bin/pg_ctl" -D "$dir/data" stop -m immediate -w -t 20 >/dev/null 2>&1 || true
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
fi
rm -rf -- "$dir"
[ ! -e "$dir" ]
"""


@dataclass(frozen=True)
class PitrDump:
    """The customer's database at ``target``, dumped in core.backups' format: the backup
    ``stamp`` of the customer, ready for ``Backups.restore(customer, stamp, ...)``."""

    customer: str
    server: str
    database: str
    target: datetime
    stamp: str
    path: str  # the backup's directory
    dump: str  # its pg_dump -Fc file
    plan: RestorePlan
    scratch: str  # removed by now
    port: int
    duration_s: float
    steps: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "database": self.database,
            "target": _iso(self.target),
            "backup": self.stamp,
            "path": self.path,
            "plan": self.plan.as_json(),
            "duration_s": round(self.duration_s, 3),
            "steps": self.steps,
        }


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DbopsError(f"the point-in-time restore ran out of time before {what}.")
    return left


# What the scratch instance's log says when it refuses a connection while it recovers (the
# readiness probe's); not the reason it stopped.
_PROBE_NOISE = ("not accepting connections", "is starting up", "Hot standby mode")


def _log_tail(runner: Runner, path: str) -> str:
    """The line of the scratch instance's log that says why it stopped (PANIC, then FATAL)."""
    result = runner.run(["tail", "-n", "40", "--", path], timeout=10)
    lines = [ln for ln in result.stdout.splitlines() if not any(n in ln for n in _PROBE_NOISE)]
    for level in ("PANIC", "FATAL", "ERROR"):
        found = [ln for ln in lines if f"{level}:" in ln]
        if found:
            return found[-1].partition(f"{level}:")[2].strip()[:200]
    return ""


def _scratch_up(
    runner: Runner,
    server: Server,
    scratch: str,
    port: int,
    options: list[str],
    deadline: float,
    *,
    db_include: str | None,
    reached: str,
) -> None:
    """Into the scratch directory (made): ``pgbackrest restore`` with ``options`` (the set and
    the recovery target), the scratch instance's own settings, then started and waited for
    until its recovery has reached the target and promoted. ``db_include``: only that database
    (and the system ones) when the backup has it, else the whole cluster (a database made after
    the backup is made again by the WAL replay)."""
    data, sock = f"{scratch}/data", f"{scratch}/run"
    bin_dir = server.pg_bin.rstrip("/")
    common = [
        f"--pg1-path={data}",
        *options,
        "--target-action=promote",
        "--archive-mode=off",
        f"--tablespace-map-all={scratch}/tablespaces",
        "--log-level-console=warn",
    ]
    included = [f"--db-include={db_include}"] if db_include else []
    restored = runner.run(
        pgbackrest_argv(server, *common, *included, "restore"),
        timeout=_left(deadline, "pgbackrest restore"),
    )
    if included and restored.exit_code == 80 and "database to include" in restored.stderr:
        restored = runner.run(
            pgbackrest_argv(server, *common, "restore"),
            timeout=_left(deadline, "pgbackrest restore"),
        )
    if not restored.ok:
        raise script_error(restored, "pgbackrest restore")
    runner.run(["bash", "-c", _CONFIGURE_SCRIPT, "dbops-pitr-conf", data, sock, str(port)]).check()
    log_path = f"{scratch}/postgresql.log"
    wait_s = max(1, int(_left(deadline, "starting the scratch instance")))
    started = runner.run(
        [f"{bin_dir}/pg_ctl", "-D", data, "-l", log_path, "-w", "-t", str(wait_s), "start"],
        timeout=wait_s + 10,
    )
    if started.ok:
        wait_s = max(1, int(_left(deadline, "the recovery")))
        started = runner.run(
            ["bash", "-c", _WAIT_SCRIPT, "dbops-pitr-wait", data, sock, str(port), bin_dir,
             str(wait_s)],
            timeout=wait_s + 10,
        )  # fmt: skip
    if not started.ok:
        said = _log_tail(runner, log_path) or started.stderr.strip()[-200:]
        raise DbopsError(f"the scratch instance on {server.name} did not {reached}: {said}")


def restore_to_time(
    runner: Runner,
    server: Server,
    *,
    customer: str,
    database: str,
    role: str,
    target: datetime,
    now: datetime | None = None,
    deadline_s: float = RESTORE_DEADLINE_S,
    archive_first: bool = True,
) -> PitrDump:
    """The customer's ``database`` as it was at ``target``, dumped as the backup stamped
    ``target`` of ``customer`` (see the module's docstring). Refuses (``Refused``) before
    anything is made when the plan does; the scratch instance is gone when this returns or
    raises. The live cluster gets one empty transaction and a WAL switch (``archive_now``),
    nothing else; with ``archive_first=False`` not even that (a server whose PostgreSQL is down:
    only what is already archived can be reached)."""
    t0 = time.monotonic()
    deadline = t0 + deadline_s
    validate_name(customer)
    role = validate_name(role, "role")
    plan = plan_restore(runner, server, database, target, now=now)
    steps = ["planned"]
    if archive_first:
        archive_now(runner, server, timeout=min(ARCHIVE_WAIT_S, _left(deadline, "archiving")))
        steps.append("archived")
    scratch = f"{plan.scratch_root.rstrip('/')}/{SCRATCH_PREFIX}{secrets.token_hex(4)}"
    port = 20000 + secrets.randbelow(10000)  # names the socket; nothing listens on TCP
    sock = f"{scratch}/run"
    made = False
    try:
        runner.run(["bash", "-c", _MKDIR_SCRIPT, "dbops-pitr-mkdir", scratch]).check()
        made = True
        options = [
            f"--set={plan.backup.label}",
            "--type=time",
            f"--target={plan.target.isoformat(sep=' ')}",
        ]
        _scratch_up(
            runner,
            server,
            scratch,
            port,
            options,
            deadline,
            db_include=plan.database,
            reached=f"recover to {_iso(plan.target)}",
        )
        steps.append("restored")
        steps.append("recovered")
        _left(deadline, "the dump")
        # The dump as the customer's own role, into the scratch instance's socket.
        scratch_server = server.model_copy(
            update={
                "admin_dsn": make_conninfo(host=sock, port=str(port), user=role, dbname=database),
                "dsn": make_conninfo(host=sock, port=str(port), user=role, dbname=database),
            }
        )
        written = write_backup(
            runner,
            scratch_server,
            customer,
            database,
            now=plan.target,
            extra={"source": "pitr", "target": _iso(plan.target)},
        )
        steps.append("dumped")
    except BaseException:
        # Whatever stopped it (a failure, the deadline, an interrupt): the scratch instance
        # goes, and the original error is the one raised.
        if made:
            try:
                cleanup(runner, server, scratch)
            except Exception:
                log.exception("removing the scratch instance %s on %s", scratch, server.name)
        raise
    cleanup(runner, server, scratch)
    steps.append("cleaned")
    return PitrDump(
        customer=customer,
        server=server.name,
        database=database,
        target=plan.target,
        stamp=stamp_of(datetime.fromisoformat(written["started_at"])),
        path=str(written["path"]),
        dump=f"{written['path']}/{database}.dump",
        plan=plan,
        scratch=scratch,
        port=port,
        duration_s=time.monotonic() - t0,
        steps=steps,
    )


# --- the nightly base backup and the weekly restore test ------------------------------------------

BACKUP_TIMEOUT_S = 6 * 3600.0
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def backup_type(now: datetime, full_day: str) -> Literal["full", "diff"]:
    """The nightly base backup's type: full on ``full_day`` (of ``now``, UTC), else diff
    (which pgBackRest makes a full one itself while the stanza has none)."""
    return "full" if WEEKDAYS[now.astimezone(UTC).weekday()] == full_day else "diff"


def base_backup(
    runner: Runner,
    server: Server,
    *,
    type: Literal["full", "diff"],
    retention_full: int,
    retention_diff: int,
    timeout: float = BACKUP_TIMEOUT_S,
) -> BaseBackup:
    """``pgbackrest backup`` of the server's cluster into its stanza's repository, with the
    fleet's retention (pgBackRest expires older sets and their WAL after it); returns the new
    set as ``pgbackrest info`` lists it."""
    argv = pgbackrest_argv(
        server,
        f"--type={type}",
        f"--repo1-retention-full={int(retention_full)}",
        f"--repo1-retention-diff={int(retention_diff)}",
        "--log-level-console=warn",
        "backup",
    )
    result = runner.run(argv, timeout=timeout)
    if not result.ok:
        raise script_error(result, "pgbackrest backup")
    info = read_info(runner, server)
    if not info.backups:
        raise DbopsError(f"pgbackrest backup on {server.name} ended, but info lists no backup.")
    return info.backups[-1]


@dataclass(frozen=True)
class PhysicalTest:
    """One restore test of a server's newest base backup: restored into a scratch instance,
    started (recovered to the end of the backup), a query run in it, removed."""

    server: str
    backup: str | None  # the set's label
    ok: bool
    detail: str
    databases: int = 0  # what the query found
    duration_s: float = 0.0


# The query a restore test runs in the scratch instance: catalogs only (nothing a customer
# wrote runs), in the postgres database, as the cluster's admin role over its private socket.
_TEST_SQL = (
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_database"
    " WHERE datname OPERATOR(pg_catalog.<>) 'template0'"
)


def physical_test(
    runner: Runner, server: Server, *, deadline_s: float = RESTORE_DEADLINE_S
) -> PhysicalTest:
    """Restore the newest backup set of the server's stanza into a scratch instance
    (``--type=immediate``: recovered to the end of the backup, then promoted), start it, count
    its databases, remove it. The scratch instance is gone when this returns or raises; a
    failure is a result (``ok`` False), not an exception, except when nothing could be read."""
    t0 = time.monotonic()
    deadline = t0 + deadline_s
    info = read_info(runner, server)
    if not info.backups:
        return PhysicalTest(server.name, None, False, "no base backup in the repository to test")
    backup = info.backups[-1]
    root = scratch_root(server)
    total, free = read_free_space(runner, server, root)
    need = backup.size_bytes + min(int(total * HEADROOM_FRACTION), HEADROOM_MAX_BYTES)
    if free < need:
        return PhysicalTest(
            server.name,
            backup.label,
            False,
            f"not enough disk for a restore test of {backup.label}: needs ~{pretty_bytes(need)}, "
            f"{pretty_bytes(free)} free at {root}",
        )
    scratch = f"{root.rstrip('/')}/{SCRATCH_PREFIX}{secrets.token_hex(4)}"
    port = 20000 + secrets.randbelow(10000)
    made = False
    try:
        runner.run(["bash", "-c", _MKDIR_SCRIPT, "dbops-pitr-mkdir", scratch]).check()
        made = True
        _scratch_up(
            runner,
            server,
            scratch,
            port,
            [f"--set={backup.label}", "--type=immediate"],
            deadline,
            db_include=None,
            reached=f"start from {backup.label}",
        )
        user = conninfo_to_dict(server.admin_dsn or server.dsn).get("user") or "postgres"
        conninfo = make_conninfo(
            host=f"{scratch}/run", port=str(port), user=user, dbname="postgres"
        )
        psql = [f"{server.pg_bin.rstrip('/')}/psql", "-X", "-q", "-A", "-t", "-v",
                "ON_ERROR_STOP=1", "-d", conninfo, "-c", _TEST_SQL]  # fmt: skip
        answer = runner.run(psql, timeout=_left(deadline, "the query"))
        if not answer.ok or not answer.stdout.strip().isdigit():
            raise DbopsError(f"the restored instance did not answer: {answer.stderr.strip()[:200]}")
        count = int(answer.stdout.strip())
    except DbopsError as exc:
        if made:
            _quiet_cleanup(runner, server, scratch)
        return PhysicalTest(
            server.name, backup.label, False, exc.message[:300], 0, time.monotonic() - t0
        )
    except BaseException:
        if made:
            _quiet_cleanup(runner, server, scratch)
        raise
    cleanup(runner, server, scratch)
    took = time.monotonic() - t0
    return PhysicalTest(
        server.name,
        backup.label,
        True,
        f"{backup.label} ({backup.type}, ended {_iso(backup.stop)}) restored and started in "
        f"{took:.1f}s: {count} databases",
        count,
        took,
    )


def _quiet_cleanup(runner: Runner, server: Server, scratch: str) -> None:
    try:
        cleanup(runner, server, scratch)
    except Exception:
        log.exception("removing the scratch instance %s on %s", scratch, server.name)


def cleanup(runner: Runner, server: Server, scratch: str) -> None:
    """Stop and remove a scratch instance (its directory must be one of ours)."""
    if not scratch.rpartition("/")[2].startswith(SCRATCH_PREFIX):
        raise ValueError(f"{scratch!r} is not a scratch directory")
    argv = ["bash", "-c", _CLEANUP_SCRIPT, "dbops-pitr-cleanup", scratch, server.pg_bin.rstrip("/")]
    result = runner.run(argv, timeout=CLEANUP_TIMEOUT_S)
    if not result.ok:
        raise script_error(result, f"removing the scratch instance {scratch}")


__all__ = [
    "ARCHIVER_SQL",
    "ArchivingVerdict",
    "BaseBackup",
    "PhysicalTest",
    "PitrDump",
    "RecoveryWindow",
    "Refused",
    "RestorePlan",
    "StanzaInfo",
    "archive_now",
    "archiving_verdict",
    "backup_type",
    "base_backup",
    "cleanup",
    "decide",
    "parse_info",
    "parse_target",
    "physical_test",
    "plan_restore",
    "read_archiver",
    "read_info",
    "recovery_window",
    "restore_to_time",
    "window_of",
]
