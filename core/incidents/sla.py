"""SLA: a customer's downtime read from an incident's timeline, and the credit it earns.

A customer is down from when an outage incident starts touching it (open, joined, a new
firing) to when it recovers (its alert or the incident's resolves, mitigated, resolved). Above
one hour of downtime, resolving proposes a credit of the plan's monthly price pro-rated to the
downtime (price * downtime / 30 days, in cents, rounded to the nearest cent). Outages are
server-down and database-down incidents, and any P0 opened by hand.

Downtime inside a maintenance window that covered the customer (its server's or its own;
cancelled windows do not count) is not downtime for the SLA: it is left out before the
threshold and the credit are worked out (``excluded``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from core.errors import DbopsError
from storage.events import EventLog, StoredEvent

SLA_THRESHOLD = timedelta(hours=1)
SLA_MONTH = timedelta(days=30)


# Timeline events that start or end a customer's downtime.
_DOWN = ("incident.opened", "incident.customer_added", "alert.refired")
_UP = ("alert.recovered", "incident.recovered", "incident.mitigated", "incident.resolved")


def credit_cents(price_usd_month: int, downtime: timedelta) -> int:
    """The plan's monthly price pro-rated to ``downtime``: price * downtime / 30 days, in
    cents, rounded to the nearest cent (integer arithmetic, no floats)."""
    secs = max(0, int(downtime.total_seconds()))
    month = int(SLA_MONTH.total_seconds())
    return (price_usd_month * 100 * secs * 2 + month) // (2 * month)


Span = tuple[datetime, datetime]


def _outside(start: datetime, end: datetime, excluded: Sequence[Span]) -> float:
    """Seconds of ``[start, end)`` outside every span of ``excluded``."""
    total = max(0.0, (end - start).total_seconds())
    cut: list[Span] = []
    for a, b in sorted(excluded):
        a, b = max(a, start), min(b, end)
        if a >= b:
            continue
        if cut and a <= cut[-1][1]:
            cut[-1] = (cut[-1][0], max(cut[-1][1], b))
        else:
            cut.append((a, b))
    return max(0.0, total - sum((b - a).total_seconds() for a, b in cut))


def downtime_from_timeline(
    timeline: Iterable[StoredEvent],
    customers: Iterable[str],
    until: datetime,
    excluded: Mapping[str, Sequence[Span]] | None = None,
) -> dict[str, int]:
    """Seconds down per customer, walking an outage incident's events in order (see the module
    docstring for which events start and end a customer's downtime). Still down at the end of
    the timeline counts up to ``until``. ``excluded``: per customer, the spans (maintenance
    windows) whose downtime does not count."""
    spans = excluded or {}
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
                total[n] = total.get(n, 0.0) + _outside(start, at, spans.get(n, ()))

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


def proposed_credit(events: EventLog, incident_id: int, customer: str) -> int:
    """The credit, in cents, core proposed for ``customer`` when it resolved the incident."""
    ref = f"inc-{incident_id}"
    for event in events.query(
        subject=ref, kind="sla.credit_proposed", newest_first=True, limit=1000
    ):
        if event.payload.get("customer") != customer:
            continue
        cents = event.payload.get("credit_cents")
        if type(cents) is int and cents > 0:
            return cents
        reason = str(event.payload.get("reason") or "no amount")
        raise DbopsError(
            f"The SLA credit proposed for {customer} in {ref} has no amount: {reason[:150]}.",
            hint="Credit it by hand in Stripe, and note it in the incident.",
        )
    raise DbopsError(
        f"No SLA credit was proposed for {customer} in {ref}.",
        hint=f"Credits are proposed when an outage over an hour is resolved; `/db log {ref}` "
        "shows what happened.",
    )
