"""Restores: a new database from the backup, its row counts checked, the names swapped in one
transaction (the old database kept, closed), and ``Backups``, the whole service."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg import sql

from core.backups.common import SESSIONS_END_S
from core.backups.listing import BackupInfo, read_backups
from core.backups.server import _ident, compare_counts, run_sql, sql_json
from core.backups.service import BackupService
from core.backups.verify import (
    _analyze_as_owner,
    _create_database,
    _drop_database,
    _inspect,
    _pg_restore,
    _restored_counts,
)
from core.customers import Customer
from core.errors import DbopsError, NotFound
from core.fleet import Server
from core.names import validate_name
from core.remote import Runner
from storage.spool import RECORD_LATER, caught_up, record

if TYPE_CHECKING:
    from core.pitr import PitrDump, RestorePlan

log = logging.getLogger("core.backups")


@dataclass(frozen=True)
class RestorePreview:
    """What the restore modal shows: the backup proposed, its age, and the others to pick."""

    customer: str
    server: str
    database: str
    backup: BackupInfo
    age_s: int
    choices: list[BackupInfo]
    warnings: list[str]
    db_size_bytes: int | None = None
    free_bytes: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "database": self.database,
            "backup": self.backup.as_json(),
            "age_s": self.age_s,
            "verified": self.backup.verified,
            "choices": [
                {
                    "backup": b.stamp,
                    "verified": b.verified,
                    "finished_at": b.finished_at.isoformat() if b.finished_at else None,
                    "size_bytes": b.size_bytes,
                }
                for b in self.choices
            ],
            "warnings": self.warnings,
            "db_size_bytes": self.db_size_bytes,
            "free_bytes": self.free_bytes,
        }


# The steps of a restore, in order, each a ``restore.step`` event between ``restore.started``
# and ``restore.done`` (pgbouncer_reloaded only where the server has pgBouncer).
RESTORE_STEPS = (
    "checked",
    "created",
    "restored",
    "verified",
    "analyzed",
    "settings_copied",
    "connections_ended",
    "swapped",
    "pgbouncer_reloaded",
)


@dataclass(frozen=True)
class RestoreResult:
    customer: str
    server: str
    database: str
    backup: str
    kept_as: str
    tables: int
    rows: int
    duration_s: float
    steps: list[str]
    pgbouncer_reloaded: bool
    # False: the event log was down for some of the restore's events; they are spooled.
    recorded: bool = True
    # A point-in-time restore: the moment restored to, and core.pitr's PitrDump.as_json().
    target: datetime | None = None
    pitr: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        """What the restore reached, in words."""
        return "restored" if self.recorded else f"restored; {RECORD_LATER}"

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "database": self.database,
            "backup": self.backup,
            "kept_as": self.kept_as,
            "tables": self.tables,
            "rows": self.rows,
            "duration_s": round(self.duration_s, 3),
            "steps": self.steps,
            "pgbouncer_reloaded": self.pgbouncer_reloaded,
            "recorded": self.recorded,
            **(
                {"target": self.target.isoformat(), "pitr": self.pitr}
                if self.target is not None
                else {}
            ),
        }


class RestoreFailed(DbopsError):
    """A restore stopped; ``step`` says where, ``original`` what became of the customer's
    database (``untouched`` or ``swapped back``: rolled back either way, or a sentence saying
    it is in an unknown state), ``recorded`` whether the log has every event of it yet."""

    def __init__(self, message: str, *, step: str, original: str, recorded: bool = True) -> None:
        super().__init__(message)
        self.step = step
        self.original = original
        self.recorded = recorded

    @property
    def rolled_back(self) -> bool:
        return self.original in ("untouched", "swapped back")

    @property
    def state(self) -> str:
        """What the restore reached, in words."""
        if self.original == "untouched":
            said = "rolled back: the customer's database is as before (it was never swapped)"
        elif self.original == "swapped back":
            said = "rolled back: the restored copy was swapped out again; the customer's "
            said += "database is as before"
        else:
            said = f"NOT rolled back: the customer's database is {self.original}"
        return said if self.recorded else f"{said}; {RECORD_LATER}"


def _short_name(base: str, suffix: str) -> str:
    """``base_suffix`` within PostgreSQL's 63 bytes, base cut first."""
    return validate_name(f"{base[: 63 - len(suffix) - 1]}_{suffix}", "database")


