"""Alerts in: a firing opens, repeats or joins an incident; a resolved one marks it recovered.

Alerts (core.alerts) carry a dedupe key; one not-resolved incident exists per key (a partial
unique index makes that hold even for two raisers racing). A repeat firing is added to the
timeline; a resolved alert marks the incident (or one of its customers) *recovered* and leaves
resolving, with a cause, to a human.

Maintenance (core.windows, core.maintenance): a firing alert whose subject a window covers,
with no incident already open for it, opens nothing: it is recorded in the window (event
``maintenance.suppressed`` the first time, ``maintenance.recovered`` when it clears) and its
outcome is ``suppressed``. An incident opened before the window takes the alert as usual; the
pager holds its pages.

Flapping (core.flapping): every alert taken in is an observation of its key. A key that starts
flapping gets ``incident.flapping`` on its incident's timeline and one message to the primary
(a ``flap`` step), unless a window covers it; when it holds steady again,
``incident.flapping_ended`` and the pages the pager held for it are due again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from core.alerts import Alert
from core.customers import get_customer
from core.errors import DbopsError
from core.escalation import release_held, schedule_flap_notice
from core.flapping import FLAP_WINDOW, FlapChange, FlapTracker, State
from core.incidents.desk import IncidentDesk
from core.incidents.model import AlertOutcome, Incident, ref
from core.windows import Cover, Covers, note_firing, note_recovered, window_ref
from storage.events import NewEvent
from storage.models_incidents import IncidentRow, write_session

log = logging.getLogger("dbops.incidents")

# A health sweep repeats its alerts every few minutes; only a re-firing after a recovery is
# worth a line in the timeline. Alertmanager's repeats (hours apart) are all recorded.
_QUIET_REPEATS = ("health",)


def _failing(seen: Mapping[str, Any], key: str) -> bool:
    """Whether a window's record has ``key`` failing (its last span open)."""
    spans = (seen.get(key) or {}).get("spans") or []
    return bool(spans) and spans[-1][1] is None


@dataclass
class _Batch:
    """One delivery's view of the windows (read once), and the keys it noted in them."""

    covers: Covers
    noted: set[str] = field(default_factory=set)

    def cover(self, alert: Alert, server: str | None) -> Cover | None:
        return self.covers.alert(alert, server) if self.covers else None


