"""An incident's report, read from the event log alone: ``/db incident report`` and
``dbops incident report``.

The log is the record that SLA credits are paid from, so the report is computed from it and
nothing else (not the incidents table, which changes as the incident does): the timeline
(detected, paged, acked, restarted, restored, resolved), time to ack and to resolve, the
customers affected, the emails sent and the SLA credits with their Stripe ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

from core.errors import DbopsError
from storage.events import EventLog, StoredEvent, iso

# What each kind of event is on the timeline.
_STEPS = {
    "incident.opened": "detected",
    "escalation.dm": "paged",
    "escalation.post": "posted to the escalation channel",
    "escalation.reminder": "reminded",
    "incident.acknowledged": "acked",
    "incident.restart": "restarted",
    "incident.recovered": "recovered",
    "incident.mitigated": "mitigated",
    "email.sent": "email sent",
    "incident.resolved": "resolved",
}
MAX_EVENTS = 10_000


@dataclass(frozen=True)
class Step:
    what: str
    at: datetime
    actor: str | None
    detail: str
    event_id: int

    def as_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "at": iso(self.at),
            "actor": self.actor,
            "detail": self.detail,
            "event": self.event_id,
        }


@dataclass(frozen=True)
class IncidentReport:
    ref: str
    title: str | None
    severity: str | None
    detected_at: datetime
    paged_at: datetime | None
    acked_at: datetime | None
    resolved_at: datetime | None
    customers: list[str]
    timeline: list[Step]
    emails: list[dict[str, Any]] = field(default_factory=list)
    credits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def time_to_ack_s(self) -> int | None:
        return _seconds(self.detected_at, self.acked_at)

    @property
    def time_to_resolve_s(self) -> int | None:
        return _seconds(self.detected_at, self.resolved_at)

    def count(self, what: str) -> int:
        return sum(1 for s in self.timeline if s.what == what)

    def as_json(self) -> dict[str, Any]:
        return {
            "incident": self.ref,
            "title": self.title,
            "severity": self.severity,
            "detected_at": iso(self.detected_at),
            "paged_at": _iso(self.paged_at),
            "acked_at": _iso(self.acked_at),
            "resolved_at": _iso(self.resolved_at),
            "time_to_ack_s": self.time_to_ack_s,
            "time_to_resolve_s": self.time_to_resolve_s,
            "customers": self.customers,
            "restarts": self.count("restarted"),
            "restores": self.count("restored"),
            "emails": self.emails,
            "credits": self.credits,
            "timeline": [s.as_json() for s in self.timeline],
        }


def _iso(ts: datetime | None) -> str | None:
    return iso(ts) if ts is not None else None


def _seconds(start: datetime, end: datetime | None) -> int | None:
    return None if end is None else int((end - start).total_seconds())


def incident_report(events: EventLog, ref: str, *, now: datetime | None = None) -> IncidentReport:
    """The report of incident ``ref`` (inc-12) from its events; DbopsError if it has none."""
    own = events.query(subject=ref, limit=MAX_EVENTS)
    opened = next((e for e in own if e.kind == "incident.opened"), None)
    if opened is None:
        raise DbopsError(f"The event log has no incident {ref}.", hint="`/db incident list`")
    customers = list(opened.payload.get("customers") or [])
    for e in own:
        if e.kind == "incident.customer_added":
            for name in [e.payload.get("customer"), *(e.payload.get("customers") or [])]:
                if isinstance(name, str) and name not in customers:
                    customers.append(name)
    resolved = next((e for e in own if e.kind == "incident.resolved"), None)
    steps = [_step(e) for e in own if e.kind in _STEPS and _counts(e)]
    # Restores and credits are about a customer, not the incident: a restore of an affected
    # customer while the incident was open, a credit that names the incident.
    window_end = resolved.ts + timedelta(microseconds=1) if resolved else None
    restores = [
        e
        for e in events.query(
            kind="restore.done", since=opened.ts, until=window_end, limit=MAX_EVENTS
        )
        if e.subject in customers
    ]
    steps += [_step(e, "restored") for e in restores]
    credits = [
        e
        for e in events.query(kind="billing.credit_applied", since=opened.ts, limit=MAX_EVENTS)
        if e.payload.get("incident") == ref
    ]
    steps += [_step(e, "SLA credit") for e in credits]
    steps.sort(key=lambda s: (s.at, s.event_id))
    return IncidentReport(
        ref=ref,
        title=opened.payload.get("title"),
        severity=opened.payload.get("severity"),
        detected_at=opened.ts,
        paged_at=_first(steps, "paged"),
        acked_at=_first(steps, "acked"),
        resolved_at=resolved.ts if resolved else None,
        customers=customers,
        timeline=steps,
        emails=[
            {
                "at": iso(e.ts),
                "template": e.payload.get("template"),
                "to": e.payload.get("delivered") or e.payload.get("to") or [],
                "event": e.id,
            }
            for e in own
            if e.kind == "email.sent"
        ],
        credits=[
            {
                "customer": e.subject,
                "amount_cents": e.payload.get("amount_cents"),
                "currency": e.payload.get("currency"),
                "stripe_customer": e.payload.get("stripe_customer"),
                "stripe_txn": e.payload.get("stripe_txn"),
                "at": iso(e.ts),
                "event": e.id,
            }
            for e in credits
        ],
    )


def _counts(e: StoredEvent) -> bool:
    # A page is a DM of kind "page"; a reminder DM is shown as one.
    return not (e.kind == "escalation.dm" and e.payload.get("kind") not in (None, "page"))


def _first(steps: list[Step], what: str) -> datetime | None:
    return next((s.at for s in steps if s.what == what), None)


def _step(e: StoredEvent, what: str | None = None) -> Step:
    p = e.payload
    detail = ""
    if e.kind == "incident.opened":
        detail = f"{p.get('severity', '')} {p.get('title', '')}".strip()
    elif e.kind.startswith("escalation."):
        detail = f"to {p.get('to') or p.get('target') or '?'}"
    elif e.kind == "incident.restart":
        detail = "answering again" if p.get("answering") else "still not answering"
    elif e.kind == "restore.done":
        detail = e.subject or ""
    elif e.kind == "email.sent":
        detail = f"{p.get('template', '')} to {', '.join(p.get('delivered') or p.get('to') or [])}"
    elif e.kind == "billing.credit_applied":
        detail = (
            f"{e.subject}: {_money(p.get('amount_cents'), p.get('currency'))}, "
            f"Stripe {p.get('stripe_txn')}"
        )
    elif e.kind == "incident.resolved":
        detail = str(p.get("cause") or "")[:200]
    return Step(what or _STEPS[e.kind], e.ts, e.actor, detail, e.id)


def _money(cents: Any, currency: Any) -> str:
    if not isinstance(cents, int):
        return "?"
    return f"{cents / 100:.2f} {str(currency or '').upper()}".strip()


def duration(seconds: int | None) -> str:
    if seconds is None:
        return "not yet"
    h, rest = divmod(max(0, seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def timeline_lines(report: IncidentReport, tz: tzinfo) -> list[str]:
    out = []
    for s in report.timeline:
        when = s.at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")
        who = f" by {s.actor}" if s.actor else ""
        out.append(f"{when}  {s.what}{who}{': ' + s.detail if s.detail else ''}")
    return out


def render_text(report: IncidentReport, tz: tzinfo) -> str:
    """The report as plain lines (the CLI; Slack shows the same in a code block)."""
    head = f"{report.ref}: {report.title or ''}".rstrip(": ")
    if report.severity:
        head += f" ({report.severity})"
    lines = [head, "", *timeline_lines(report, tz)]
    lines += [
        "",
        f"Time to ack: {duration(report.time_to_ack_s)}; "
        f"time to resolve: {duration(report.time_to_resolve_s)}",
        f"Customers affected: {', '.join(report.customers) or 'none recorded'}",
        f"Restarts: {report.count('restarted')}; restores: {report.count('restored')}",
        f"Emails sent: {len(report.emails)}",
    ]
    lines += [f"  {m['template']} to {', '.join(m['to'])}" for m in report.emails]
    lines.append(f"SLA credits: {len(report.credits)}")
    lines += [
        f"  {c['customer']}: {_money(c['amount_cents'], c['currency'])} "
        f"(Stripe {c['stripe_txn']}, customer {c['stripe_customer']})"
        for c in report.credits
    ]
    return "\n".join(lines)