class Backups(BackupService):
    """Backups, restore tests and restores for the fleet; one per process is enough.

    ``failpoints`` is a test seam: names of steps at which to fail on purpose (see the
    ``_failpoint`` calls) so tests can show that a failure there leaves everything as it was.
    """

    def restore_preview(self, customer: str, backup: str | None = None) -> RestorePreview:
        """For the restore modal: the newest restore-tested backup (or ``backup``), its age, the
        complete backups to choose from, and what the admin should know before typing the name."""
        c, server, runner = self._where(customer)
        backups = read_backups(runner, server, c.name)
        chosen = self._pick(c.name, backups, backup, prefer_verified=True)
        now = self.clock()
        warnings = []
        if not chosen.verified:
            if chosen.verification is not None:
                warnings.append(
                    f"backup {chosen.stamp} FAILED its restore test: {chosen.verification.detail}"
                )
            else:
                warnings.append(f"backup {chosen.stamp} has not been restore-tested yet.")
        newer = [b for b in backups if b.complete and b.stamp > chosen.stamp]
        if newer:
            warnings.append(
                f"{len(newer)} newer backup(s) exist; the newest is {newer[0].stamp}"
                + (" (not restore-tested)" if not newer[0].verified else "")
            )
        size = free = None
        try:
            size = self._db_size(runner, server, c.database)
            free = self._free_bytes(runner, server)
        except DbopsError as exc:
            warnings.append(f"could not check disk space: {exc.message[:150]}")
        if size is not None and free is not None and free < size * 2:
            warnings.append(
                f"{server.name} has {free // 2**20} MB free; the restore keeps the current "
                f"database ({size // 2**20} MB) beside the restored one."
            )
        return RestorePreview(
            c.name,
            server.name,
            c.database,
            chosen,
            chosen.age_s(now),
            [b for b in backups if b.complete][:100],
            warnings,
            size,
            free,
        )

    @staticmethod
    def _db_size(runner: Runner, server: Server, database: str) -> int | None:
        out = sql_json(
            runner,
            server,
            sql.SQL(
                "SELECT pg_catalog.to_json(pg_catalog.pg_database_size(datname))"
                " FROM pg_catalog.pg_database WHERE datname = {}"
            ).format(sql.Literal(database)),
        )
        return int(out) if out is not None else None

    @staticmethod
    def _free_bytes(runner: Runner, server: Server) -> int | None:
        out = runner.run(["df", "-P", "-B1", "--", server.data_path]).check().stdout.splitlines()
        fields = out[-1].split() if len(out) > 1 else []
        return int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else None

    # -- point-in-time restores ---------------------------------------------------------------

    def _target(self, target: datetime | str, timezone: str) -> datetime:
        from core import pitr  # imported when used: core.pitr imports core.backups' modules

        return pitr.parse_target(target, timezone) if isinstance(target, str) else target

    def restore_to_time_plan(
        self, customer: str, target: datetime | str, *, timezone: str = "UTC"
    ) -> RestorePlan:
        """For the restore modal and the shell, before anything happens: what a restore of the
        customer's database to ``target`` (``--to``: ISO 8601 with an offset or ``Z``, else in
        ``timezone``, TIMEZONE) would do (``RestorePlan.lines()``: the target, the window, the
        base backup, the WAL to replay, the disk needed against the disk free). Reads only.
        A restore that cannot be done raises ``core.pitr.Refused`` (a DbopsError: its message
        says why, its hint what to do)."""
        from core import pitr

        c, server, runner = self._where(customer)
        when = self._target(target, timezone)
        return pitr.plan_restore(runner, server, c.database, when, now=self.clock())

    def restore_to_time(
        self,
        customer: str,
        target: datetime | str,
        typed_name: str,
        actor: str,
        *,
        timezone: str = "UTC",
    ) -> RestoreResult:
        """Restore ``customer``'s database as it was at ``target`` (``/db restore acme --to
        T``), under the ``restore:<customer>`` lock: the plan first (a refusal is a
        ``restore.refused`` event and a DbopsError saying why and what to do; nothing is
        changed), then ``core.pitr.restore_to_time`` (the server's backup set restored into a
        scratch instance recovered to T, the database dumped from it as the customer's own
        role, the dump kept among the customer's backups with ``"source": "pitr"``, the
        scratch instance removed), then the safe swap of :meth:`restore` from that dump.
        ``typed_name`` must be the customer's name exactly. The result's ``target`` and
        ``pitr`` say where it came from."""
        validate_name(customer)
        when = self._target(target, timezone)
        if typed_name.strip() != customer:
            record(
                self.events,
                "restore.refused",
                customer,
                {"reason": "typed name does not match", "target": when.isoformat()},
                actor=actor,
            )
            raise DbopsError(
                f"the name typed does not match {customer!r}; nothing was restored.",
                hint="Type the customer's name exactly to confirm.",
            )
        c, server, runner = self._where(customer)
        with self._locked(f"restore:{c.name}", actor, f"a restore of {c.name}"):
            dump = self._pitr_dump(c, server, runner, when, actor)
            result = self._restore(c, server, runner, dump.stamp, actor)
        return replace(result, target=dump.target, pitr=dump.as_json())

    def _pitr_dump(
        self, c: Customer, server: Server, runner: Runner, when: datetime, actor: str
    ) -> PitrDump:
        from core import pitr

        ctx = {"server": server.name, "database": c.database, "target": when.isoformat()}
        try:
            dump = pitr.restore_to_time(
                runner,
                server,
                customer=c.name,
                database=c.database,
                role=c.role,
                target=when,
                now=self.clock(),
            )
        except pitr.Refused as exc:
            record(
                self.events,
                "restore.refused",
                c.name,
                {**ctx, "reason": exc.message[:300]},
                actor=actor,
            )
            raise
        except BaseException as exc:
            error = exc.message if isinstance(exc, DbopsError) else type(exc).__name__
            record(
                self.events,
                "restore.failed",
                c.name,
                {**ctx, "step": "pitr", "error": error[:300], "original": "untouched"},
                actor=actor,
            )
            if not isinstance(exc, Exception):
                raise
            raise RestoreFailed(
                f"the restore of {c.name} to {when.isoformat()} failed before anything was "
                f"swapped: {error[:250]} The customer's database is untouched.",
                step="pitr",
                original="untouched",
            ) from (None if isinstance(exc, DbopsError) else exc)
        record(self.events, "restore.pitr_dumped", c.name, {**ctx, **dump.as_json()}, actor=actor)
        return dump

    def restore(
        self, customer: str, backup: str | None, typed_name: str, actor: str
    ) -> RestoreResult:
        """Restore ``customer`` from ``backup`` (the modal's choice; None: the preview's default).

        ``typed_name`` must be the customer's name exactly. Each step is an event
        ``restore.step`` (``RESTORE_STEPS``); a failure of any kind is ``restore.failed`` and a
        RestoreFailed saying whether the customer's database was untouched or swapped back. The
        old database is kept, renamed ``<db>_pre_<UTC time>``, with connections off.

        The events are written best-effort (storage.spool): an event log that is down never
        stops a restore half-way; what it could not take is stored when it is back, and
        ``recorded`` on the result or the error says so.
        """
        validate_name(customer)
        if typed_name.strip() != customer:
            record(
                self.events,
                "restore.refused",
                customer,
                {"reason": "typed name does not match", "backup": backup},
                actor=actor,
            )
            raise DbopsError(
                f"the name typed does not match {customer!r}; nothing was restored.",
                hint="Type the customer's name exactly to confirm.",
            )
        c, server, runner = self._where(customer)
        with self._locked(f"restore:{c.name}", actor, f"a restore of {c.name}"):
            return self._restore(c, server, runner, backup, actor)

    def _restore(
        self, c: Customer, server: Server, runner: Runner, backup: str | None, actor: str
    ) -> RestoreResult:
        t0 = time.monotonic()
        now = self.clock()
        info = self._pick(
            c.name, read_backups(runner, server, c.name), backup, prefer_verified=True
        )
        suffix = now.strftime("%Y%m%d_%H%M%S")
        db = validate_name(c.database, "database")
        names = _SwapNames(
            db=db,
            new=_short_name(db, f"restore_{suffix}"),
            old=_short_name(db, f"pre_{suffix}"),
            failed=_short_name(db, f"failed_{suffix}"),
        )
        new, old = names.new, names.old
        ctx = {"server": server.name, "database": db, "backup": info.stamp}
        steps: list[str] = []
        kept: list[str] = []  # events of this restore the log could not take yet (spooled)

        def note(kind: str, **payload: Any) -> None:
            if not record(self.events, kind, c.name, {**ctx, **payload}, actor=actor):
                kept.append(kind)

        def step(name: str, **payload: Any) -> None:
            steps.append(name)
            note("restore.step", step=name, **payload)

        current = "check"
        swapped = False
        allow_before = True
        try:
            note("restore.started", new_database=new, keep_as=old)
            allow_before = self._allows_connections(runner, server, db)
            seen = _inspect(runner, info)
            if seen.problem is not None:
                raise DbopsError(seen.problem)
            expected = seen.counts
            if expected is None:
                raise DbopsError(f"backup {info.stamp} has no row counts to verify a restore by.")
            step("checked", sha256=info.sha256)
            current = "create"
            _create_database(runner, server, new, owner=c.role, like=db)
            step("created", new_database=new)
            current = "pg_restore"
            failed = _pg_restore(runner, server, info.dump, new, c.role)
            if failed is not None:
                raise DbopsError(failed)
            self._failpoint("restore.after_pg_restore")
            step("restored")
            current = "verify"
            found = _restored_counts(runner, server, new, c.role)
            mismatches = compare_counts(expected, found)
            if mismatches:
                raise DbopsError("row counts differ after restore: " + "; ".join(mismatches[:5]))
            step("verified", tables=len(found), rows=sum(found.values()))
            current = "analyze"
            # pg_restore leaves no planner statistics and no vacuum on record: without this the
            # customer's first queries are planned blind and last_vacuum reads unknown.
            _analyze_as_owner(runner, server, new, c.role)
            step("analyzed")
            current = "settings"
            self._copy_database_settings(runner, server, db, new)
            step("settings_copied")
            current = "end_connections"
            self._end_connections(runner, server, db)
            step("connections_ended")
            current = "swap"
            self._swap(runner, server, db, old, new)
            swapped = True
            step("swapped", kept_as=old)
            current = "pgbouncer"
            self._failpoint("restore.after_swap")
            reloaded = self._reload_pgbouncer(runner, server)
            if reloaded:
                step("pgbouncer_reloaded")
            current = "check_after"
            run_sql(runner, server, "SELECT 1", dbname=db)
        except BaseException as exc:
            # Whatever stopped it (an SSH error, a bug, an interrupt): put the customer's
            # database back first, then say so.
            original = self._settle(runner, server, names, allow_before, swapped)
            if isinstance(exc, DbopsError):
                error = exc.message
            else:
                error = f"an unexpected error ({type(exc).__name__})."
                log.error("restore of %s failed at %s", c.name, current, exc_info=exc)
            note("restore.failed", step=current, error=error[:300], original=original)
            if not isinstance(exc, Exception):
                raise
            raise RestoreFailed(
                f"the restore of {c.name} from {info.stamp} failed at {current}: "
                f"{error[:250]} The customer's database is {original}.",
                step=current,
                original=original,
                recorded=not kept or caught_up(self.events),
            ) from (None if isinstance(exc, DbopsError) else exc)
        took = time.monotonic() - t0
        result = RestoreResult(
            c.name,
            server.name,
            db,
            info.stamp,
            old,
            len(found),
            sum(found.values()),
            took,
            steps,
            reloaded,
        )
        done = result.as_json()
        del done["recorded"]  # known only once this event is written or kept
        note("restore.done", **done)
        return replace(result, recorded=not kept or caught_up(self.events))

    def _copy_database_settings(self, runner: Runner, server: Server, db: str, new: str) -> None:
        """CONNECT grants, connection limit and per-database settings of ``db`` onto ``new``:
        they belong to the database object, which a restore does not carry over."""
        script = sql.SQL(
            """
DO $dbops$
DECLARE r record; acl aclitem[];
BEGIN
  SELECT datacl INTO acl FROM pg_catalog.pg_database WHERE datname = {old_l};
  IF acl IS NOT NULL THEN
    EXECUTE pg_catalog.format('REVOKE ALL ON DATABASE %I FROM PUBLIC', {new_l});
    FOR r IN SELECT a.grantee, a.privilege_type, a.is_grantable
             FROM pg_catalog.aclexplode(acl) a LOOP
      EXECUTE pg_catalog.format('GRANT %s ON DATABASE %I TO %s%s', r.privilege_type, {new_l},
        CASE WHEN r.grantee = 0 THEN 'PUBLIC'
             ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(r.grantee)) END,
        CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
  ELSE
    EXECUTE pg_catalog.format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC', {new_l});
  END IF;
  EXECUTE pg_catalog.format('ALTER DATABASE %I CONNECTION LIMIT %s', {new_l},
    (SELECT datconnlimit FROM pg_catalog.pg_database WHERE datname = {old_l}));
  FOR r IN SELECT s.setrole, pg_catalog.split_part(c, '=', 1) AS name,
                  pg_catalog.substr(c, pg_catalog.strpos(c, '=') + 1) AS value
           FROM pg_catalog.pg_db_role_setting s
           JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase,
                pg_catalog.unnest(s.setconfig) AS c
           WHERE d.datname = {old_l} LOOP
    IF r.setrole = 0 THEN
      EXECUTE pg_catalog.format('ALTER DATABASE %I SET %I = %L', {new_l}, r.name, r.value);
    ELSE
      EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I SET %I = %L',
        pg_catalog.pg_get_userbyid(r.setrole), {new_l}, r.name, r.value);
    END IF;
  END LOOP;
END
$dbops$
"""
        ).format(old_l=sql.Literal(db), new_l=sql.Literal(new))
        run_sql(runner, server, script)

    @staticmethod
    def _end_connections(runner: Runner, server: Server, db: str) -> None:
        """Close ``db`` to new sessions and end the ones it has (waiting until they are gone)."""
        close = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(_ident(db))
        # Committed first (psql runs each statement in its own transaction): from then on no
        # session can arrive, so the loop below only has to wait for the ones it ended.
        script = sql.SQL(
            """
DO $dbops$
DECLARE remaining int;
BEGIN
  FOR i IN 1..{tries} LOOP
    -- pg_stat_activity is a snapshot held for the transaction: take a fresh one each time.
    PERFORM pg_catalog.pg_stat_clear_snapshot();
    PERFORM pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
      WHERE datname = {db_l} AND pid <> pg_catalog.pg_backend_pid();
    PERFORM pg_catalog.pg_stat_clear_snapshot();
    SELECT pg_catalog.count(*) INTO remaining FROM pg_catalog.pg_stat_activity
      WHERE datname = {db_l} AND pid <> pg_catalog.pg_backend_pid();
    IF remaining = 0 THEN RETURN; END IF;
    PERFORM pg_catalog.pg_sleep(0.02);
  END LOOP;
  RAISE EXCEPTION 'sessions on % did not end within {secs} s', {db_l};
END
$dbops$
"""
        ).format(
            db_l=sql.Literal(db),
            tries=sql.SQL(str(SESSIONS_END_S * 50)),
            secs=sql.SQL(str(SESSIONS_END_S)),
        )
        run_sql(runner, server, [close, script])

    def _swap(self, runner: Runner, server: Server, db: str, old: str, new: str) -> None:
        """Both renames in one transaction: either both happen or neither does."""
        statements: list[str | sql.Composable] = [
            "BEGIN",
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(db), _ident(old)),
        ]
        if "restore.between_renames" in self.failpoints:
            # An error after the first rename, inside the transaction: what a crash, a lost
            # connection or a conflicting session there would do.
            statements.append("SELECT dbops_failpoint_between_renames()")
        statements += [
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(new), _ident(db)),
            "COMMIT",
        ]
        run_sql(runner, server, statements)

    @staticmethod
    def _allows_connections(runner: Runner, server: Server, db: str) -> bool:
        found = sql_json(
            runner,
            server,
            sql.SQL(
                "SELECT pg_catalog.to_json(datallowconn) FROM pg_catalog.pg_database"
                " WHERE datname = {}"
            ).format(sql.Literal(db)),
        )
        if found is None:
            raise NotFound(f"there is no database {db} on {server.name} to restore over.")
        return bool(found)

    def _settle(
        self, runner: Runner, server: Server, n: _SwapNames, allow_before: bool, swapped: bool
    ) -> str:
        """After a failure: put the customer's database back as it was; say what was done."""
        db, old, new = n.db, n.old, n.new
        try:
            names = set(
                sql_json(
                    runner,
                    server,
                    sql.SQL(
                        "SELECT COALESCE(pg_catalog.json_agg(datname), '[]')"
                        " FROM pg_catalog.pg_database WHERE datname IN ({}, {}, {})"
                    ).format(sql.Literal(db), sql.Literal(old), sql.Literal(new)),
                )
                or []
            )
            if old in names and db in names:
                # The swap committed (whatever was reported): swap back.
                failed = n.failed
                self._end_connections(runner, server, db)
                run_sql(
                    runner,
                    server,
                    [
                        "BEGIN",
                        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                            _ident(db), _ident(failed)
                        ),
                        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(old), _ident(db)),
                        "COMMIT",
                    ],
                )
                new, outcome = failed, "swapped back"
            else:
                outcome = "untouched"
            if allow_before and db in names:
                run_sql(
                    runner,
                    server,
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(_ident(db)),
                )
            if new in names or outcome == "swapped back":
                _drop_database(runner, server, new)
            if swapped or outcome == "swapped back":
                self._reload_pgbouncer(runner, server)
            return outcome
        except Exception as exc:
            if isinstance(exc, DbopsError):
                error = exc.message
            else:
                error = f"an unexpected error ({type(exc).__name__})"
                log.error("putting %s back on %s failed", db, server.name, exc_info=exc)
            record(
                self.events,
                "restore.rollback_failed",
                db,
                {"server": server.name, "error": error[:300], "new": new, "old": old},
                actor="dbops",
            )
            return (
                f"in an UNKNOWN state (putting it back failed: {error[:150]}); "
                f"check {server.name} by hand for {db}, {old} and {new}"
            )

    @staticmethod
    def _reload_pgbouncer(runner: Runner, server: Server) -> bool:
        if not server.pgbouncer_ini:
            return False
        runner.run(server.argv(server.pgbouncer_reload_command)).check()
        return True


@dataclass(frozen=True)
class _SwapNames:
    db: str  # the customer's database
    new: str  # restored into, then renamed to db
    old: str  # what db becomes: kept
    failed: str  # what a restored database is renamed to when swapped back
