"""Backups of customer databases, restore tests, and restores (SOP-201 step 8).

The format, owned here (core.health and core.sandbox read it), one directory per backup::

    <backup_path>/<customer>/<20261122T080000Z>/
        <db>.dump            pg_dump -Fc
        <db>.dump.sha256     sha256sum format
        rowcounts.json       {"schema.table": rows}, counted from the dump itself
        status               {"customer","database","started_at","finished_at","size_bytes",
                              "sha256","ok"[,"error"]}, written LAST (temp file + mv)
        verified             the newest restore test of this backup (same temp + mv)
    <backup_path>/_globals/<stamp>/globals.sql (+ .sha256, status): roles and tablespaces

As Debian's pg_backupcluster does it, a directory without ``status`` is a backup in progress or
one that died; ``"ok": false`` is a backup that failed (its partial dump removed). Only complete
backups count for retention, ``backup_age`` and restores.

Row counts come from the dump (its COPY blocks), not from a second query after pg_dump: on a
busy database the two would see different rows and every restore test would cry wolf.

Everything runs on the customer's server through its runner (SSH or local), as argument lists;
SQL goes to ``psql`` on standard input, which the runner never records. The admin connection is
the server's ``admin_dsn`` with any password stripped (the server's ~/.pgpass or peer auth
supplies it), so no password reaches a command line, an event or an error message.

A restore builds a new database from the backup, checks its row counts, then swaps the names in
one transaction with the customer's sessions ended: a failure at any step, including between
the two renames, leaves the customer's database as it was. The old one is kept, renamed with a
UTC timestamp and closed to connections.

Where things are: ``common`` (names of the format, stamps, limits), ``server`` (psql, files and
scripts on the server), ``dump`` (writing a backup), ``listing`` (reading them, backup_verified),
``retention``, ``verify`` (restore tests), ``service`` (the nightly run, backups by hand,
restore tests; events and backup locks), ``restore`` (restores, and ``Backups``, the whole
service), ``locks`` (the restore's lock).
"""

from core.backups.common import (
    DUMP_TIMEOUT_S,
    GLOBALS,
    HEADROOM_FRACTION,
    HEADROOM_MAX_BYTES,
    INCOMPLETE_GRACE,
    LOCK_DEADLINE_S,
    LOCK_LEASE,
    RESTORE_TIMEOUT_S,
    RETRY_AFTER_S,
    ROWCOUNTS,
    SESSIONS_END_S,
    SQL_TIMEOUT_S,
    STAMP_FORMAT,
    STATUS,
    VERIFIED,
    VERIFY_WARN_AGE,
    State,
    Verdict,
    parse_stamp,
    parse_time,
    stamp_of,
    utcnow,
)
from core.backups.dump import (
    NotEnoughSpace,
    SpaceCheck,
    check_space,
    read_free_space,
    write_backup,
    write_globals,
)
from core.backups.listing import (
    BackupInfo,
    Verification,
    backup_files_argv,
    backup_verified_check,
    backups_from_files,
    parse_backup_files,
    read_backups,
)
from core.backups.restore import (
    RESTORE_STEPS,
    Backups,
    RestoreFailed,
    RestorePreview,
    RestoreResult,
)
from core.backups.retention import (
    plan_retention,
)
from core.backups.server import (
    DIR_TAKEN,
    PINNED_SEARCH_PATH,
    ROWCOUNTS_SQL,
    admin_conninfo,
    compare_counts,
    pin_search_path,
    psql_argv,
    put_files,
    run_sql,
    script_error,
    sql_json,
    tenant_conninfo,
    write_json_last,
    write_remote_file,
)
from core.backups.service import (
    BackupOutcome,
    BackupRun,
    BackupService,
    VerifyOutcome,
    is_infrastructure,
)
from core.backups.verify import (
    verify_backup,
)

__all__ = [
    "DIR_TAKEN",
    "DUMP_TIMEOUT_S",
    "GLOBALS",
    "HEADROOM_FRACTION",
    "HEADROOM_MAX_BYTES",
    "INCOMPLETE_GRACE",
    "LOCK_DEADLINE_S",
    "LOCK_LEASE",
    "PINNED_SEARCH_PATH",
    "RESTORE_STEPS",
    "RESTORE_TIMEOUT_S",
    "RETRY_AFTER_S",
    "ROWCOUNTS",
    "ROWCOUNTS_SQL",
    "SESSIONS_END_S",
    "SQL_TIMEOUT_S",
    "STAMP_FORMAT",
    "STATUS",
    "VERIFIED",
    "VERIFY_WARN_AGE",
    "BackupInfo",
    "BackupOutcome",
    "BackupRun",
    "BackupService",
    "Backups",
    "NotEnoughSpace",
    "RestoreFailed",
    "RestorePreview",
    "RestoreResult",
    "SpaceCheck",
    "State",
    "Verdict",
    "Verification",
    "VerifyOutcome",
    "admin_conninfo",
    "backup_files_argv",
    "backup_verified_check",
    "backups_from_files",
    "check_space",
    "compare_counts",
    "is_infrastructure",
    "parse_backup_files",
    "parse_stamp",
    "parse_time",
    "pin_search_path",
    "plan_retention",
    "psql_argv",
    "put_files",
    "read_backups",
    "read_free_space",
    "run_sql",
    "script_error",
    "sql_json",
    "stamp_of",
    "tenant_conninfo",
    "utcnow",
    "verify_backup",
    "write_backup",
    "write_globals",
    "write_json_last",
    "write_remote_file",
]
