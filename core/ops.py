"""The operations the bot, the shell and the CLI call: parse -> Ops -> render.

One ``Ops`` per process holds the fleet, the customers' database, the event log and a pool of
runners (one SSH connection per server, reused). Every method returns plain data (dicts and
lists in the shapes of DESIGN.md); nothing here knows about Slack or terminals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from core.customers import Customer, get_customer, list_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet
from core.names import not_found, validate_server_name
from core.remote import FleetAccess, RunnerPool
from core.report import build_report, customer_status
from storage.events import EventLog, StoredEvent

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
        self, fleet: Fleet, engine: Engine, events: EventLog, runners: RunnerPool | None = None
    ) -> None:
        self.engine = engine
        self.events = events
        self._init_fleet_access(fleet, runners)

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

    def status(self, name: str, *, deadline_s: float = STATUS_DEADLINE_S) -> dict[str, Any]:
        """One customer's database, its server and the checks that matter, within the deadline."""
        customer = self.customer(name)
        runner = self.runners.get(customer.server)
        result = customer_status(self.fleet, customer, runner, deadline_s=deadline_s)
        result["plan"] = customer.plan
        return result

    def report(
        self, *, deadline_s: float = REPORT_DEADLINE_S, open_incidents: Sequence[Any] = ()
    ) -> dict[str, Any]:
        return build_report(
            self.fleet,
            self.customers(),
            self.runners,
            deadline_s=deadline_s,
            open_incidents=open_incidents,
        )

    def servers(self, *, deadline_s: float = 5.0) -> list[dict[str, Any]]:
        """Every server with its reachability, PostgreSQL state and customer count."""
        report = build_report(
            self.fleet,
            self.customers(),
            self.runners,
            deadline_s=deadline_s,
            log_window=timedelta(minutes=5),
        )
        per_server: dict[str, int] = {}
        for db in report["databases"]:
            per_server[db["server"]] = per_server.get(db["server"], 0) + 1
        out = []
        for s in report["servers"]:
            bad = [c for c in s["checks"] if c["verdict"] != "ok"]
            out.append({**s, "customers": per_server.get(s["name"], 0), "problems": bad})
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
