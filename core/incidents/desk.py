"""The incidents table: reading incidents and opening them (the base of the desk)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.customers import get_customer, list_customers
from core.errors import DbopsError, NotFound
from core.escalation import (
    PAGE,
    REMINDER_EVERY,
    Escalator,
    cancel_pending,
    new_token,
    schedule_pages,
    schedule_reminder,
)
from core.fleet import Fleet
from core.incidents.model import Incident, parse_incident_id, parse_severity, ref, utcnow
from core.names import not_found, validate_name, validate_server_name
from storage.events import EventLog, NewEvent, StoredEvent
from storage.models_incidents import IncidentRow, utc, write_session

log = logging.getLogger("dbops.incidents")


class IncidentDesk:
    """Incidents read and opened; :class:`core.incidents.Incidents` is the whole desk."""

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        *,
        escalator: Escalator | None = None,
        clock: Callable[[], datetime] = utcnow,
        tz: tzinfo = UTC,
    ) -> None:
        self.engine = engine
        self.events = events
        self._fleet = fleet
        self.escalator = escalator
        self.clock = clock
        self.tz = tz

    @property
    def fleet(self) -> Fleet:
        return self._fleet() if callable(self._fleet) else self._fleet

    def _now(self, now: datetime | None) -> datetime:
        return utc(now or self.clock())

    # -- reading -----------------------------------------------------------------------------

    def get(self, incident_id: int | str) -> Incident:
        number = parse_incident_id(str(incident_id))
        with Session(self.engine) as session:
            row = session.get(IncidentRow, number)
        if row is None:
            raise NotFound(f"no incident inc-{number}.", hint="`/db incident list` shows them.")
        return Incident.from_row(row)

    def list_incidents(
        self,
        *,
        active: bool = True,
        customer: str | None = None,
        server: str | None = None,
        limit: int = 50,
    ) -> list[Incident]:
        """Incidents, most severe then newest first; ``active`` leaves out resolved ones."""
        stmt = select(IncidentRow)
        if active:
            stmt = stmt.where(IncidentRow.status != "resolved")
        if server is not None:
            stmt = stmt.where(IncidentRow.server == server)
        stmt = stmt.order_by(col(IncidentRow.severity), col(IncidentRow.opened_at).desc())
        with Session(self.engine) as session:
            rows = list(session.exec(stmt.limit(max(1, min(limit, 1000)) * (4 if customer else 1))))
        found = [Incident.from_row(r) for r in rows]
        if customer is not None:
            found = [i for i in found if customer in i.customers]
        return found[:limit]

    def open_incidents(self) -> list[Incident]:
        """For the morning report's "open incidents" line."""
        return self.list_incidents(active=True, limit=200)

    def timeline(self, incident_id: int | str, *, limit: int = 500) -> list[StoredEvent]:
        """The incident's events, oldest first (with its merged customers' incidents')."""
        inc = self.get(incident_id)
        subjects = [inc.ref] + [ref(c) for c in self._children(inc.id)]
        if len(subjects) == 1:
            return self.events.query(subject=inc.ref, limit=limit)
        return self.events.about(subjects, limit=limit)

    def _children(self, incident_id: int) -> list[int]:
        with Session(self.engine) as session:
            stmt = select(IncidentRow.id).where(IncidentRow.parent_id == incident_id)
            return [i for i in session.exec(stmt) if i is not None]

    # -- opening -----------------------------------------------------------------------------

    def open(
        self,
        title: str,
        severity: str,
        *,
        actor: str,
        customers: Sequence[str] = (),
        server: str | None = None,
        kind: str = "manual",
        dedupe_key: str | None = None,
        source: str = "manual",
        now: datetime | None = None,
    ) -> Incident:
        """Open an incident and start paging. A dedupe key already open raises a DbopsError
        naming that incident (alerts go through ``raise_alert``, which joins it instead)."""
        title = " ".join(str(title).split())
        if not title:
            raise DbopsError("an incident needs a summary.", hint="Say what is wrong, briefly.")
        sev = parse_severity(severity)
        names = [validate_name(c, "customer") for c in customers]
        if server is not None:
            validate_server_name(server)
        now = self._now(now)
        try:
            inc, merged = self._insert(
                title[:200], sev, kind, server, names, dedupe_key, source, actor, now
            )
        except IntegrityError:
            existing = self._open_by_key(dedupe_key) if dedupe_key else None
            if existing is None:
                raise
            raise DbopsError(
                f"{existing.ref} is already open for this ({existing.title}).",
                hint=f"Add to it, or resolve it first: `/db incident resolve {existing.id} ...`.",
            ) from None
        self._record_open(inc, merged, actor, now)
        self._kick(inc.id, now)
        return inc

    def open_for(
        self, target: str, severity: str, summary: str, *, actor: str, now: datetime | None = None
    ) -> Incident:
        """`/db incident open <customer|server> <P0-P3> <summary>`."""
        target = str(target).strip()
        try:
            customer = get_customer(self.engine, target)
        except DbopsError:
            customer = None
        if customer is not None:
            names, server = [customer.name], customer.server
            return self.open(
                summary, severity, actor=actor, customers=names, server=server, now=now
            )
        servers = [s.name for s in self.fleet.servers]
        if target in servers:
            return self.open(summary, severity, actor=actor, server=target, now=now)
        validate_server_name(target)
        names = servers + [c.name for c in list_customers(self.engine)]
        raise not_found("customer or server", target, names)

    def _insert(
        self,
        title: str,
        severity: str,
        kind: str,
        server: str | None,
        customers: list[str],
        dedupe_key: str | None,
        source: str,
        actor: str,
        now: datetime,
    ) -> tuple[Incident, list[Incident]]:
        if kind == "server_down" and server is not None:
            on_server = [
                c.name for c in list_customers(self.engine, server) if c.status == "active"
            ]
            customers = sorted(set(customers) | set(on_server))
        with write_session(self.engine) as session:
            row = IncidentRow(
                title=title,
                severity=severity,
                status="open",
                kind=kind,
                server=server,
                customers=customers,
                recovered_customers=[],
                dedupe_key=dedupe_key,
                opened_by=actor,
                source=source,
                token=new_token(),
                opened_at=now,
                updated_at=now,
                alert_count=1 if source != "manual" else 0,
                last_alert_at=now if source != "manual" else None,
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            schedule_pages(session, row.id, row.token, now, self.fleet.escalation, severity)
            if severity == "P0":
                schedule_reminder(session, row.id, now + REMINDER_EVERY)
            merged: list[IncidentRow] = []
            if kind == "server_down" and server is not None:
                merged = self._adopt(session, row, now)
            session.flush()
            return Incident.from_row(row), [Incident.from_row(m) for m in merged]

    def _adopt(self, session: Session, parent: IncidentRow, now: datetime) -> list[IncidentRow]:
        """Customers' outage incidents on the parent's server become its children."""
        stmt = (
            select(IncidentRow)
            .where(IncidentRow.server == parent.server)
            .where(IncidentRow.kind == "db_down")
            .where(IncidentRow.status != "resolved")
            .where(col(IncidentRow.parent_id).is_(None))
            .where(IncidentRow.id != parent.id)
            .with_for_update()
        )
        children = list(session.exec(stmt))
        customers = list(parent.customers)
        for child in children:
            assert child.id is not None
            child.parent_id, child.token, child.updated_at = parent.id, new_token(), now
            cancel_pending(session, child.id, now, (PAGE,))
            session.add(child)
            customers += [c for c in child.customers if c not in customers]
        parent.customers = customers
        session.add(parent)
        return children

    def _record_open(
        self, inc: Incident, merged: list[Incident], actor: str, now: datetime
    ) -> None:
        events = [
            NewEvent(
                "incident.opened",
                inc.ref,
                {
                    "title": inc.title,
                    "severity": inc.severity,
                    "kind": inc.kind,
                    "server": inc.server,
                    "customers": list(inc.customers),
                    "dedupe_key": inc.dedupe_key,
                    "source": inc.source,
                },
                actor=actor,
                ts=now,
            )
        ]
        for child in merged:
            events.append(
                NewEvent("incident.merged", child.ref, {"into": inc.id}, actor=actor, ts=now)
            )
            events.append(
                NewEvent(
                    "incident.child_added",
                    inc.ref,
                    {"child": child.id, "customers": list(child.customers)},
                    actor=actor,
                    ts=now,
                )
            )
        self.events.append_many(events)

    def _kick(self, incident_id: int, now: datetime) -> None:
        """Page the primary now, rather than at the escalation worker's next tick."""
        if self.escalator is None:
            return
        try:
            self.escalator.tick(now, incident_id=incident_id)
        except Exception:  # the worker will send it; opening must not fail over a page
            log.exception("could not page for inc-%s right away", incident_id)

    def _open_by_key(self, key: str | None) -> Incident | None:
        if key is None:
            return None
        with Session(self.engine) as session:
            row = session.exec(
                select(IncidentRow)
                .where(IncidentRow.dedupe_key == key)
                .where(IncidentRow.status != "resolved")
            ).first()
        return Incident.from_row(row) if row else None
