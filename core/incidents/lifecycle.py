"""The incident desk, ``Incidents``: changing an incident's state (ack, mitigate, severity,
resolve with its SLA credits), the card and its buttons, and customer emails (SOP-201)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlmodel import Session, select

from core import email as mail
from core.customers import Customer, get_customer
from core.errors import DbopsError, NotFound
from core.escalation import (
    PAGE,
    REMINDER,
    REMINDER_EVERY,
    cancel_pending,
    new_token,
    schedule_reminder,
)
from core.incidents.intake import AlertIntake
from core.incidents.model import (
    ACTIVE,
    OUTAGE_KINDS,
    STATUSES,
    CreditProposal,
    Incident,
    Resolution,
    parse_incident_id,
    parse_severity,
    ref,
)
from core.incidents.sla import (
    SLA_THRESHOLD,
    Span,
    _merge_downtime,
    credit_cents,
    downtime_from_timeline,
)
from core.notify import MessageRef
from core.units import pretty_age
from core.windows import Window, windows_overlapping
from storage.events import NewEvent, StoredEvent
from storage.models_incidents import IncidentRow, utc, write_session
from storage.spool import record

log = logging.getLogger("dbops.incidents")


class Incidents(AlertIntake):
    """The incident desk: one per process, shared by the bot, the shell, webhooks and jobs."""

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
        raw = self.downtime(inc.id, until=now, maintenance=False) if inc.is_outage else {}
        spared = {n: raw[n] - downtime.get(n, 0) for n in raw if raw[n] > downtime.get(n, 0)}
        windows = [w.ref for w in self._windows_of(inc, now)] if spared else []
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
        return Resolution(inc, downtime, credits, children, spared, windows)

    # -- SLA ---------------------------------------------------------------------------------

    def _windows_of(self, inc: Incident, end: datetime) -> list[Window]:
        return windows_overlapping(self.engine, inc.opened_at, end, inc.server, inc.customers)

    def _spans(self, inc: Incident, end: datetime) -> dict[str, list[Span]]:
        """Per customer, the maintenance windows that covered it while the incident was open:
        its server's and its own."""
        windows = self._windows_of(inc, end)
        return {
            c: [
                (w.starts_at, w.end)
                for w in windows
                if (w.target_kind == "server" and w.target == inc.server)
                or (w.target_kind == "customer" and w.target == c)
            ]
            for c in inc.customers
        }

    def downtime(
        self, incident_id: int | str, *, until: datetime | None = None, maintenance: bool = True
    ) -> dict[str, int]:
        """Seconds of downtime per customer, from the timelines of the incident and of the
        customers' incidents merged into it (overlaps are counted once per incident). Time
        inside maintenance windows covering a customer is not counted (``maintenance=False``:
        it is)."""
        inc = self.get(incident_id)
        end = utc(until or inc.resolved_at or self.clock())
        own = self.events.query(subject=inc.ref, limit=10_000)
        spans = self._spans(inc, end) if maintenance else {}
        parts = [downtime_from_timeline(own, inc.customers, end, spans)]
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
                    self._spans(child, child_end) if maintenance else {},
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
        restore: Mapping[str, Any] | None = None,
        now: datetime | None = None,
        restart: RestartView | None = None,
    ) -> dict[str, Any]:
        """What the incident card shows, and its buttons with whether each makes sense now.

        ``restart``: the restart policy's decision (core.restarts: ``decide``, or
        ``restart_precondition`` over a status) when the caller took one; without it, what the
        alert says (an outage not recovered); ``restore``: the newest verified backup ({"name",
        "age_s"}) once restores exist. A button whose precondition fails carries ``enabled:
        False`` and the reason, which the card shows instead of acting.
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
            pre: RestartView = restart if restart is not None else _restart_from_incident(inc)
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

    # -- a restart of its server (core.restarts) ---------------------------------------------

    def restarted(
        self,
        incident_id: int | str,
        result: dict[str, Any],
        *,
        actor: str,
        now: datetime | None = None,
    ) -> bool:
        """A restart of the incident's server (core.restarts.restart_on_incident) on its
        timeline; PostgreSQL answering again marks the incident recovered. Best effort
        (storage.spool): False when an event was spooled rather than recorded."""
        inc = self.get(incident_id)
        when = self._now(now)
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
        return not kept

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
        raw = self.downtime(inc.id, maintenance=False) if downtime else {}
        windows = self._windows_of(inc, inc.resolved_at or self.clock()) if downtime else []
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
                "downtime": pretty_age(downtime[name]) if downtime.get(name) else "",
                "maintenance": self._maintenance_said(
                    [w for w in windows if w.covers(inc.server, name)]
                )
                if raw.get(name, 0) > downtime.get(name, 0)
                else "",
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

    def _maintenance_said(self, windows: Sequence[Window]) -> str:
        """The windows as a customer reads them: "2026-03-02 09:00 EST to 09:45 EST"."""
        return "; ".join(
            f"{self._local(w.starts_at)} to {w.end.astimezone(self.tz).strftime('%H:%M %Z')}"
            if w.starts_at.astimezone(self.tz).date() == w.end.astimezone(self.tz).date()
            else f"{self._local(w.starts_at)} to {self._local(w.end)}"
            for w in windows
        )


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


# --- the card's Restart ---------------------------------------------------------------------


class RestartView(Protocol):
    """Whether the card's Restart makes sense now, and why: core.restarts' ``Decision``."""

    @property
    def ok(self) -> bool: ...

    @property
    def reason(self) -> str: ...


@dataclass(frozen=True)
class Precondition:
    ok: bool
    reason: str


def _restart_from_incident(inc: Incident) -> Precondition:
    if inc.kind in OUTAGE_KINDS and inc.recovered_at is None:
        return Precondition(True, "the alert says PostgreSQL is not answering")
    if inc.recovered_at is not None:
        return Precondition(False, "the alert has recovered: PostgreSQL answers again")
    return Precondition(False, "not an outage; check the server's status first")
