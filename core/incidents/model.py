"""The incident record: statuses, severities' response targets, ids, and what the desk
returns (an alert's outcome, a resolution, a credit proposal)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from core.alerts import SEVERITIES, Alert, Severity
from core.errors import DbopsError
from core.notify import MessageRef
from storage.models_incidents import IncidentRow, aware

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
    downtime_s: dict[str, int]  # what counts for the SLA: maintenance windows left out
    credits: list[CreditProposal]
    children: list[int]
    # Downtime inside maintenance windows that covered the customers (not counted), and the
    # windows ("mw-3").
    maintenance_s: dict[str, int] = field(default_factory=dict)
    windows: list[str] = field(default_factory=list)
