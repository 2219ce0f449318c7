"""The `backup_run` check, the backups' dead-man's switch: the nightly run must report success
by a deadline.

Every nightly run ends with a ``backup.run`` event (``BackupService.backup_all``). By the
deadline (fleet.toml ``[backups] deadline``, default 06:00, in ``TIMEZONE``) there must be one
since the previous deadline that succeeded: no customer's dump failed, no server's globals, no
server's pgBackRest backup. Otherwise the ``backup_run`` check is crit: a fleet-wide check in
the report (``checks``), which the health sweep turns into a P1 alert (core.alerts) and the
incident desk into one incident that pages, the same incident on every sweep after (its
dedupe key), recovered by the first successful run.

A silent scheduler is what this catches, so it cannot wait for the run to say anything. It
is armed once dbops has had a whole night to run one: the event log holds something older
than a day before the deadline (a fresh install, a demo or a test is not paged at its first
06:00).
"""

from __future__ import annotations

from datetime import datetime, time, timedelta, tzinfo
from typing import Any

from core.health.thresholds import Check
from storage.events import EventLog, StoredEvent

CHECK = "backup_run"
RUN_EVENT = "backup.run"


def last_deadline(now: datetime, tz: tzinfo, at: time) -> datetime:
    """The newest deadline (``at`` in ``tz``) at or before ``now``."""
    local = now.astimezone(tz)
    today = datetime.combine(local.date(), at, tzinfo=tz)
    if today > local:
        today = datetime.combine(local.date() - timedelta(days=1), at, tzinfo=tz)
    return today


def run_failures(payload: dict[str, Any]) -> list[str]:
    """What a ``backup.run`` event says failed: customers, ``<server> globals``,
    ``<server> pgBackRest``."""
    out = [str(c) for c in payload.get("failed") or []]
    out += [f"{s} globals" for s in payload.get("globals_failed") or []]
    out += [f"{s} pgBackRest" for s in payload.get("pgbackrest_failed") or []]
    return out


def _armed(events: EventLog, since: datetime) -> bool:
    return bool(events.query(until=since, limit=1))


def backup_run_check(
    events: EventLog, now: datetime, tz: tzinfo, at: time = time(6, 0)
) -> Check | None:
    """``backup_run`` at ``now``: ok when a nightly run since the previous deadline succeeded,
    crit when none did by the newest deadline; None while not armed (see the module)."""
    deadline = last_deadline(now, tz, at)
    since = deadline - timedelta(days=1)
    runs: list[StoredEvent] = events.query(kind=RUN_EVENT, since=since, limit=200)
    good = [e for e in runs if not run_failures(e.payload)]
    shown = f"{at:%H:%M} {deadline.tzname() or ''}".strip()
    if good:
        last = good[-1]
        age = max(0, int((now - last.ts).total_seconds()))
        when = last.ts.astimezone(tz).strftime("%Y-%m-%d %H:%M")
        return Check(CHECK, "ok", age, detail=f"the nightly run at {when} succeeded")
    if not runs and not _armed(events, since):
        return None
    if runs:
        failed = run_failures(runs[-1].payload)
        when = runs[-1].ts.astimezone(tz).strftime("%Y-%m-%d %H:%M")
        detail = (
            f"no successful nightly backup run by {shown}: the run at {when} failed for "
            + ", ".join(failed[:10])
            + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
        )
    else:
        detail = (
            f"no nightly backup run has reported by {shown} (none since "
            f"{since.astimezone(tz):%Y-%m-%d %H:%M}): is the scheduler running?"
        )
    return Check(CHECK, "crit", None, detail=detail)
