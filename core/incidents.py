"""Incidents: open, alerts in, ack, resolve, the timeline, the card, SLA downtime and credits.

An incident has a severity with the manuals' response targets (P0 immediate, P1 1 h, P2 4 h,
P3 24 h), a status (open -> acknowledged -> mitigated -> resolved), an owner (who acked), the
server and customers it touches, and a timeline that *is* its events in the event log (subject
``inc-<id>``).

Alerts (core.alerts) carry a dedupe key; one not-resolved incident exists per key (a partial
unique index makes that hold even for two raisers racing). A repeat firing is added to the
timeline; a resolved alert marks the incident (or one of its customers) *recovered* and leaves
resolving, with a cause, to a human.

A server down is one incident listing every customer it takes with it: a customer's
database-down alert while its server's incident is open joins that incident (the customer is
added to its list and timeline); customers' incidents already open when the server's opens are
merged into it (``parent_id``; their paging stops, they resolve with it).

SLA: a customer is down from when an outage incident starts touching it (open, joined, a new
firing) to when it recovers (its alert or the incident's resolves, mitigated, resolved). Above
one hour of downtime, resolving proposes a credit of the plan's monthly price pro-rated to the
downtime (price * downtime / 30 days, in cents, rounded to the nearest cent). Outages are
server-down and database-down incidents, and any P0 opened by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core import email as mail
from core.alerts import SEVERITIES, Alert, Severity
from core.customers import Customer, get_customer, list_customers
from core.errors import DbopsError, NotFound
from core.escalation import (
    PAGE,
    REMINDER,
    REMINDER_EVERY,
    Escalator,
    cancel_pending,
    new_token,
    schedule_pages,
    schedule_reminder,
)
from core.fleet import Fleet
from core.names import not_found, validate_name, validate_server_name
from core.notify import MessageRef
from core.remote import RunnerPool
from core.restarts import (
    Decision,
    refuse_while_restarting,
    restart_precondition,
    restart_server,
)
from core.restarts import _one_restart as _one_restart  # tests hold a restart with it
from core.units import pretty_age
from storage.events import EventLog, NewEvent, StoredEvent
from storage.models_incidents import IncidentRow, aware, utc, write_session
from storage.spool import caught_up, record

log = logging.getLogger("dbops.incidents")

Status = Literal["open", "acknowledged", "mitigated", "resolved"]
STATUSES: tuple[Status, ...] = ("open", "acknowledged", "mitigated", "resolved")
ACTIVE: tuple[Status, ...] = ("open", "acknowledged", "mitigated")
RESPONSE_TARGETS: dict[str, timedelta] = {
    "P0": timedelta(0),
    "P1": timedelta(hours=1),
    "P2": timedelta(hours=4),
    "P3": timedelta(hours=24),
}
OUTAGE_KINDS = ("server_down", "db_down")
SLA_THRESHOLD = timedelta(hours=1)
SLA_MONTH = timedelta(days=30)
# A health sweep repeats its alerts every few minutes; only a re-firing after a recovery is
# worth a line in the timeline. Alertmanager's repeats (hours apart) are all recorded.
_QUIET_REPEATS = ("health",)

# Timeline events that start or end a customer's downtime.
_DOWN = ("incident.opened", "incident.customer_added", "alert.refired")
_UP = ("alert.recovered", "incident.recovered", "incident.mitigated", "incident.resolved")


def utcnow() -> datetime:
    return datetime.now(UTC)


def ref(incident_id: int) -> str:
    return f"inc-{incident_id}"


def parse_incident_id(text: str) -> int:
    """``12``, ``inc-12`` or ``#12`` as 12; anything else is a DbopsError."""
    raw = str(text).strip().lower().removeprefix("#").removeprefix("inc-")
    if not raw.isdigit() or len(raw) > 9 or int(raw) == 0:
        raise DbopsError(f"{str(text)[:40]!r} is not an incident id.", hint="Use e.g. inc-12.")
    return int(raw)


def parse_severity(text: str) -> Severity:
    value = str(text).strip().upper()
    for sev in SEVERITIES:
        if value == sev:
            return sev
    raise DbopsError(
        f"{str(text)[:20]!r} is not a severity.",
        hint="Use P0 (down, now), P1 (1 h), P2 (4 h) or P3 (24 h).",
    )