class AlertIntake(IncidentDesk):
    """The desk's alert intake (``ingest``, ``raise_alert``)."""

    # -- alerts ------------------------------------------------------------------------------

    def ingest(self, alerts: Iterable[Alert], *, now: datetime | None = None) -> list[AlertOutcome]:
        """Every alert of a webhook delivery or a health sweep, in order."""
        now = self._now(now)
        batch = _Batch(Covers.load(self.engine, now))
        outcomes = [self._raise(a, now, batch) for a in alerts]
        self._observe(outcomes, now, batch)
        return outcomes

    def raise_alert(self, alert: Alert, *, now: datetime | None = None) -> AlertOutcome:
        return self.ingest([alert], now=now)[0]

    def _raise(self, alert: Alert, now: datetime, batch: _Batch) -> AlertOutcome:
        if alert.status == "firing":
            return self._firing(alert, now, batch)
        return self._resolved(alert, now, batch)

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

    def _firing(self, alert: Alert, now: datetime, batch: _Batch) -> AlertOutcome:
        server = alert.server
        if alert.kind == "db_down":
            server = self._customer_server(alert) or alert.server
        where = self._where(alert, server, batch)
        cover = batch.cover(alert, where)
        if cover is not None and not self._already_open(alert, where):
            return self._suppress(alert, where, cover, now, batch)
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

    # -- maintenance -------------------------------------------------------------------------

    def _where(self, alert: Alert, server: str | None, batch: _Batch) -> str | None:
        """The server a window on it would cover this alert through: its own, else its
        customer's (an Alertmanager alert may name only the customer). Looked up only while
        some window is active."""
        if server or not alert.customer or not batch.covers:
            return server
        return self._customer_server(alert)

    def _already_open(self, alert: Alert, server: str | None) -> bool:
        """An incident this alert would land on is open (from before the window)."""
        if self._open_by_key(alert.dedupe_key) is not None:
            return True
        if alert.kind == "db_down" and server:
            parent = self._open_by_key(f"server-down:{server}")
            return parent is not None and alert.customer in parent.customers
        return False

    def _suppress(
        self, alert: Alert, server: str | None, cover: Cover, now: datetime, batch: _Batch
    ) -> AlertOutcome:
        noted = dataclasses.replace(alert, server=server) if server != alert.server else alert
        key = alert.dedupe_key
        if key not in batch.noted and all(_failing(w.seen, key) for w in cover.windows):
            return AlertOutcome("suppressed", alert, None)  # seen failing already: no write
        news = note_firing(self.engine, cover.ids, noted, now)
        batch.noted.add(alert.dedupe_key)
        if news:
            self.events.append(
                "maintenance.suppressed",
                (alert.customer or server or "fleet")[:200],
                self._maintenance_payload(alert, server, cover, news),
                actor=alert.source,
                ts=now,
            )
        return AlertOutcome("suppressed", alert, None)

    @staticmethod
    def _maintenance_payload(
        alert: Alert, server: str | None, cover: Cover, windows: list[int]
    ) -> dict[str, object]:
        return {
            "windows": [window_ref(i) for i in windows],
            "until": cover.until,
            "check": alert.alertname or alert.kind,
            "kind": alert.kind,
            "dedupe_key": alert.dedupe_key,
            "title": alert.title,
            "server": server,
            "customer": alert.customer,
            "source": alert.source,
            "detail": alert.detail,
        }

    def _recovered_in_window(
        self, alert: Alert, server: str | None, now: datetime, batch: _Batch
    ) -> bool:
        """A key that failed inside a window covering it cleared: noted there."""
        cover = batch.cover(alert, server)
        if cover is None:
            return False
        key = alert.dedupe_key
        if key not in batch.noted and not any(key in w.seen for w in cover.windows):
            return False  # never failed in these windows: no write
        back = note_recovered(self.engine, cover.ids, key, now)
        if back:
            self.events.append(
                "maintenance.recovered",
                (alert.customer or server or "fleet")[:200],
                self._maintenance_payload(alert, server, cover, back),
                actor=alert.source,
                ts=now,
            )
        return bool(back)

    # -- flapping ----------------------------------------------------------------------------

    def _observe(self, outcomes: list[AlertOutcome], now: datetime, batch: _Batch) -> None:
        """Every alert is an observation of its key; say when one starts or stops flapping."""
        observations: list[tuple[str, State]] = [
            (o.alert.dedupe_key, "firing" if o.alert.status == "firing" else "ok") for o in outcomes
        ]
        changes = FlapTracker(self.engine).observe(observations, now)
        if not changes:
            return
        last = {o.alert.dedupe_key: o for o in outcomes}
        for change in changes:
            outcome = last[change.key]
            try:
                if change.what == "started":
                    self._flapping(change, outcome, now, batch)
                else:
                    self._steady(change, outcome, now)
            except Exception:  # the alerts are in; a flapping note must not undo that
                log.exception("could not record %s flapping", change.key)

    def _flap_incident(self, outcome: AlertOutcome) -> Incident | None:
        inc = outcome.incident
        if inc is not None and inc.active:
            return inc
        return self._open_by_key(outcome.alert.dedupe_key)

    def _flapping(
        self, change: FlapChange, outcome: AlertOutcome, now: datetime, batch: _Batch
    ) -> None:
        alert = outcome.alert
        inc = self._flap_incident(outcome)
        payload = {
            "key": change.key,
            "check": alert.alertname or alert.kind,
            "changes": change.changes,
            "within_min": int(FLAP_WINDOW.total_seconds() // 60),
            "episode": change.episode,
        }
        covered = batch.cover(alert, inc.server if inc else alert.server) is not None
        subject = inc.ref if inc is not None else (alert.customer or alert.server or "fleet")
        self.events.append(
            "incident.flapping",
            subject[:200],
            {**payload, "notified": inc is not None and not covered},
            actor=alert.source,
            ts=now,
        )
        if inc is None or covered:
            return  # nobody to tell inside a window; no incident, no page to damp
        with write_session(self.engine) as session:
            schedule_flap_notice(session, inc.id, change.episode, now)
        self._kick(inc.id, now)

    def _steady(self, change: FlapChange, outcome: AlertOutcome, now: datetime) -> None:
        inc = self._flap_incident(outcome)
        subject = inc.ref if inc is not None else change.key
        self.events.append(
            "incident.flapping_ended",
            subject[:200],
            {"key": change.key, "episode": change.episode},
            actor=outcome.alert.source,
            ts=now,
        )
        if inc is not None:
            release_held(self.engine, "flap", now, [inc.id])
            self._kick(inc.id, now)

    # -- resolved ----------------------------------------------------------------------------

    def _resolved(self, alert: Alert, now: datetime, batch: _Batch) -> AlertOutcome:
        server = self._customer_server(alert) if alert.kind == "db_down" else alert.server
        cleared = self._recovered_in_window(alert, self._where(alert, server, batch), now, batch)
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
            if cleared:
                action = "suppressed"  # it failed and cleared inside a window: noted there
            elif alert.source == "health":
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
