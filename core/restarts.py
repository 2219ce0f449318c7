"""Restart a server's PostgreSQL on an operator's word: `/db restart <server|customer>`.

SOP-201: restart a cluster only when it does not answer. A restart of a healthy one drops every
connection of every customer on that server, so it is refused, with the reason and where to
look instead. A customer stands for its server (one cluster holds all its customers).

With an outage incident open on the server, the restart goes through the incident
(``Incidents.restart``: on its timeline, acknowledging it, marking it recovered); without one,
straight to the server. Both end in ``core.incidents.restart_server``: one restart per server
at a time, every remote command an event, and a ``server.restart`` event with the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from core.customers import Customer, list_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.health import check_fleet
from core.incidents import (
    Incident,
    Incidents,
    refuse_while_restarting,
    restart_precondition,
    restart_server,
)
from core.names import not_found, validate_server_name
from core.remote import FleetAccess, RunnerPool
from core.report import server_json
from storage.events import EventLog
from storage.spool import RECORD_LATER, record

CHECK_DEADLINE_S = 3.0  # the look before a restart: quick, like the incident card's
RECHECK_S = 30.0  # after it, how long to wait for PostgreSQL to answer
SHOWN = 5  # customers named in a message; the rest are counted


@dataclass(frozen=True)
class Target:
    """What `/db restart NAME` restarts: a server's cluster, named directly or by a customer."""

    server: str
    customer: str | None  # the customer it was named by, if any
    customers: tuple[str, ...]  # every active customer on the server: all of them restart

    @property
    def scope(self) -> str:
        """Who a restart touches, in words: "2 databases (acme, umbrella)"."""
        n = len(self.customers)
        names = ", ".join(self.customers[:SHOWN]) + (f" +{n - SHOWN}" if n > SHOWN else "")
        return f"{n} database{'s' if n != 1 else ''}" + (f" ({names})" if n else "")


@dataclass(frozen=True)
class Restarted:
    target: Target
    reason: str  # why it was allowed: what the look before found
    incident: Incident | None  # the incident it was recorded on, as it is afterwards
    result: dict[str, Any]  # restart_server's result: command, exit_code, answering, ...

    @property
    def recorded(self) -> bool:
        """False: the event log was down after the restart; its events are spooled."""
        return bool(self.result.get("recorded", True))

    @property
    def state(self) -> str:
        """What the restart reached, in words."""
        said = "restarted" if self.result.get("ran") else "restart not run"
        if self.result.get("ran"):
            said += "; answering" if self.result.get("answering") else "; still not answering"
        return said if self.recorded else f"{said}; {RECORD_LATER}"


class Restarts(FleetAccess):
    events: EventLog

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        runners: RunnerPool,
        *,
        incidents: Incidents | None = None,
        check_deadline_s: float = CHECK_DEADLINE_S,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.engine = engine
        self.events = events
        self._init_fleet_access(fleet, runners)
        self.incidents = incidents
        self.check_deadline_s = check_deadline_s
        self.recheck_s = recheck_s

    def target(self, name: str) -> Target:
        """A server by its name, or the server a customer is on; else a NotFound with the
        nearest names."""
        name = validate_server_name(str(name).strip().lower())
        fleet = self.fleet
        servers = [s.name for s in fleet.servers]
        everyone = list_customers(self.engine)
        if name in servers:
            server, customer = name, None
        else:
            found = next((c for c in everyone if c.name == name), None)
            if found is None:
                error = not_found("server or customer", name, servers + [c.name for c in everyone])
                error.hint = error.hint or "`/db servers` lists the servers and their customers."
                raise error
            server, customer = fleet.server(found.server).name, found.name
        on_it = tuple(c.name for c in everyone if c.server == server and c.status == "active")
        return Target(server, customer, on_it)

    def open_incident(self, server: str) -> Incident | None:
        """The outage incident open on ``server`` a restart belongs to: a server-down one
        first, then the most severe; merged ones go with their parent."""
        if self.incidents is None:
            return None
        found = [
            i
            for i in self.incidents.list_incidents(active=True, server=server, limit=50)
            if i.parent_id is None and i.is_outage
        ]
        found.sort(key=lambda i: i.kind != "server_down")  # stable: keeps severity order
        return found[0] if found else None

    def check(self, name: str, actor: str) -> tuple[Target, str]:
        """The look before a restart of NAME's server: its target and why a restart is
        allowed, or a DbopsError (recorded as ``restart.refused``) saying why not: the cluster
        answers (or cannot be reached, or its disk is full), or a restart of it is running."""
        target = self.target(name)
        refuse_while_restarting(target.server)
        (health,) = check_fleet(
            self.fleet,
            self._customers(target),
            self.runners,
            deadline_s=self.check_deadline_s,
            servers=[target.server],
            log_window=timedelta(minutes=5),
        )
        pre = restart_precondition(server_json(health))
        if not pre.ok:
            offline = [d.customer for d in health.databases if not d.online]
            answers = health.postgres == "up"
            raise self._refuse(target, pre.reason, actor, answers=answers, offline=offline)
        return target, pre.reason

    def restart(self, name: str, actor: str) -> Restarted:
        """Restart NAME's server when its PostgreSQL does not answer (``check``, again: a
        confirmation may be minutes old), then re-check it. Nothing runs on the server when
        the check refuses. Its events after the restart are best-effort (storage.spool): an
        event log that is down never turns a restart that ran into a reported failure."""
        target, reason = self.check(name, actor)
        server = target.server
        customers = self._customers(target)
        incident = self.open_incident(server)
        if incident is not None and self.incidents is not None:
            result = self.incidents.restart(
                incident.id, self.runners, actor=actor, recheck_s=self.recheck_s
            )
            incident = self.incidents.get(incident.id)
        else:
            result = restart_server(
                self.fleet,
                self.runners,
                server,
                actor,
                customers=customers,
                events=self.events,
                recheck_s=self.recheck_s,
            )
        return Restarted(target, reason, incident, result)

    def _customers(self, target: Target) -> list[Customer]:
        return [c for c in list_customers(self.engine, target.server) if c.name in target.customers]

    def _refuse(
        self, target: Target, reason: str, actor: str, *, answers: bool, offline: list[str]
    ) -> DbopsError:
        """The refusal: recorded (who asked, why not) and said with what to do instead."""
        server, customer = target.server, target.customer
        # Best effort (storage.spool): the refusal is what the operator needs to read.
        record(
            self.events,
            "restart.refused",
            server,
            {"server": server, "customer": customer, "reason": reason},
            actor=actor,
        )
        if not answers:  # unreachable, or a full disk: the reason says what to do
            return DbopsError(f"Not restarting {server}'s PostgreSQL: {reason}.")
        drop = f"a restart would drop every connection of its {target.scope}"
        if customer is not None and customer in offline:
            return DbopsError(
                f"Not restarting {server}'s PostgreSQL: it answers; only {customer}'s database "
                f"does not, and {drop}.",
                hint=f"`/db status {customer}` shows why; SOP-201 (database down) lists what "
                "to check before a restart.",
            )
        look = f"`/db status {customer}`" if customer else "`/db servers`"
        return DbopsError(
            f"Not restarting {server}'s PostgreSQL: {reason}; {drop}.",
            hint=f"{look} shows what is wrong instead.",
        )