@dataclass(frozen=True)
class Incident:
    id: int
    title: str
    severity: str
    status: str
    kind: str
    server: str | None
    customers: tuple[str, ...]
    recovered_customers: tuple[str, ...]
    dedupe_key: str | None
    parent_id: int | None
    owner: str | None
    opened_by: str | None
    source: str
    opened_at: datetime
    acknowledged_at: datetime | None
    mitigated_at: datetime | None
    resolved_at: datetime | None
    recovered_at: datetime | None
    last_alert_at: datetime | None
    alert_count: int
    cause: str | None
    card_ref: MessageRef | None

    @classmethod
    def from_row(cls, row: IncidentRow) -> Incident:
        assert row.id is not None
        opened = aware(row.opened_at)
        assert opened is not None
        card = (
            MessageRef(row.card_channel, row.card_ts) if row.card_channel and row.card_ts else None
        )
        return cls(
            id=row.id,
            title=row.title,
            severity=row.severity,
            status=row.status,
            kind=row.kind,
            server=row.server,
            customers=tuple(row.customers or ()),
            recovered_customers=tuple(row.recovered_customers or ()),
            dedupe_key=row.dedupe_key,
            parent_id=row.parent_id,
            owner=row.owner,
            opened_by=row.opened_by,
            source=row.source,
            opened_at=opened,
            acknowledged_at=aware(row.acknowledged_at),
            mitigated_at=aware(row.mitigated_at),
            resolved_at=aware(row.resolved_at),
            recovered_at=aware(row.recovered_at),
            last_alert_at=aware(row.last_alert_at),
            alert_count=row.alert_count,
            cause=row.cause,
            card_ref=card,
        )

    @property
    def ref(self) -> str:
        return ref(self.id)

    @property
    def active(self) -> bool:
        return self.status != "resolved"

    @property
    def response_target(self) -> timedelta:
        return RESPONSE_TARGETS[self.severity]

    @property
    def response_due(self) -> datetime:
        return self.opened_at + self.response_target

    @property
    def is_outage(self) -> bool:
        return self.kind in OUTAGE_KINDS or (self.kind == "manual" and self.severity == "P0")

    def as_json(self) -> dict[str, Any]:
        def iso(ts: datetime | None) -> str | None:
            return ts.strftime("%Y-%m-%dT%H:%M:%SZ") if ts else None

        return {
            "id": self.id,
            "ref": self.ref,
            "title": self.title,
            "severity": self.severity,
            "status": self.status,
            "kind": self.kind,
            "server": self.server,
            "customers": list(self.customers),
            "recovered_customers": list(self.recovered_customers),
            "parent_id": self.parent_id,
            "owner": self.owner,
            "opened_by": self.opened_by,
            "source": self.source,
            "opened_at": iso(self.opened_at),
            "acknowledged_at": iso(self.acknowledged_at),
            "mitigated_at": iso(self.mitigated_at),
            "resolved_at": iso(self.resolved_at),
            "recovered_at": iso(self.recovered_at),
            "alert_count": self.alert_count,
            "cause": self.cause,
            "response_target_s": int(self.response_target.total_seconds()),
        }


@dataclass(frozen=True)
class AlertOutcome:
    """What an alert did: opened, repeat, refired, joined (a server's incident), recovered,
    ignored (a repeat recovery, or a health sweep's all-clear with nothing open), unmatched."""

    action: str
    alert: Alert
    incident: Incident | None


@dataclass(frozen=True)
class CreditProposal:
    customer: str
    plan: str | None
    price_usd_month: int | None
    downtime_s: int
    credit_cents: int | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "plan": self.plan,
            "price_usd_month": self.price_usd_month,
            "downtime_s": self.downtime_s,
            "credit_cents": self.credit_cents,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Resolution:
    incident: Incident
    downtime_s: dict[str, int]
    credits: list[CreditProposal]
    children: list[int]


@dataclass(frozen=True)
class Precondition:
    ok: bool
    reason: str


def credit_cents(price_usd_month: int, downtime: timedelta) -> int:
    """The plan's monthly price pro-rated to ``downtime``: price * downtime / 30 days, in
    cents, rounded to the nearest cent (integer arithmetic, no floats)."""
    secs = max(0, int(downtime.total_seconds()))
    month = int(SLA_MONTH.total_seconds())
    return (price_usd_month * 100 * secs * 2 + month) // (2 * month)


