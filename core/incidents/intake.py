"""Alerts in: a firing opens, repeats or joins an incident; a resolved one marks it recovered.

Alerts (core.alerts) carry a dedupe key; one not-resolved incident exists per key (a partial
unique index makes that hold even for two raisers racing). A repeat firing is added to the
timeline; a resolved alert marks the incident (or one of its customers) *recovered* and leaves
resolving, with a cause, to a human.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from core.alerts import Alert
from core.customers import get_customer
from core.errors import DbopsError
from core.incidents.desk import IncidentDesk
from core.incidents.model import AlertOutcome, Incident, ref
from storage.events import NewEvent
from storage.models_incidents import IncidentRow, write_session

# A health sweep repeats its alerts every few minutes; only a re-firing after a recovery is
# worth a line in the timeline. Alertmanager's repeats (hours apart) are all recorded.
_QUIET_REPEATS = ("health",)


class AlertIntake(IncidentDesk):
    """The desk's alert intake (``ingest``, ``raise_alert``)."""

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
