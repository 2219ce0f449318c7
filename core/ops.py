"""The operations the bot, the shell and the CLI call: parse -> Ops -> render.

One ``Ops`` per process holds the fleet, the customers' database, the event log and a pool of
runners (one SSH connection per server, reused). Every method returns plain data (dicts and
lists in the shapes of DESIGN.md); nothing here knows about Slack or terminals.

It also holds the measurement history (``trends``, core.capacity.Trends): ``report`` is the
health sweep, and keeps its figures; ``report``, ``servers`` and ``status`` carry each
server's disk runway from it; ``capacity_review`` and the ``*_chart`` methods read it (a chart
is a core.charts.Chart: its ``png`` bytes and ``title``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from core.capacity import Attachment, Trends, review_text
from core.customers import Customer, get_customer, list_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet
from core.health import ServerHealth, check_fleet
from core.health.backup_run import backup_run_check
from core.health.thresholds import Check
from core.names import not_found, validate_server_name
from core.remote import FleetAccess, RunnerPool
from core.report import build_report, customer_status
from core.windows import Covers
from storage.events import EventLog, StoredEvent

if TYPE_CHECKING:
    from core.charts import Chart
    from core.checklists import Checklist

log = logging.getLogger("dbops.ops")
_INCIDENT_NUMBER = re.compile(r"[0-9]{1,9}")
# Slash commands must be answered within 3 s; status gets most of that, the report more
# (it is posted after the ack, so its deadline is ours to choose).
STATUS_DEADLINE_S = 2.5
REPORT_DEADLINE_S = 10.0


class Ops(FleetAccess):
    """The fleet (``fleet``), the customers' database (``engine``), the event log and, built on
    first use, the runners: one SSH connection per server, every command an event."""

    events: EventLog

    def __init__(
        self,
        fleet: Fleet,
        engine: Engine,
        events: EventLog,
        runners: RunnerPool | None = None,
        *,
        tz: tzinfo | None = None,
    ) -> None:
        self.engine = engine
        self.events = events
        self._init_fleet_access(fleet, runners)
        self.trends = Trends(engine)
        # TIMEZONE: the backups' deadline is a time of day there. The runtime passes its
        # settings' zone; without one, the TIMEZONE variable (else the settings' default).
        self.tz = tz or ZoneInfo(os.environ.get("TIMEZONE") or "America/New_York")

    def close(self) -> None:
        with self._runners_lock:
            pool, self._runners = self._runners, None
        if pool is not None:
            pool.close()

    # -- reads -------------------------------------------------------------------------------

    def customer(self, name: str) -> Customer:
        return get_customer(self.engine, name)

    def customers(self) -> list[Customer]:
        return list_customers(self.engine)

    def status(
        self, name: str, *, deadline_s: float = STATUS_DEADLINE_S, now: datetime | None = None
    ) -> dict[str, Any]:
        """One customer's database, its server and the checks that matter, within the deadline."""
        customer = self.customer(name)
        runner = self.runners.get(customer.server)
        now = now or datetime.now(UTC)
        result = customer_status(
            self.fleet,
            customer,
            runner,
            deadline_s=deadline_s,
            now=now,
            trends=self.trends,
            maintenance=self.maintenance_covers(now),
        )
        result["plan"] = customer.plan
        return result

    def report(
        self,
        *,
        deadline_s: float = REPORT_DEADLINE_S,
        open_incidents: Sequence[Any] = (),
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """The fleet's report (DESIGN.md's Report JSON) with the fleet-wide checks: the backups'
        dead-man's switch (``backup_run``), which the health sweep turns into a P1. Every
        report is a sweep: its figures go into the measurement history (at ``now``)."""
        now = now or datetime.now(UTC)
        return build_report(
            self.fleet,
            self.customers(),
            self.runners,
            deadline_s=deadline_s,
            open_incidents=open_incidents,
            now=now,
            fleet_checks=self.fleet_checks(now),
            trends=self.trends,
            record=True,
            maintenance=self.maintenance_covers(now),
        )

    def maintenance_covers(self, now: datetime) -> Covers | None:
        """The maintenance windows covering now, for the report's ``maintenance`` entries;
        None when they cannot be read (the report goes on without them)."""
        try:
            return Covers.load(self.engine, now)
        except Exception as exc:
            log.warning("maintenance windows not read for the report: %s", type(exc).__name__)
            return None

    def fleet_checks(self, now: datetime | None = None) -> list[Check]:
        """Checks of the fleet as a whole: ``backup_run`` once armed (core.health.backup_run)."""
        try:
            found = backup_run_check(
                self.events, now or datetime.now(UTC), self.tz, self.fleet.backups.deadline
            )
        except Exception as exc:  # the event log down: the report goes on without it
            why = f"cannot read the event log ({type(exc).__name__})"
            return [Check("backup_run", "unknown", detail=why)]
        return [found] if found is not None else []

    def server_health(self, server: str, *, deadline_s: float) -> ServerHealth:
        """One server's checks now (an incident card's quick look: the last hour of its log)."""
        (health,) = check_fleet(
            self.fleet,
            list_customers(self.engine, server),
            self.runners,
            deadline_s=deadline_s,
            servers=[server],
            log_window=timedelta(hours=1),
        )
        return health

    def servers(
        self, *, deadline_s: float = 5.0, now: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Every server with its reachability, PostgreSQL state, customer count and runway."""
        report = build_report(
            self.fleet,
            self.customers(),
            self.runners,
            deadline_s=deadline_s,
            log_window=timedelta(minutes=5),
            now=now,
            trends=self.trends,
            maintenance=self.maintenance_covers(now or datetime.now(UTC)),
        )
        per_server: dict[str, int] = {}
        for db in report["databases"]:
            per_server[db["server"]] = per_server.get(db["server"], 0) + 1
        out = []
        for s in report["servers"]:
            bad = [c for c in s["checks"] if c["verdict"] != "ok"]
            out.append({**s, "customers": per_server.get(s["name"], 0), "problems": bad})
        return out

    # -- capacity --------------------------------------------------------------------------

    def capacity_review(self, now: datetime | None = None) -> dict[str, Any]:
        """The monthly capacity review's figures: servers by runway, customers by growth."""
        return self.trends.capacity_review(self.fleet, now or datetime.now(UTC), self.customers())

    def fleet_chart(self, now: datetime | None = None) -> Chart:
        """Every server's disk over 30 days with its runway projection (one PNG)."""
        from core.charts import fleet_disk_chart

        now = now or datetime.now(UTC)
        names = [s.name for s in self.fleet.servers]
        runways = {name: self.trends.runways(name, now) for name in names}
        return fleet_disk_chart(self.trends.history, names, now, runways=runways)

    def server_chart(self, name: str, now: datetime | None = None) -> Chart:
        """One server's data and backup paths over 30 days, with their runway projections."""
        from core.charts import disk_chart

        server = self.fleet.server(name)  # an unknown name is a NotFound with suggestions
        now = now or datetime.now(UTC)
        runways = self.trends.runways(server.name, now)
        return disk_chart(self.trends.history, server.name, now, runways=runways)

    def customer_chart(self, name: str, now: datetime | None = None) -> Chart:
        """A customer's database size and connections over 30 days."""
        from core.charts import customer_chart

        customer = self.customer(name)
        return customer_chart(self.trends.history, customer.name, now or datetime.now(UTC))

    def checklist_attachments(
        self, checklist: Checklist, now: datetime | None = None
    ) -> list[Attachment]:
        """What a checklist's posting carries besides its items (``attach`` in its file):
        ``capacity`` is the fleet's disk chart, with the review's figures as its comment."""
        now = now or datetime.now(UTC)
        out = []
        if "capacity" in checklist.attach:
            chart = self.fleet_chart(now)
            text = review_text(self.capacity_review(now))
            stamp = now.astimezone(UTC).strftime("%Y%m%d")
            out.append(Attachment(f"fleet-disk-{stamp}.png", chart.title, chart.png, text))
        return out

    def log(self, subject: str, *, limit: int = 20) -> list[StoredEvent]:
        """The newest events about a customer, a server or an incident (``inc-12`` or ``12``)."""
        if subject.isdigit() or subject.startswith("inc-"):
            number = subject.removeprefix("inc-")
            # ASCII digits only: str.isdigit() also accepts "¹" and other digits int() refuses.
            if not _INCIDENT_NUMBER.fullmatch(number):
                raise DbopsError(f"{subject[:40]!r} is not an incident id; use e.g. inc-12.")
            found = self.events.about([f"inc-{int(number)}"], limit=limit)
            if not found:
                raise NotFound(
                    f"no incident inc-{int(number)}.", hint="`/db incident list` shows them."
                )
            return found
        names = {c.name for c in self.customers()} | {s.name for s in self.fleet.servers}
        if subject not in names:
            validate_server_name(subject)  # a clear error for hostile text before the lookup
            raise not_found("customer or server", subject, names)
        return self.events.about([subject], limit=limit)