def downtime_from_timeline(
    timeline: Iterable[StoredEvent], customers: Iterable[str], until: datetime
) -> dict[str, int]:
    """Seconds down per customer, walking an outage incident's events in order (see the module
    docstring for which events start and end a customer's downtime). Still down at the end of
    the timeline counts up to ``until``."""
    listed = list(customers)
    down_since: dict[str, datetime] = {}
    total: dict[str, float] = dict.fromkeys(listed, 0.0)

    def down(names: Iterable[str], at: datetime) -> None:
        for n in names:
            total.setdefault(n, 0.0)
            down_since.setdefault(n, at)

    def up(names: Iterable[str], at: datetime) -> None:
        for n in names:
            start = down_since.pop(n, None)
            if start is not None:
                total[n] = total.get(n, 0.0) + max(0.0, (at - start).total_seconds())

    known: list[str] = []
    for ev in timeline:
        p = ev.payload
        one = p.get("customer")
        if ev.kind == "incident.opened":
            known = list(p.get("customers") or [])
            down(known, ev.ts)
        elif ev.kind == "incident.customer_added" and one:
            known.append(one)
            down([one], ev.ts)
        elif ev.kind == "alert.refired":
            down([one] if one else known, ev.ts)
        elif ev.kind in _UP:
            up([one] if one and ev.kind == "alert.recovered" else list(down_since), ev.ts)
    up(list(down_since), until)
    return {n: int(s) for n, s in total.items()}


