"""What the parts of core.backups share: the on-disk format's names, time stamps, limits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from core.errors import DbopsError

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
GLOBALS = "_globals"  # not a valid customer name, so it never collides with one
STATUS, VERIFIED, ROWCOUNTS = "status", "verified", "rowcounts.json"
DUMP_TIMEOUT_S = 3600.0
RESTORE_TIMEOUT_S = 7200.0
SQL_TIMEOUT_S = 120.0
# A failed or unfinished backup older than the newest complete one is removed by retention, but
# never one younger than this: it may still be running.
INCOMPLETE_GRACE = timedelta(hours=6)
# No restore test for this long: backup_verified warns.
VERIFY_WARN_AGE = timedelta(days=8)
LOCK_LEASE = timedelta(hours=3)
# How long taking or releasing a backup's lock may wait for dbops' database: a black-holed
# database would otherwise hold the nightly run's threads until the route comes back. As long as
# an event append may take (storage.events.APPEND_DEADLINE_S).
LOCK_DEADLINE_S = 5.0
SESSIONS_END_S = 10
# Free space a dump needs on the backup path's filesystem before it starts: the database's size
# (pg_database_size: a custom-format dump is compressed and leaves indexes out, so it is nearly
# always smaller; the size is a ceiling, not a guess), plus headroom for PostgreSQL, which often
# shares the disk: 10% of the filesystem, but never more than 1 GiB (on a 2 TB disk 10% would
# refuse dumps with 150 GB free).
HEADROOM_FRACTION = 0.10
HEADROOM_MAX_BYTES = 1 << 30
# An infrastructure failure (SSH, the event log) in the nightly run is retried once, this long
# after the first pass over every customer has finished: long enough for an event database
# restart or an SSH blip to pass.
RETRY_AFTER_S = 120.0


State = Literal["ok", "failed", "incomplete"]
Verdict = Literal["ok", "warn", "crit", "unknown"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def stamp_of(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime(STAMP_FORMAT)


def parse_stamp(stamp: str) -> datetime:
    try:
        return datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise DbopsError(
            f"{stamp[:40]!r} is not a backup name.",
            hint="Backups are named by their UTC time, like 20261122T080000Z; "
            "`/db backups <customer>` lists them.",
        ) from None


def parse_time(value: object) -> datetime | None:
    """An ISO-8601 time from a status file, as an aware datetime (UTC when it names no zone)."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
