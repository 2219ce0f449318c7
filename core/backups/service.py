"""The backup service: the nightly run, backups taken by hand, restore tests, and the
best-effort events and backup locks around them."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from core.alerts import HEALTH_SEVERITY, Alert, dedupe_key
from core.backups.common import (
    GLOBALS,
    LOCK_DEADLINE_S,
    LOCK_LEASE,
    RETRY_AFTER_S,
    Verdict,
    parse_stamp,
    parse_time,
    utcnow,
)
from core.backups.dump import NotEnoughSpace, _error_text, write_backup, write_globals
from core.backups.listing import BackupInfo, Verification, read_backups
from core.backups.locks import _Held
from core.backups.retention import _remove_backup, plan_retention
from core.backups.verify import verify_backup
from core.customers import Customer, get_customer, list_customers
from core.errors import DbopsError, NotFound, Unreachable
from core.fleet import Fleet, Server
from core.remote import FleetAccess, Runner, RunnerPool
from storage.db import run_inline, run_with_deadline, runs_inline
from storage.events import EventLog, EventLogUnavailable, is_outage
from storage.models_billing import LockBusy, acquire_lock, release_lock
from storage.spool import flush_spool, record, spool_for

log = logging.getLogger("core.backups")

# The nightly pgBackRest backup of a server is skipped when its newest set ended less than this
# long before the run (a second run the same night, by hand or a catch-up, adds no second set).
PHYSICAL_MIN_GAP = timedelta(hours=20)
# The physical restore test runs weekly, on the full backup's day (``[backups]
# full_backup_day``, UTC: the week's new full set is what it restores), when a server's last
# one is older than this.
PHYSICAL_TEST_EVERY = timedelta(days=6, hours=12)
# Where the physical backups' outcomes stand among a run's (``BackupOutcome.customer``).
PHYSICAL = "_pgbackrest"


# --- the service ----------------------------------------------------------------------------------


def is_infrastructure(exc: BaseException) -> bool:
    """A failure of what a backup goes through (SSH, the event log, dbops' own database), not
    of the backup itself: worth one retry later in the run. A missing database, a failed
    pg_dump or a full disk is not: it would fail the same way again."""
    if isinstance(exc, NotEnoughSpace):
        return False
    return isinstance(exc, Unreachable | EventLogUnavailable) or is_outage(exc)


@dataclass(frozen=True)
class BackupOutcome:
    customer: str
    server: str
    ok: bool
    backup: str | None = None
    size_bytes: int | None = None
    duration_s: float = 0.0
    error: str | None = None
    pruned: tuple[str, ...] = ()
    # A failure is "crit"; ``infrastructure`` when SSH or the event log failed, not the backup
    # (what the nightly run retries once); ``attempts`` counts that retry.
    verdict: Verdict = "ok"
    infrastructure: bool = False
    attempts: int = 1
    space: Mapping[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "ok": self.ok,
            "verdict": self.verdict,
            "backup": self.backup,
            "size_bytes": self.size_bytes,
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
            "infrastructure": self.infrastructure,
            "attempts": self.attempts,
            "pruned": list(self.pruned),
            "space": dict(self.space) if self.space is not None else None,
        }


@dataclass(frozen=True)
class BackupRun:
    started_at: datetime
    wall_s: float
    parallel: bool
    outcomes: list[BackupOutcome]
    globals: list[BackupOutcome]
    # Events the log could not take by the end of the run (kind, subject): kept in the spool
    # (storage.spool), stored when the log is back, by its recovery, the next run or the next
    # flush_unrecorded(). Everything the spool of this log holds, the run's or not.
    unrecorded: list[tuple[str, str | None]] = field(default_factory=list)
    # The pgBackRest base backup of each server that archives its WAL (``customer`` is
    # PHYSICAL, ``backup`` the set's label; ok with no label when skipped as recent enough).
    physical: list[BackupOutcome] = field(default_factory=list)

    @property
    def physical_failed(self) -> list[BackupOutcome]:
        return [o for o in self.physical if not o.ok]

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failed(self) -> list[BackupOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def retried(self) -> list[BackupOutcome]:
        return [o for o in [*self.outcomes, *self.globals] if o.attempts > 1]

    def as_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(),
            "wall_s": round(self.wall_s, 3),
            "parallel": self.parallel,
            "total": len(self.outcomes),
            "ok": self.ok,
            "failed": [o.as_json() for o in self.failed],
            "retried": [o.customer for o in self.retried],
            "unrecorded": [list(u) for u in self.unrecorded],
            "outcomes": [o.as_json() for o in self.outcomes],
            "globals": [g.as_json() for g in self.globals],
            "physical": [p.as_json() for p in self.physical],
            "physical_failed": [p.server for p in self.physical_failed],
        }


@dataclass(frozen=True)
class VerifyOutcome:
    customer: str
    server: str
    backup: str | None
    verification: Verification

    def alert(self) -> Alert:
        """For the incident desk: firing when the test failed, resolved when it passed."""
        v = self.verification
        # A physical restore test (customer ""): about the server's pgBackRest set.
        customer = self.customer or None
        owner = f"{self.customer}'s" if customer else f"{self.server}'s pgBackRest"
        where = f"{owner} backup {self.backup or '(none)'}"
        return Alert(
            status="firing" if v.verdict == "crit" else "resolved",
            kind="check",
            dedupe_key=dedupe_key(
                "check", server=self.server, customer=customer, check="backup_verified"
            ),
            severity=HEALTH_SEVERITY.get("backup_verified", "P2"),
            title=f"backup_verified critical on {customer or self.server}: {v.detail}"[:200],
            source="health",
            alertname="backup_verified",
            server=self.server,
            customer=customer,
            detail=f"{where}: {v.detail}"[:500],
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "server": self.server,
            "backup": self.backup,
            **self.verification.as_json(),
        }


class BackupService(FleetAccess):
    """Backups and restore tests for the fleet, with the event and lock glue they share;
    :class:`core.backups.Backups` adds restores."""

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        runners: RunnerPool | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        on_alert: Callable[[Alert], object] | None = None,
    ) -> None:
        self.engine = engine
        self.events = events
        self._init_fleet_access(fleet, runners)
        self.clock = clock
        self.on_alert = on_alert
        self.failpoints: set[str] = set()
        self.retry_after_s = RETRY_AFTER_S
        self.lock_deadline_s = LOCK_DEADLINE_S
        self.sleep: Callable[[float], object] = time.sleep  # a test seam, as clock is
        # The physical restore tests the last verify_all ran (weekly: often none).
        self.last_physical_tests: list[VerifyOutcome] = []
        # Backup locks (name, owner) whose release failed (dbops' database down): released
        # once it answers, not left to their lease.
        self._kept_locks: list[tuple[str, str]] = []
        self._kept_locks_lock = threading.Lock()

    # -- events, best effort ---------------------------------------------------------------------

    def _note(self, kind: str, subject: str | None, payload: Mapping[str, Any], actor: str) -> bool:
        """Append an event (True), or, when the log is down, keep it in the log's spool
        (storage.spool.record: on disk in production) to be stored when it is back (False): a
        backup that was taken stays taken whatever the log does, and its record survives the
        process. An event the log refuses for its own sake is logged, not kept (False).

        Each event carries a source_id and the time it happened, given before the first try,
        so one stored by an append that timed out, or by a flush that died before forgetting
        it, is not stored twice, nor with the time of the flush."""
        return record(
            self.events,
            kind,
            subject,
            payload,
            actor=actor,
            source_id=f"backups:{uuid.uuid4().hex}",
        )

    def _record(self, kind: str, subject: str, payload: dict[str, Any]) -> None:
        # The records of the commands this class's own runners run: never the reason a command
        # that ran is reported as failed.
        self._note(kind, subject, payload, "dbops")

    def flush_unrecorded(self) -> list[tuple[str, str | None]]:
        """Store what the spool of this event log holds (events kept while the log was down,
        this object's or any other's, this process's or one that died), oldest first; returns
        (kind, subject) of those still kept (the log is still down), oldest first."""
        flush_spool(self.events)
        return self._still_kept()

    def _still_kept(self) -> list[tuple[str, str | None]]:
        return [(e.kind, e.subject) for e in spool_for(self.events.engine).pending()]

    def _release_kept_locks(self) -> None:
        """Release the backup locks a failed release left behind (best effort: those that
        still cannot be released are kept for the next try)."""
        with self._kept_locks_lock:
            kept, self._kept_locks = self._kept_locks, []
        for i, (name, owner) in enumerate(kept):
            try:
                self._in_time(functools.partial(release_lock, self.engine, name, owner))
            except Exception:
                with self._kept_locks_lock:
                    self._kept_locks[:0] = kept[i:]
                return

    def _in_time(self, work: Callable[[], None]) -> None:
        """``work`` against dbops' database, given up after ``lock_deadline_s``
        (storage.db.DeadlineExceeded, an outage by ``is_infrastructure``)."""
        run = run_inline if runs_inline(self.engine) else run_with_deadline
        run(lambda _attempt: work(), self.lock_deadline_s)

    @contextlib.contextmanager
    def _backup_lock(self, customer: str, actor: str) -> Iterator[None]:
        """The lock ``backup:<customer>`` around one backup, each way given ``lock_deadline_s``.
        A release that fails (dbops' database down or silent at that moment) does not fail the
        backup, which has happened; the lock is kept and released when the database answers
        (``_release_kept_locks``: before the nightly run's retry pass and at its end), not left
        to refuse every backup of that customer for its lease (LOCK_LEASE). So is an acquire
        that failed: its INSERT may have committed before the connection went."""
        name, owner = f"backup:{customer}", f"backup:{customer}:{uuid.uuid4().hex}"
        try:
            self._in_time(
                lambda: acquire_lock(self.engine, name, owner, lease=LOCK_LEASE, holder=actor)
            )
        except LockBusy as exc:
            since = f" since {exc.since:%H:%M} UTC" if exc.since else ""
            raise DbopsError(
                f"a backup of {customer} is already running"
                f" (by {exc.holder or 'another process'}{since}).",
                hint="Wait for it to finish; `/db log` shows its progress.",
            ) from None
        except Exception:
            with self._kept_locks_lock:
                self._kept_locks.append((name, owner))
            raise
        try:
            yield
        finally:
            try:
                self._in_time(lambda: release_lock(self.engine, name, owner))
            except Exception as exc:
                log.warning(
                    "the lock of a backup of %s was not released (%s); released when dbops'"
                    " database answers again",
                    customer,
                    type(exc).__name__,
                )
                with self._kept_locks_lock:
                    self._kept_locks.append((name, owner))

    def _failpoint(self, name: str) -> None:
        if name in self.failpoints:
            raise DbopsError(f"failpoint {name} (a test stopped here on purpose).")

    def _where(self, customer: str) -> tuple[Customer, Server, Runner]:
        c = get_customer(self.engine, customer)
        server = self.fleet.server(c.server)
        return c, server, self.runners.get(server.name)

    def _locked(self, name: str, actor: str, what: str) -> _Held:
        return _Held(self.engine, name, actor, what)

    # -- listing and taking ----------------------------------------------------------------------

    def list_backups(self, customer: str) -> list[BackupInfo]:
        """The customer's backups on its server, newest first (complete, failed and unfinished)."""
        c, server, runner = self._where(customer)
        return read_backups(runner, server, c.name)

    def newest_verified(self, customer: str) -> BackupInfo | None:
        """The newest complete backup whose restore test passed: what a restore should use."""
        return next((b for b in self.list_backups(customer) if b.complete and b.verified), None)

    def take_backup(self, customer: str, actor: str, *, prune: bool = False) -> BackupInfo:
        """Back up one customer now (``/db backup acme``). Retention is the nightly run's job
        (``prune`` applies it here too): a backup taken by hand before a risky change must not
        make the night's disappear, nor the other way round, before the policy says so."""
        c, server, runner = self._where(customer)
        self._release_kept_locks()
        outcome = self._backup_one(c, server, runner, actor, prune=prune)
        if not outcome.ok:
            raise DbopsError(f"the backup of {c.name} failed: {outcome.error}")
        found = [b for b in read_backups(runner, server, c.name) if b.stamp == outcome.backup]
        if not found:
            raise NotFound(f"the new backup {outcome.backup} of {c.name} is not on {server.name}.")
        return found[0]

    def _backup_one(
        self,
        c: Customer,
        server: Server,
        runner: Runner,
        actor: str,
        *,
        prune: bool,
        attempt: int = 1,
    ) -> BackupOutcome:
        """One customer's backup; any failure (of any kind) is recorded and returned, not
        raised, so a run goes on to the next customer."""
        started = time.monotonic()
        try:
            with self._backup_lock(c.name, actor):
                status = write_backup(runner, server, c.name, c.database, now=self.clock())
                pruned = self._prune(runner, server, c.name, actor) if prune else []
        except Exception as exc:
            return self._failed(c.name, server.name, c.database, exc, started, actor, attempt)
        took = time.monotonic() - started
        stamp = status["path"].rsplit("/", 1)[-1]
        self._note(
            "backup.taken",
            c.name,
            {
                "server": server.name,
                "database": c.database,
                "backup": stamp,
                "size_bytes": status["size_bytes"],
                "sha256": status["sha256"],
                "tables": status["tables"],
                "rows": status["rows"],
                "duration_ms": int(took * 1000),
                "pruned": pruned,
                "attempt": attempt,
                "space": status["space"],
            },
            actor,
        )
        return BackupOutcome(
            c.name,
            server.name,
            True,
            stamp,
            status["size_bytes"],
            took,
            pruned=tuple(pruned),
            attempts=attempt,
            space=status["space"],
        )

    def _failed(
        self,
        customer: str,
        server: str,
        database: str | None,
        exc: Exception,
        started: float,
        actor: str,
        attempt: int,
    ) -> BackupOutcome:
        infra = is_infrastructure(exc)
        if not isinstance(exc, DbopsError) and not infra:
            log.error("backup of %s on %s failed", customer, server, exc_info=exc)
        space = exc.space.as_json() if isinstance(exc, NotEnoughSpace) else None
        error = _error_text(exc)
        payload: dict[str, Any] = {"server": server, "error": error, "attempt": attempt}
        if database is not None:
            payload["database"] = database
        payload.update(infrastructure=infra, space=space)
        if customer == GLOBALS:
            self._note("backup.globals_failed", server, payload, actor)
        else:
            self._note("backup.failed", customer, payload, actor)
        return BackupOutcome(
            customer,
            server,
            False,
            duration_s=time.monotonic() - started,
            error=error,
            verdict="crit",
            infrastructure=infra,
            attempts=attempt,
            space=space,
        )

    def _prune(self, runner: Runner, server: Server, customer: str, actor: str) -> list[str]:
        policy = self.fleet.backups
        _, delete = plan_retention(
            read_backups(runner, server, customer),
            policy.keep_daily,
            policy.keep_weekly,
            self.clock(),
        )
        for b in delete:
            _remove_backup(runner, server, customer, b.stamp)
        return [b.stamp for b in delete]

    def backup_globals(self, server_name: str, actor: str, *, attempt: int = 1) -> BackupOutcome:
        started = time.monotonic()
        try:
            server = self.fleet.server(server_name)
            runner = self.runners.get(server.name)
            status = write_globals(runner, server, now=self.clock())
            pruned = self._prune(runner, server, GLOBALS, actor)
        except Exception as exc:
            return self._failed(GLOBALS, server_name, None, exc, started, actor, attempt)
        stamp = status["path"].rsplit("/", 1)[-1]
        took = time.monotonic() - started
        self._note(
            "backup.globals",
            server.name,
            {"backup": stamp, "size_bytes": status["size_bytes"], "pruned": pruned},
            actor,
        )
        return BackupOutcome(
            GLOBALS,
            server.name,
            True,
            stamp,
            status["size_bytes"],
            took,
            pruned=tuple(pruned),
            attempts=attempt,
        )

    def backup_all(self, *, parallel: bool = True, actor: str = "scheduler") -> BackupRun:
        """The nightly run: every active customer's database, plus globals, on every server.

        Servers run side by side (``parallel``), each server's databases one after another so a
        server's disk and CPU serve one pg_dump at a time. Customers are independent: a failure
        of any kind is recorded (``backup.failed``) and the run goes on to the next customer;
        the result lists the failures.

        The retry: a failure of the infrastructure rather than of the backup (SSH, the event
        log, the database dbops keeps its state in: ``is_infrastructure``) is retried once,
        in the same run, after the first pass over every server has finished and then
        ``retry_after_s`` (RETRY_AFTER_S) more seconds have passed; the second pass runs the
        same way (servers side by side), globals too. Events the log could not take are kept
        in its spool (storage.spool, on disk in production: they outlive the process) and
        stored once it is back (before the retry pass, at the end of the run, by the log's
        recovery, or by the next run); those still kept at the end are listed in
        ``BackupRun.unrecorded``. Backup locks whose release failed are released at the same
        moments (``_backup_lock``).
        """
        started_at, t0 = self.clock(), time.monotonic()
        self._release_kept_locks()
        self.flush_unrecorded()
        customers = [c for c in list_customers(self.engine) if c.status == "active"]
        by_server: dict[str, list[Customer]] = {s.name: [] for s in self.fleet.servers}
        for c in customers:
            by_server.setdefault(c.server, []).append(c)

        servers = {s.name for s in self.fleet.servers}
        first = self._pass(by_server, servers, parallel, actor, attempt=1)
        again = {
            name: [c for c in mine if first[c.name].infrastructure]
            for name, mine in by_server.items()
        }
        globals_again = {
            name for name in by_server if (g := first.get(f"{GLOBALS}@{name}")) and g.infrastructure
        }
        if any(again.values()) or globals_again:
            self.sleep(self.retry_after_s)
            self._release_kept_locks()
            self.flush_unrecorded()
            first.update(self._pass(again, globals_again, parallel, actor, attempt=2))

        outcomes = [first[c.name] for mine in by_server.values() for c in mine]
        glob = [first[f"{GLOBALS}@{name}"] for name in by_server if name in servers]
        physical = self.backup_physical_all(parallel=parallel, actor=actor, now=started_at)
        self._release_kept_locks()
        unrecorded = self.flush_unrecorded()
        run = BackupRun(
            started_at, time.monotonic() - t0, parallel, outcomes, glob, physical=physical
        )
        self._note(
            "backup.run",
            "backups",
            {
                "parallel": parallel,
                "total": len(outcomes),
                "ok": run.ok,
                "failed": [o.customer for o in run.failed],
                "retried": [o.customer for o in run.retried],
                "globals_failed": [g.server for g in glob if not g.ok],
                "pgbackrest": [p.server for p in physical if p.ok and p.backup],
                "pgbackrest_failed": [p.server for p in physical if not p.ok],
                "unrecorded": len(unrecorded),
                "wall_ms": int(run.wall_s * 1000),
            },
            actor,
        )
        run.unrecorded.extend(self._still_kept())  # the run's own record among them, if kept
        return run

    # -- pgBackRest: the nightly base backups -----------------------------------------------------

    def backup_physical_all(
        self, *, parallel: bool = True, actor: str = "scheduler", now: datetime | None = None
    ) -> list[BackupOutcome]:
        """The nightly run's base backup of every server that archives its WAL
        (``pgbackrest_config``), servers side by side: full on ``[backups] full_backup_day``,
        else differential, with ``retention_full`` / ``retention_diff`` (core.pitr.base_backup).
        Each is an event (``backup.pgbackrest``, ``backup.pgbackrest_failed``, subject the
        server); a failure is an outcome, not raised."""
        servers = [s for s in self.fleet.servers if s.pgbackrest_config]
        when = now or self.clock()

        def one(server: Server) -> BackupOutcome:
            return self._physical_one(server, when, actor)

        if parallel and len(servers) > 1:
            with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="pgbr") as pool:
                return list(pool.map(one, servers))
        return [one(s) for s in servers]

    def _physical_one(self, server: Server, now: datetime, actor: str) -> BackupOutcome:
        from core import pitr  # imported when used: core.pitr imports core.backups' modules

        policy = self.fleet.backups
        started = time.monotonic()
        kind = pitr.backup_type(now, policy.full_backup_day)
        try:
            runner = self.runners.get(server.name)
            newest = pitr.read_info(runner, server).backups
            if newest and now - newest[-1].stop < PHYSICAL_MIN_GAP:
                return BackupOutcome(PHYSICAL, server.name, True, duration_s=0.0)
            made = pitr.base_backup(
                runner,
                server,
                type=kind,
                retention_full=policy.retention_full,
                retention_diff=policy.retention_diff,
            )
        except Exception as exc:
            error = _error_text(exc)
            if not isinstance(exc, DbopsError):
                log.error("pgbackrest backup of %s failed", server.name, exc_info=exc)
            self._note(
                "backup.pgbackrest_failed",
                server.name,
                {"server": server.name, "type": kind, "error": error},
                actor,
            )
            return BackupOutcome(
                PHYSICAL,
                server.name,
                False,
                duration_s=time.monotonic() - started,
                error=error,
                verdict="crit",
                infrastructure=is_infrastructure(exc),
            )
        took = time.monotonic() - started
        self._note(
            "backup.pgbackrest",
            server.name,
            {
                "server": server.name,
                "type": made.type,
                "asked": kind,
                "backup": made.label,
                "size_bytes": made.size_bytes,
                "repo_bytes": made.repo_bytes,
                "duration_ms": int(took * 1000),
                "retention_full": policy.retention_full,
                "retention_diff": policy.retention_diff,
            },
            actor,
        )
        return BackupOutcome(PHYSICAL, server.name, True, made.label, made.repo_bytes, took)

    def _pass(
        self,
        by_server: Mapping[str, Sequence[Customer]],
        with_globals: set[str],
        parallel: bool,
        actor: str,
        *,
        attempt: int,
    ) -> dict[str, BackupOutcome]:
        """One pass of the nightly run: outcomes by customer name (``_globals@<server>``)."""

        def one_server(name: str) -> dict[str, BackupOutcome]:
            out: dict[str, BackupOutcome] = {}
            mine = by_server.get(name, [])
            started = time.monotonic()
            try:
                server = self.fleet.server(name)
                runner = self.runners.get(name)
            except Exception as exc:
                for c in mine:
                    out[c.name] = self._failed(
                        c.name, name, c.database, exc, started, actor, attempt
                    )
                if name in with_globals:
                    out[f"{GLOBALS}@{name}"] = self._failed(
                        GLOBALS, name, None, exc, started, actor, attempt
                    )
                return out
            for c in mine:
                out[c.name] = self._backup_one(
                    c, server, runner, actor, prune=True, attempt=attempt
                )
            if name in with_globals:
                out[f"{GLOBALS}@{name}"] = self.backup_globals(name, actor, attempt=attempt)
            return out

        names = [n for n in by_server if by_server[n] or n in with_globals]
        if parallel and len(names) > 1:
            with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="backup") as pool:
                results = list(pool.map(one_server, names))
        else:
            results = [one_server(n) for n in names]
        return {k: v for r in results for k, v in r.items()}

    # -- restore tests ---------------------------------------------------------------------------

    def verify(
        self, customer: str, backup: str | None = None, *, actor: str = "scheduler"
    ) -> VerifyOutcome:
        """Restore-test one backup (the newest complete one by default)."""
        c, server, runner = self._where(customer)
        backups = read_backups(runner, server, c.name)
        info = self._pick(c.name, backups, backup, prefer_verified=False)
        verification = verify_backup(runner, server, info, role=c.role, now=self.clock)
        outcome = VerifyOutcome(c.name, server.name, info.stamp, verification)
        self._report_verify(outcome, actor)
        return outcome

    def _report_verify(self, outcome: VerifyOutcome, actor: str) -> None:
        v = outcome.verification
        self.events.append(
            "backup.verified" if v.verdict != "crit" else "backup.verify_failed",
            outcome.customer,
            {"server": outcome.server, "backup": outcome.backup, **v.as_json()},
            actor=actor,
        )
        if self.on_alert is not None:
            self.on_alert(outcome.alert())

    def verify_all(self, *, parallel: bool = True, actor: str = "scheduler") -> list[VerifyOutcome]:
        """The scheduled restore test: each active customer's newest complete backup, servers
        side by side, one restore at a time per server. A customer with no complete backup
        gets a crit result (there is nothing that could be restored)."""
        customers = [c for c in list_customers(self.engine) if c.status == "active"]
        by_server: dict[str, list[Customer]] = {}
        for c in customers:
            by_server.setdefault(c.server, []).append(c)

        def one(c: Customer) -> VerifyOutcome:
            try:
                return self.verify(c.name, actor=actor)
            except DbopsError as exc:
                v = Verification(False, "crit", self.clock(), exc.message[:300])
                outcome = VerifyOutcome(c.name, c.server, None, v)
                self._report_verify(outcome, actor)
                return outcome

        def server_run(name: str) -> list[VerifyOutcome]:
            return [one(c) for c in by_server[name]]

        if parallel and len(by_server) > 1:
            with ThreadPoolExecutor(
                max_workers=len(by_server), thread_name_prefix="verify"
            ) as pool:
                results = list(pool.map(server_run, list(by_server)))
        else:
            results = [server_run(n) for n in by_server]
        # Weekly, the physical backups of the same servers (those that archive their WAL).
        self.last_physical_tests = self.verify_physical_all(
            servers=list(by_server), parallel=parallel, actor=actor
        )
        return [o for outs in results for o in outs]

    # -- pgBackRest: the weekly restore test ------------------------------------------------------

    def _last_physical_test(self, server: str) -> datetime | None:
        found = [
            e
            for kind in ("backup.verified", "backup.verify_failed")
            for e in self.events.query(subject=server, kind=kind, newest_first=True, limit=5)
            if e.payload.get("kind") == "physical"
        ]
        times = [parse_time(e.payload.get("verified_at")) for e in found]
        return max((t for t in times if t is not None), default=None)

    def verify_physical(self, server_name: str, *, actor: str = "scheduler") -> VerifyOutcome:
        """Restore-test the server's newest pgBackRest set now (core.pitr.physical_test),
        recorded as the dump tests are (``backup.verified`` / ``backup.verify_failed``, with
        ``"kind": "physical"``; subject the server) and, failed, an alert about the server's
        ``backup_verified``."""
        from core import pitr

        server = self.fleet.server(server_name)
        try:
            got = pitr.physical_test(self.runners.get(server.name), server)
        except Exception as exc:
            if not isinstance(exc, DbopsError):
                log.error("physical restore test on %s failed", server.name, exc_info=exc)
            got = pitr.PhysicalTest(server.name, None, False, _error_text(exc)[:300])
        v = Verification(got.ok, "ok" if got.ok else "crit", self.clock(), got.detail)
        outcome = VerifyOutcome("", server.name, got.backup, v)
        self.events.append(
            "backup.verified" if got.ok else "backup.verify_failed",
            server.name,
            {
                "server": server.name,
                "kind": "physical",
                "backup": got.backup,
                "databases": got.databases,
                "duration_ms": int(got.duration_s * 1000),
                **v.as_json(),
            },
            actor=actor,
        )
        if self.on_alert is not None:
            self.on_alert(outcome.alert())
        return outcome

    def verify_physical_all(
        self,
        *,
        servers: Sequence[str] | None = None,
        parallel: bool = True,
        actor: str = "scheduler",
        force: bool = False,
    ) -> list[VerifyOutcome]:
        """The weekly physical restore test: on the full backup's day, each archiving server (of
        ``servers``) whose last one is older than PHYSICAL_TEST_EVERY (or every one, any day,
        ``force``), side by side."""
        from core import pitr

        now = self.clock()
        if not force and pitr.backup_type(now, self.fleet.backups.full_backup_day) != "full":
            return []
        due = []
        for s in self.fleet.servers:
            if not s.pgbackrest_config or (servers is not None and s.name not in servers):
                continue
            last = None if force else self._last_physical_test(s.name)
            if last is None or now - last >= PHYSICAL_TEST_EVERY:
                due.append(s.name)

        def one(name: str) -> VerifyOutcome:
            return self.verify_physical(name, actor=actor)

        if parallel and len(due) > 1:
            with ThreadPoolExecutor(max_workers=len(due), thread_name_prefix="pgbr-test") as pool:
                return list(pool.map(one, due))
        return [one(n) for n in due]

    @staticmethod
    def _pick(
        customer: str, backups: Sequence[BackupInfo], stamp: str | None, *, prefer_verified: bool
    ) -> BackupInfo:
        complete = [b for b in backups if b.complete]
        if stamp is not None:
            parse_stamp(stamp)
            for b in backups:
                if b.stamp == stamp:
                    if not b.complete:
                        raise DbopsError(
                            f"backup {stamp} of {customer} is {b.state}; it cannot be restored.",
                            hint="Pick a complete one from `/db backups " + customer + "`.",
                        )
                    return b
            raise NotFound(
                f"no backup {stamp} of {customer}.",
                hint=f"`/db backups {customer}` lists them.",
            )
        if not complete:
            raise NotFound(
                f"{customer} has no complete backup.",
                hint=f"Take one with `/db backup {customer}`.",
            )
        if prefer_verified:
            for b in complete:
                if b.verified:
                    return b
        return complete[0]