def _merge_downtime(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for name, secs in part.items():
            out[name] = out.get(name, 0) + secs
    return out


class Incidents:
    """The incident desk: one per process, shared by the bot, the shell, webhooks and jobs."""

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

    # -- alerts ------------------------------------------------------------------------------

    def ingest(self, alerts: Iterable[Alert], *, now: datetime | None = None) -> list[AlertOutcome]:
        """Every alert of a webhook delivery or a health sweep, in order."""
        return [self.raise_alert(a, now=now) for a in alerts]

    def raise_alert(self, alert: Alert, *, now: datetime | None = None) -> AlertOutcome:
        now = self._now(now)
        if alert.status == "firing":
            return self._firing(alert, now)
        return self._resolved(alert, now)

    def _customer_server(self, alert: Alert) -> str | None:
        if alert.customer is None:
            return None
        try:
            return get_customer(self.engine, alert.customer).server
        except DbopsError:
            return alert.server

    def _locked_open(self, session: Session, key: str) -> IncidentRow | None:
        stmt = (
            select(IncidentRow)
            .where(IncidentRow.dedupe_key == key)
            .where(IncidentRow.status != "resolved")
            .with_for_update()
        )
        return session.exec(stmt).first()

    def _alert_event(
        self, kind: str, inc_id: int, alert: Alert, now: datetime, *, idempotent: bool = True
    ) -> NewEvent:
        key = alert.natural_key if idempotent else None
        return NewEvent(
            kind,
            ref(inc_id),
            alert.as_json(),
            actor=alert.source,
            source=alert.source if key else "dbops",
            source_id=key,
            ts=now,
        )

    def _firing(self, alert: Alert, now: datetime) -> AlertOutcome:
        server = alert.server
        if alert.kind == "db_down":
            server = self._customer_server(alert) or alert.server
        for _attempt in range(3):
            try:
                return self._firing_once(alert, server, now)
            except IntegrityError:
                continue  # another raiser opened it first: go round and join theirs
        raise DbopsError(f"could not record the alert {alert.dedupe_key!r}; it will be retried.")

    def _firing_once(self, alert: Alert, server: str | None, now: datetime) -> AlertOutcome:
        parent_key = f"server-down:{server}" if alert.kind == "db_down" and server else None
        with write_session(self.engine) as session:
            row = self._locked_open(session, alert.dedupe_key)
            if row is not None:
                refired = row.recovered_at is not None
                row.alert_count += 1
                row.last_alert_at, row.recovered_at, row.updated_at = now, None, now
                session.add(row)
                inc = Incident.from_row(row)
                action = "refired" if refired else "repeat"
            else:
                parent = self._locked_open(session, parent_key) if parent_key else None
                if parent is not None and alert.customer:
                    joined = alert.customer not in parent.customers
                    refired = alert.customer in (parent.recovered_customers or [])
                    if joined:
                        parent.customers = [*parent.customers, alert.customer]
                    if refired:
                        parent.recovered_customers = [
                            c for c in parent.recovered_customers if c != alert.customer
                        ]
                    parent.alert_count += 1
                    parent.last_alert_at, parent.updated_at = now, now
                    session.add(parent)
                    inc = Incident.from_row(parent)
                    action = "joined" if joined else ("refired" if refired else "repeat")
                else:
                    inc = None
                    action = "opened"
        if inc is None:
            customers = [alert.customer] if alert.customer else []
            opened, merged = self._insert(
                alert.title,
                alert.severity,
                alert.kind,
                server,
                customers,
                alert.dedupe_key,
                alert.source,
                alert.source,
                now,
            )
            self._record_open(opened, merged, alert.source, now)
            self.events.append_many([self._alert_event("alert.firing", opened.id, alert, now)])
            self._kick(opened.id, now)
            return AlertOutcome("opened", alert, opened)
        self._record_alert(action, inc, alert, now)
        return AlertOutcome(action, alert, inc)

    def _record_alert(self, action: str, inc: Incident, alert: Alert, now: datetime) -> None:
        events: list[NewEvent] = []
        if action == "joined":
            events.append(
                NewEvent(
                    "incident.customer_added",
                    inc.ref,
                    {"customer": alert.customer, "dedupe_key": alert.dedupe_key},
                    actor=alert.source,
                    ts=now,
                )
            )
            events.append(self._alert_event("alert.firing", inc.id, alert, now))
        elif action == "refired":
            events.append(self._alert_event("alert.refired", inc.id, alert, now))
        elif alert.source not in _QUIET_REPEATS:
            seen = alert.natural_key and self.events.get(alert.source, alert.natural_key)
            kind = "alert.repeat" if seen else "alert.firing"
            events.append(self._alert_event(kind, inc.id, alert, now, idempotent=not seen))
        if events:
            self.events.append_many(events)

    def _resolved(self, alert: Alert, now: datetime) -> AlertOutcome:
        server = self._customer_server(alert) if alert.kind == "db_down" else alert.server
        parent_key = f"server-down:{server}" if alert.kind == "db_down" and server else None
        customer: str | None = None
        with write_session(self.engine) as session:
            row = self._locked_open(session, alert.dedupe_key)
            action = "unmatched"
            inc: Incident | None = None
            if row is not None:
                action = "recovered" if row.recovered_at is None else "ignored"
                if action == "recovered":
                    row.recovered_at, row.updated_at = now, now
                    session.add(row)
                inc = Incident.from_row(row)
            elif parent_key and alert.customer:
                parent = self._locked_open(session, parent_key)
                if parent is not None and alert.customer in parent.customers:
                    done = alert.customer in (parent.recovered_customers or [])
                    action = "ignored" if done else "recovered"
                    if not done:
                        parent.recovered_customers = [*parent.recovered_customers, alert.customer]
                        parent.updated_at = now
                        session.add(parent)
                        customer = alert.customer
                    inc = Incident.from_row(parent)
        if action == "recovered" and inc is not None:
            ev = self._alert_event("alert.recovered", inc.id, alert, now)
            if customer is None and alert.kind != "db_down":
                # The incident's own problem recovered: for every customer it lists.
                ev = NewEvent(
                    ev.kind,
                    ev.subject,
                    {**ev.payload, "customer": None},
                    actor=ev.actor,
                    source=ev.source,
                    source_id=ev.source_id,
                    ts=ev.ts,
                )
            self.events.append_many([ev])
        elif action == "unmatched":
            if alert.source == "health":
                action = "ignored"  # every healthy check of every sweep: not news
            else:
                self.events.append(
                    "alert.unmatched",
                    alert.dedupe_key[:200],
                    alert.as_json(),
                    actor=alert.source,
                    source=alert.source if alert.natural_key else "dbops",
                    source_id=alert.natural_key,
                    ts=now,
                )
        return AlertOutcome(action, alert, inc)

    # -- changing state ----------------------------------------------------------------------

    def _change(
        self,
        incident_id: int | str,
        allowed: Sequence[str],
        change: Callable[[Session, IncidentRow], None],
        refuse: Callable[[IncidentRow], str],
    ) -> IncidentRow:
        number = parse_incident_id(str(incident_id))
        with write_session(self.engine) as session:
            row = session.exec(
                select(IncidentRow).where(IncidentRow.id == number).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"no incident inc-{number}.", hint="`/db incident list` shows them.")
            if row.status not in allowed:
                raise DbopsError(refuse(row))
            change(session, row)
            session.add(row)
            return row

    def ack(self, incident_id: int | str, *, actor: str, now: datetime | None = None) -> Incident:
        """Acknowledge: every pending page stops; the acker owns the incident unless someone
        already does."""
        now = self._now(now)
        cancelled = 0

        def change(session: Session, row: IncidentRow) -> None:
            nonlocal cancelled
            assert row.id is not None
            row.status, row.acknowledged_at, row.updated_at = "acknowledged", now, now
            row.owner = row.owner or actor
            row.token = new_token()
            cancelled = cancel_pending(session, row.id, now, (PAGE,))

        def refuse(row: IncidentRow) -> str:
            if row.status == "resolved":
                return f"inc-{row.id} is already resolved."
            who = f" by <@{row.owner}>" if row.owner else ""
            return f"inc-{row.id} is already {row.status}{who}."

        row = self._change(incident_id, ("open",), change, refuse)
        inc = Incident.from_row(row)
        # Best effort (storage.spool): the ack is made; its record is never the reason it fails.
        record(
            self.events,
            "incident.acknowledged",
            inc.ref,
            {"owner": inc.owner, "cancelled_steps": cancelled, "after_s": self._age(inc, now)},
            actor=actor,
            ts=now,
        )
        self._settle_pages(inc, "acknowledged", actor, now)
        return inc

    def _settle_pages(self, inc: Incident, done: str, actor: str, now: datetime) -> None:
        """The pages already sent say who took it (and lose their Ack button)."""
        if self.escalator is None:
            return
        try:
            self.escalator.settle_pages(inc, done, actor, now)
        except Exception:  # the ack stands whatever happens to the old pages
            log.exception("could not update the pages of %s", inc.ref)

    @staticmethod
    def _age(inc: Incident, now: datetime) -> int:
        return int((now - inc.opened_at).total_seconds())

    def mitigate(
        self, incident_id: int | str, *, actor: str, note: str = "", now: datetime | None = None
    ) -> Incident:
        """Service restored, cause still open: paging stops, the P0 reminders go on."""
        now = self._now(now)
        was_open = False

        def change(session: Session, row: IncidentRow) -> None:
            nonlocal was_open
            assert row.id is not None
            was_open = row.status == "open"
            row.status, row.mitigated_at, row.updated_at = "mitigated", now, now
            row.owner = row.owner or actor
            row.acknowledged_at = row.acknowledged_at or now
            row.token = new_token()
            cancel_pending(session, row.id, now, (PAGE,))

        row = self._change(
            incident_id,
            ("open", "acknowledged"),
            change,
            lambda r: (
                f"inc-{r.id} is {r.status}; only an open or acknowledged one can be mitigated."
            ),
        )
        inc = Incident.from_row(row)
        self.events.append(
            "incident.mitigated", inc.ref, {"note": note[:2000]}, actor=actor, ts=now
        )
        if was_open:
            self._settle_pages(inc, "mitigated", actor, now)
        return inc

    def note(self, incident_id: int | str, text: str, *, actor: str) -> StoredEvent:
        inc = self.get(incident_id)
        body = str(text).strip()
        if not body:
            raise DbopsError("a note needs some text.")
        return self.events.append("incident.note", inc.ref, {"text": body[:4000]}, actor=actor)

    def set_severity(
        self, incident_id: int | str, severity: str, *, actor: str, now: datetime | None = None
    ) -> Incident:
        sev = parse_severity(severity)
        now = self._now(now)
        before = ""

        def change(session: Session, row: IncidentRow) -> None:
            nonlocal before
            assert row.id is not None
            before, row.severity, row.updated_at = row.severity, sev, now
            if sev == "P0" and before != "P0":
                schedule_reminder(session, row.id, now + REMINDER_EVERY)
            if sev != "P0":
                cancel_pending(session, row.id, now, (REMINDER,))

        row = self._change(
            incident_id, ACTIVE, change, lambda r: f"inc-{r.id} is resolved; open a new one."
        )
        inc = Incident.from_row(row)
        if before != sev:
            self.events.append(
                "incident.severity", inc.ref, {"from": before, "to": sev}, actor=actor, ts=now
            )
        return inc

    def set_card(self, incident_id: int | str, card: MessageRef) -> Incident:
        """Where the incident card was posted, so later changes update it in place."""

        def change(_session: Session, row: IncidentRow) -> None:
            row.card_channel, row.card_ts = card.channel, card.ts

        row = self._change(incident_id, STATUSES, change, lambda r: "")
        return Incident.from_row(row)

    def resolve(
        self,
        incident_id: int | str,
        cause: str,
        *,
        actor: str,
        now: datetime | None = None,
    ) -> Resolution:
        """Resolve with a root cause. Merged customers' incidents resolve with it. An outage
        longer than an hour proposes SLA credits (event ``sla.credit_proposed``)."""
        cause = str(cause).strip()
        if not cause:
            raise DbopsError(
                "resolving needs a root cause.", hint="e.g. `/db incident resolve 12 disk full`."
            )
        now = self._now(now)
        children: list[int] = []
        was_open = False

        def change(session: Session, row: IncidentRow) -> None:
            nonlocal was_open
            assert row.id is not None
            was_open = row.status == "open"
            row.status, row.resolved_at, row.updated_at = "resolved", now, now
            row.cause, row.owner, row.token = cause[:4000], row.owner or actor, new_token()
            cancel_pending(session, row.id, now, (PAGE, REMINDER))
            kids = session.exec(
                select(IncidentRow)
                .where(IncidentRow.parent_id == row.id)
                .where(IncidentRow.status != "resolved")
                .with_for_update()
            )
            for kid in kids:
                assert kid.id is not None
                kid.status, kid.resolved_at, kid.updated_at = "resolved", now, now
                kid.cause, kid.token = f"resolved with inc-{row.id}: {cause}"[:4000], new_token()
                cancel_pending(session, kid.id, now, (PAGE, REMINDER))
                session.add(kid)
                children.append(kid.id)

        row = self._change(
            incident_id, ACTIVE, change, lambda r: f"inc-{r.id} is already resolved."
        )
        inc = Incident.from_row(row)
        events = [
            NewEvent(
                "incident.resolved",
                inc.ref,
                {"cause": inc.cause, "children": children, "after_s": self._age(inc, now)},
                actor=actor,
                ts=now,
            )
        ]
        for child in children:
            payload = {"cause": cause[:4000], "with": inc.id}
            events.append(NewEvent("incident.resolved", ref(child), payload, actor=actor, ts=now))
        self.events.append_many(events)
        downtime = self.downtime(inc.id, until=now) if inc.is_outage else {}
        credits = self.propose_credits(downtime)
        if credits:
            self.events.append_many(
                [
                    NewEvent("sla.credit_proposed", inc.ref, c.as_json(), actor="dbops", ts=now)
                    for c in credits
                ]
            )
        if was_open:  # nobody acknowledged it: its pages are still asking
            self._settle_pages(inc, "resolved", actor, now)
        return Resolution(inc, downtime, credits, children)

    # -- SLA ---------------------------------------------------------------------------------

    def downtime(self, incident_id: int | str, *, until: datetime | None = None) -> dict[str, int]:
        """Seconds of downtime per customer, from the timelines of the incident and of the
        customers' incidents merged into it (overlaps are counted once per incident)."""
        inc = self.get(incident_id)
        end = utc(until or inc.resolved_at or self.clock())
        own = self.events.query(subject=inc.ref, limit=10_000)
        parts = [downtime_from_timeline(own, inc.customers, end)]
        for child_id in self._children(inc.id):
            child = self.get(child_id)
            child_end = min(end, child.resolved_at or end)
            child_events = self.events.query(subject=child.ref, limit=10_000)
            # A merged incident's downtime runs until its parent opened (then the parent's
            # timeline counts it).
            merged_at = next((e.ts for e in child_events if e.kind == "incident.merged"), None)
            parts.append(
                downtime_from_timeline(
                    [e for e in child_events if merged_at is None or e.ts <= merged_at],
                    child.customers,
                    min(child_end, merged_at) if merged_at else child_end,
                )
            )
        return _merge_downtime(parts)

    def propose_credits(self, downtime: Mapping[str, int]) -> list[CreditProposal]:
        """A credit for each customer down longer than an hour (SOP-201 resolution step 5)."""
        out: list[CreditProposal] = []
        for name, secs in sorted(downtime.items()):
            if secs <= SLA_THRESHOLD.total_seconds():
                continue
            try:
                customer: Customer | None = get_customer(self.engine, name)
            except DbopsError:
                customer = None
            plan_name = customer.plan if customer else None
            plan = self.fleet.plans.get(plan_name) if plan_name else None
            if plan is None:
                why = (
                    f"no plan {plan_name!r} in the fleet file" if plan_name else "no plan on record"
                )
                out.append(CreditProposal(name, plan_name, None, secs, None, why))
                continue
            cents = credit_cents(plan.price_usd_month, timedelta(seconds=secs))
            reason = (
                f"down {pretty_age(secs)} (over 1 h): ${plan.price_usd_month}/month "
                f"x {secs} s / 30 days = ${cents / 100:.2f}"
            )
            out.append(CreditProposal(name, plan_name, plan.price_usd_month, secs, cents, reason))
        return out

    # -- the card ----------------------------------------------------------------------------

    def card(
        self,
        incident_id: int | str,
        *,
        health: Mapping[str, Any] | None = None,
        restore: Mapping[str, Any] | None = None,
        now: datetime | None = None,
        restart: Decision | None = None,
    ) -> dict[str, Any]:
        """What the incident card shows, and its buttons with whether each makes sense now.

        ``restart``: the restart policy's decision (core.restarts) when the caller took one;
        else ``health``, a core.report.customer_status dict or a server entry of the report,
        read by the same policy; ``restore``: the newest verified backup ({"name", "age_s"}) once
        restores exist. A button whose precondition fails carries ``enabled: False`` and the
        reason, which the card shows instead of acting.
        """
        inc = self.get(incident_id)
        now = self._now(now)
        age = self._age(inc, now)
        acked = inc.status != "open"
        overdue = not acked and now > inc.response_due
        buttons: list[dict[str, Any]] = []
        if inc.status == "open":
            buttons.append(_button("ack", "Ack", "operator", True, ""))
        else:
            who = f" by <@{inc.owner}>" if inc.owner else ""
            buttons.append(_button("ack", "Ack", "operator", False, f"{inc.status}{who}"))
        if inc.server is not None and inc.active:
            pre: Decision | Precondition = (
                restart
                if restart is not None
                else restart_precondition(health)
                if health is not None
                else _restart_from_incident(inc)
            )
            buttons.append(
                _button("restart", "Restart PostgreSQL", "operator", pre.ok, pre.reason, True)
            )
        if restore is not None and inc.customers and inc.active:
            name = restore.get("name")
            if name:
                age_s = restore.get("age_s")
                shown = f" ({pretty_age(int(age_s))} old)" if age_s is not None else ""
                buttons.append(
                    _button("restore", f"Restore {name}{shown}", "admin", True, "", True)
                )
            else:
                why = str(restore.get("reason") or "no verified backup to restore from")
                buttons.append(_button("restore", "Restore", "admin", False, why, True))
        if inc.active:
            buttons.append(_button("resolve", "Resolve", "operator", True, ""))
        return {
            **inc.as_json(),
            "age_s": age,
            "age": pretty_age(age),
            "since_local": inc.opened_at.astimezone(self.tz).strftime("%Y-%m-%d %H:%M %Z"),
            "response_due_at": inc.response_due.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "overdue": overdue,
            "children": self._children(inc.id),
            "card_ref": (
                {"channel": inc.card_ref.channel, "ts": inc.card_ref.ts} if inc.card_ref else None
            ),
            "headline": _headline(inc, age),
            "buttons": buttons,
        }

    # -- restart from the card ---------------------------------------------------------------

    def restart(
        self,
        incident_id: int | str,
        runners: RunnerPool,
        *,
        actor: str,
        recheck_s: float = 30.0,
        now: datetime | None = None,
        reason: str = "",
    ) -> dict[str, Any]:
        """Restart the incident's server, re-check it and say so in the timeline. Pressing it
        acknowledges an open incident (someone is on it); PostgreSQL answering again marks the
        incident recovered (resolving stays a human's call, with a cause). Whether a restart
        makes sense is core.restarts' decision (``Restarts.restart_incident``); ``reason`` is
        what it said, kept with the result."""
        inc = self.get(incident_id)
        if inc.server is None:
            raise DbopsError(f"{inc.ref} names no server to restart.")
        if not inc.active:
            raise DbopsError(f"{inc.ref} is resolved.")
        refuse_while_restarting(inc.server)  # before the ack: a refused press changes nothing
        if inc.status == "open":
            self.ack(inc.id, actor=actor, now=now)
        customers = [c for c in list_customers(self.engine, inc.server) if c.name in inc.customers]
        result = restart_server(
            self.fleet,
            runners,
            inc.server,
            actor,
            customers=customers,
            events=self.events,
            recheck_s=recheck_s,
            reason=reason,
        )
        when = self._now(now)
        # After the restart: best-effort records (storage.spool), never the reason it fails.
        kept = not record(self.events, "incident.restart", inc.ref, result, actor=actor, ts=when)
        if result["answering"]:
            with write_session(self.engine) as session:
                row = session.get(IncidentRow, inc.id)
                if row is not None and row.recovered_at is None:
                    row.recovered_at, row.updated_at = when, when
                    session.add(row)
            by = {"by": "restart"}
            recovered = record(self.events, "incident.recovered", inc.ref, by, actor=actor, ts=when)
            kept = kept or not recovered
        recorded = bool(result.get("recorded", True)) and not kept
        return {**result, "recorded": recorded or caught_up(self.events)}

    # -- customer emails (SOP-201) -----------------------------------------------------------

    def email_preview(
        self,
        incident_id: int | str,
        which: str,
        *,
        note: str = "",
        eta: str = mail.DEFAULT_ETA,
        signature: str | None = None,
    ) -> list[mail.Email]:
        """The emails ``which`` (investigating, update, resolved) would send: one per affected
        customer with an address on record, signed as fleet.toml's [business] says (or by
        ``signature``). Rendering only; nothing is sent."""
        if which not in mail.INCIDENT_TEMPLATES:
            raise DbopsError(
                f"{which[:20]!r} is not an incident email.",
                hint="Use " + ", ".join(mail.INCIDENT_TEMPLATES) + ".",
            )
        inc = self.get(incident_id)
        if which == "resolved" and inc.status != "resolved":
            raise DbopsError(f"{inc.ref} is not resolved yet; resolve it with its cause first.")
        downtime = self.downtime(inc.id) if which == "resolved" and inc.is_outage else {}
        brand = mail.branding(self.fleet.business)
        if signature:
            brand["signature"] = signature
        out: list[mail.Email] = []
        for name in inc.customers:
            try:
                customer = get_customer(self.engine, name)
            except DbopsError:
                continue
            if not customer.email:
                continue
            context = {
                **brand,
                "customer": customer.name,
                "incident": inc.ref,
                "title": inc.title,
                "started": self._local(inc.opened_at),
                "status": _email_status(inc),
                "eta": eta,
                "note": note.strip(),
                "cause": inc.cause or "",
                "resolved": self._local(inc.resolved_at) if inc.resolved_at else "",
                "downtime": pretty_age(downtime[name]) if name in downtime else "",
            }
            out.append(mail.render(f"incident-{which}", context, to=[customer.email]))
        return out

    def email_send(
        self,
        incident_id: int | str,
        which: str,
        smtp_url: str,
        *,
        actor: str,
        note: str = "",
        eta: str = mail.DEFAULT_ETA,
        signature: str | None = None,
        sender: str | None = None,
    ) -> list[dict[str, Any]]:
        """Send what ``email_preview`` shows (the Send button); each is an ``email.sent`` event
        on the incident's timeline. Refused, before anything goes out, when fleet.toml has no
        [business] to speak for (``mail.require_branding``)."""
        mail.require_branding(smtp_url, self.fleet.business)
        inc = self.get(incident_id)
        emails = self.email_preview(inc.id, which, note=note, eta=eta, signature=signature)
        if not emails:
            raise DbopsError(f"none of {inc.ref}'s customers has an email address on record.")
        return [
            mail.send(e, smtp_url, events=self.events, actor=actor, subject=inc.ref, sender=sender)
            for e in emails
        ]

    def _local(self, ts: datetime | None) -> str:
        return ts.astimezone(self.tz).strftime("%Y-%m-%d %H:%M %Z") if ts else ""


def _email_status(inc: Incident) -> str:
    return {
        "open": "Investigating",
        "acknowledged": "Investigating",
        "mitigated": "Service restored, monitoring",
        "resolved": "Resolved",
    }[inc.status]


def _button(
    action: str, label: str, role: str, enabled: bool, reason: str, confirm: bool = False
) -> dict[str, Any]:
    return {
        "action": action,
        "label": label,
        "role": role,
        "enabled": enabled,
        "reason": reason,
        "confirm": confirm,
    }


def _headline(inc: Incident, age: int) -> str:
    where = ", ".join(inc.customers[:5]) + (
        f" +{len(inc.customers) - 5}" if len(inc.customers) > 5 else ""
    )
    scope = f"{inc.server}: {where}" if inc.server and where else (inc.server or where)
    owner = f", owner <@{inc.owner}>" if inc.owner else ""
    return (
        f"{inc.severity} {inc.ref} {inc.title} [{scope}] {inc.status} for {pretty_age(age)}{owner}"
    )


# --- restart ---------------------------------------------------------------------------------


def _restart_from_incident(inc: Incident) -> Precondition:
    if inc.kind in OUTAGE_KINDS and inc.recovered_at is None:
        return Precondition(True, "the alert says PostgreSQL is not answering")
    if inc.recovered_at is not None:
        return Precondition(False, "the alert has recovered: PostgreSQL answers again")
    return Precondition(False, "not an outage; check the server's status first")
