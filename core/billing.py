"""Stripe: payments in (SOP-102 onboarding), SLA credits out (SOP-201 resolution step 5).

Webhooks: the signature is checked by the stripe library over the raw body; each Stripe event
is recorded once in the event log under ``source="stripe"`` and its id, so Stripe's retries and
replays are no-ops. A paid ``checkout.session.completed`` (or its late
``checkout.session.async_payment_succeeded``) or a first ``invoice.paid`` (``billing_reason``
``subscription_create``) becomes an ``OnboardingProposal``: the customer name derived and
validated, the plan from the price (``Plan.stripe_price``), a proposed server. A subscription
bought through Checkout sends both events; the proposal is recorded once per subscription
(``source="stripe-onboarding"``), so there is one onboarding card, not two.

Credits: ``apply_credit`` creates a customer balance transaction (a negative amount, which
Stripe takes off the next invoice) with the idempotency key ``sla-credit:{incident}:{customer}``
and records it in ``sla_credits``; pressing Apply again returns the recorded credit without a
second request, and two presses at once share one Stripe object through the key.
``STRIPE_API_BASE`` points the library at another server (tests/stripe_stub.py).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from core.customers import get_customer, list_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet
from core.names import NAME_RE, reserved, validate_name
from core.provisioning import ServerProposal, fleet_roles
from storage.events import EventLog
from storage.models_billing import (
    LockBusy,
    ProvisionJob,
    SlaCredit,
    billing_account,
    link_stripe_customer,
    op_lock,
)
from storage.models_incidents import IncidentRow

log = logging.getLogger("dbops.billing")

MAX_BODY_BYTES = 1 << 20
SIGNATURE_TOLERANCE_S = 300
ONBOARDING_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "invoice.paid",
    }
)
# Addresses at these domains say nothing about the company: use the mailbox name instead.
FREEMAIL = frozenset(
    {
        "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "yahoo.com",
        "icloud.com", "me.com", "proton.me", "protonmail.com", "gmx.com", "gmx.de", "aol.com",
        "fastmail.com", "hey.com", "mail.com", "yandex.com", "zoho.com",
    }
)  # fmt: skip


class BadSignature(DbopsError):
    """The webhook is not from Stripe (or not signed with our secret): answer 400."""


def stripe_proposal(events: EventLog, customer: str) -> dict[str, Any] | None:
    """The newest onboarding proposal a Stripe payment made for ``customer``, as recorded."""
    found = events.query(
        kind="billing.onboarding_proposed", subject=customer, newest_first=True, limit=1
    )
    return dict(found[0].payload) if found else None


def credit_key(incident_id: int, customer: str) -> str:
    return f"sla-credit:{incident_id}:{customer}"


def verify_webhook(
    payload: bytes, signature: str | None, secret: str, *, tolerance: int = SIGNATURE_TOLERANCE_S
) -> dict[str, Any]:
    """The event as JSON once the stripe library has checked ``Stripe-Signature`` over the raw
    body (and that it is recent); BadSignature otherwise."""
    if not signature:
        raise BadSignature("no Stripe-Signature header.")
    try:
        stripe.Webhook.construct_event(payload, signature, secret, tolerance=tolerance)
    except stripe.SignatureVerificationError:
        raise BadSignature(
            "the Stripe-Signature does not match the body (or is too old)."
        ) from None
    except (ValueError, UnicodeDecodeError, IndexError):
        raise BadSignature("the body is not a Stripe event (not JSON).") from None
    data = json.loads(payload)
    if not isinstance(data, dict) or not str(data.get("id", "")).startswith("evt"):
        raise BadSignature("the body is not a Stripe event (no event id).")
    return data


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _id(value: Any) -> str | None:
    """An expandable field: an id string, or an expanded object with ``id``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    found = getattr(value, "id", None)  # a stripe library object
    return found if isinstance(found, str) else None


def normalise_name(text: str) -> str | None:
    """A customer name (``^[a-z][a-z0-9_]{1,62}$``) from free text, or None."""
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not name:
        return None
    if not name[0].isalpha():
        name = f"c_{name}"
    name = name[:63].rstrip("_")
    return name if NAME_RE.fullmatch(name) else None


def name_from_email(email: str) -> str | None:
    local, _, domain = email.lower().partition("@")
    if not domain:
        return None
    if domain in FREEMAIL:
        return normalise_name(local)
    labels = domain.split(".")
    # ops@db.acme.co.uk -> acme: skip the TLD and a second-level like co/com, and "www"/"mail".
    core = [x for x in labels[:-1] if x not in ("www", "mail", "co", "com", "ac", "org", "net")]
    return normalise_name(core[-1]) if core else normalise_name(labels[0])


@dataclass(frozen=True)
class Received:
    """A verified webhook, recorded once. ``duplicate``: Stripe sent this event before."""

    event_id: str
    type: str
    duplicate: bool
    event: dict[str, Any]

    @property
    def actionable(self) -> bool:
        return not self.duplicate and self.type in ONBOARDING_EVENTS


@dataclass(frozen=True)
class OnboardingProposal:
    """What the onboarding card shows and its Provision button carries."""

    stripe_event: str
    event_type: str
    stripe_object: str  # the checkout session or invoice id
    stripe_customer: str | None
    stripe_subscription: str | None
    customer: str | None  # the name proposed for our customer (role and database)
    name_source: str
    email: str | None
    plan: str | None
    price: str | None
    amount_cents: int | None
    currency: str | None
    server: ServerProposal | None
    warnings: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Everything the Provision button needs is there."""
        return bool(
            self.customer and self.plan and self.email and self.server and self.server.server
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "stripe_event": self.stripe_event,
            "event_type": self.event_type,
            "stripe_object": self.stripe_object,
            "stripe_customer": self.stripe_customer,
            "stripe_subscription": self.stripe_subscription,
            "customer": self.customer,
            "name_source": self.name_source,
            "email": self.email,
            "plan": self.plan,
            "price": self.price,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "server": self.server.as_json() if self.server else None,
            "proposed_server": self.server.server if self.server else None,
            "ready": self.ready,
            "warnings": self.warnings,
        }

    def provision_args(self) -> dict[str, Any]:
        """Keyword arguments for Provisioner.provision (plus ``actor``) from this proposal."""
        return {
            "customer": self.customer,
            "plan": self.plan,
            "server": self.server.server if self.server else None,
            "email": self.email,
            "stripe_customer": self.stripe_customer,
            "stripe_subscription": self.stripe_subscription,
        }


@dataclass(frozen=True)
class WebhookOutcome:
    received: Received
    proposal: OnboardingProposal | None


@dataclass(frozen=True)
class CreditResult:
    incident_id: int
    customer: str
    amount_cents: int
    currency: str
    stripe_customer: str
    stripe_txn: str
    idempotency_key: str
    applied_at: datetime
    already_applied: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "incident_id": self.incident_id,
            "customer": self.customer,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "stripe_customer": self.stripe_customer,
            "stripe_txn": self.stripe_txn,
            "idempotency_key": self.idempotency_key,
            "applied_at": self.applied_at.isoformat(),
            "already_applied": self.already_applied,
        }


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _credit_result(row: SlaCredit, *, already: bool) -> CreditResult:
    return CreditResult(
        row.incident_id,
        row.customer,
        row.amount_cents,
        row.currency,
        row.stripe_customer,
        row.stripe_txn,
        row.idempotency_key,
        _aware(row.applied_at),
        already,
    )


class Billing:
    """Stripe in and out; one per process."""

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        *,
        api_key: str | None,
        webhook_secret: str | None,
        api_base: str | None = None,
        propose: Callable[[str], ServerProposal] | None = None,
        max_network_retries: int = 2,
    ) -> None:
        self.engine = engine
        self.events = events
        self._fleet = fleet
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.api_base = api_base.rstrip("/") if api_base else None
        self.propose = propose
        self.max_network_retries = max_network_retries
        self._client: stripe.StripeClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        propose: Callable[[str], ServerProposal] | None = None,
    ) -> Billing:
        """From core.settings.Settings: STRIPE_API_KEY, STRIPE_WEBHOOK_SECRET, STRIPE_API_BASE."""

        def secret(value: Any) -> str | None:
            return value.get_secret_value() if value is not None else None

        base = settings.stripe_api_base
        return cls(
            engine,
            events,
            fleet,
            api_key=secret(settings.stripe_api_key),
            webhook_secret=secret(settings.stripe_webhook_secret),
            api_base=str(base) if base else None,
            propose=propose,
        )

    @property
    def fleet(self) -> Fleet:
        return self._fleet() if callable(self._fleet) else self._fleet

    @property
    def client(self) -> stripe.StripeClient:
        with self._lock:
            if self._client is None:
                if not self.api_key:
                    raise DbopsError(
                        "no Stripe API key configured.", hint="Set STRIPE_API_KEY (sk_...)."
                    )
                bases: Any = {"api": self.api_base} if self.api_base else None
                self._client = stripe.StripeClient(
                    self.api_key,
                    base_addresses=bases,
                    max_network_retries=self.max_network_retries,
                )
            return self._client

    # -- webhooks ------------------------------------------------------------------------------

    def receive(self, payload: bytes, signature: str | None) -> Received:
        """Verify and record one webhook delivery (fast: the HTTP route answers after this)."""
        if not self.webhook_secret:
            raise DbopsError("STRIPE_WEBHOOK_SECRET is not set: the Stripe webhook is off.")
        event = verify_webhook(payload, signature, self.webhook_secret)
        event_id, kind = str(event["id"]), str(event.get("type", ""))
        obj = _get(event, "data", "object") or {}
        delivery = uuid.uuid4().hex
        stored = self.events.append(
            "stripe.event",
            _id(obj.get("customer")) or "stripe",
            {
                "type": kind,
                "id": event_id,
                "object": obj.get("object"),
                "object_id": obj.get("id"),
                "livemode": bool(event.get("livemode")),
                "created": event.get("created"),
                "delivery": delivery,
            },
            actor="stripe",
            source="stripe",
            source_id=event_id,
        )
        duplicate = stored.payload.get("delivery") != delivery
        return Received(event_id, kind, duplicate, event)

    def handle_webhook(self, payload: bytes, signature: str | None) -> WebhookOutcome:
        """``receive`` then ``process``, for callers that can wait (the shell, tests)."""
        received = self.receive(payload, signature)
        return WebhookOutcome(received, self.process(received))

    def process(self, received: Received) -> OnboardingProposal | None:
        """The onboarding proposal a verified event calls for, at most once per purchase."""
        if not received.actionable:
            return None
        obj = _get(received.event, "data", "object") or {}
        if received.type.startswith("checkout.session."):
            if obj.get("payment_status") != "paid":
                return None
            proposal = self._from_checkout(received, obj)
        else:
            if obj.get("billing_reason") != "subscription_create" or obj.get("status") != "paid":
                return None
            proposal = self._from_invoice(received, obj)
        key = (
            f"sub:{proposal.stripe_subscription}"
            if proposal.stripe_subscription
            else f"obj:{proposal.stripe_object}"
        )
        delivery = uuid.uuid4().hex
        stored = self.events.append(
            "billing.onboarding_proposed",
            proposal.customer or proposal.stripe_customer or "stripe",
            {**proposal.as_json(), "delivery": delivery},
            actor="stripe",
            source="stripe-onboarding",
            source_id=key,
        )
        if stored.payload.get("delivery") != delivery:
            return None  # the other event of the same purchase got there first
        return proposal

    def _from_checkout(self, received: Received, s: Mapping[str, Any]) -> OnboardingProposal:
        warnings: list[str] = []
        metadata = s.get("metadata") or {}
        details = s.get("customer_details") or {}
        email = details.get("email") or s.get("customer_email")
        hints = [
            ("client_reference_id", s.get("client_reference_id")),
            ("metadata.customer", metadata.get("customer")),
            ("business name", details.get("business_name")),
            ("customer name", details.get("name")),
        ]
        price = None
        plan = self._plan_from_metadata(metadata, warnings)
        if plan is None:
            price = self._checkout_price(str(s.get("id")), warnings)
            plan = self._plan_for_price(price, warnings)
        return self._proposal(
            received,
            str(s.get("id")),
            _id(s.get("customer")),
            _id(s.get("subscription")),
            hints,
            email,
            plan,
            price,
            s.get("amount_total"),
            s.get("currency"),
            warnings,
        )

    def _from_invoice(self, received: Received, inv: Mapping[str, Any]) -> OnboardingProposal:
        warnings: list[str] = []
        sub_details = _get(inv, "parent", "subscription_details") or {}
        subscription = _id(sub_details.get("subscription")) or _id(inv.get("subscription"))
        metadata = sub_details.get("metadata") or inv.get("metadata") or {}
        hints = [
            ("metadata.customer", metadata.get("customer")),
            ("customer name", inv.get("customer_name")),
        ]
        price = None
        for line in _get(inv, "lines", "data") or []:
            price = (
                _id(_get(line, "pricing", "price_details", "price"))
                or _id(line.get("price"))
                or _id(line.get("plan"))
            )
            if price:
                break
        plan = self._plan_from_metadata(metadata, warnings) or self._plan_for_price(price, warnings)
        return self._proposal(
            received,
            str(inv.get("id")),
            _id(inv.get("customer")),
            subscription,
            hints,
            inv.get("customer_email"),
            plan,
            price,
            inv.get("amount_paid"),
            inv.get("currency"),
            warnings,
        )

    def _proposal(
        self,
        received: Received,
        object_id: str,
        stripe_customer: str | None,
        subscription: str | None,
        hints: list[tuple[str, Any]],
        email: Any,
        plan: str | None,
        price: str | None,
        amount: Any,
        currency: Any,
        warnings: list[str],
    ) -> OnboardingProposal:
        email_s = str(email) if email else None
        if email_s:
            hints.append(("email", name_from_email(email_s)))
        else:
            warnings.append("Stripe sent no email address: the welcome email needs one")
        name, source = self._derive_name(hints, warnings)
        server = None
        if plan and self.propose is not None:
            try:
                server = self.propose(plan)
                if server.server is None:
                    warnings.append(server.reason)
            except DbopsError as exc:
                warnings.append(f"no server proposed: {exc.message[:150]}")
        return OnboardingProposal(
            stripe_event=received.event_id,
            event_type=received.type,
            stripe_object=object_id,
            stripe_customer=stripe_customer,
            stripe_subscription=subscription,
            customer=name,
            name_source=source,
            email=email_s,
            plan=plan,
            price=price,
            amount_cents=int(amount) if isinstance(amount, int) else None,
            currency=str(currency) if currency else None,
            server=server,
            warnings=warnings,
        )

    def _derive_name(
        self, hints: list[tuple[str, Any]], warnings: list[str]
    ) -> tuple[str | None, str]:
        taken = {c.name for c in list_customers(self.engine)}
        with Session(self.engine) as session:
            taken |= set(session.exec(select(ProvisionJob.customer)))
        roles = fleet_roles(self.fleet)
        for source, raw in hints:
            if not raw or not isinstance(raw, str):
                continue
            name = normalise_name(raw)
            if name is None:
                continue
            why = reserved(name) or roles.get(name)
            if why is not None:  # never proposed, not even with a suffix: the next hint
                warnings.append(
                    f"`{name}` (from the {source}) is reserved ({why}); not proposed as the "
                    "customer name"
                )
                continue
            if name not in taken:
                return name, source
            for n in range(2, 100):
                candidate = f"{name[:60]}_{n}"
                if candidate not in taken:
                    warnings.append(
                        f"{name!r} is taken; proposing {candidate!r} (edit it before provisioning)"
                    )
                    return candidate, source
        warnings.append("no customer name could be derived: type one before provisioning")
        return None, "none"

    def _plan_from_metadata(self, metadata: Mapping[str, Any], warnings: list[str]) -> str | None:
        wanted = metadata.get("plan")
        if not wanted:
            return None
        if str(wanted) in self.fleet.plans:
            return str(wanted)
        warnings.append(f"metadata names plan {str(wanted)[:30]!r}, which the fleet file lacks")
        return None

    def _plan_for_price(self, price: str | None, warnings: list[str]) -> str | None:
        if price is None:
            warnings.append("no price found in the payment: choose the plan by hand")
            return None
        for name, plan in sorted(self.fleet.plans.items()):
            if plan.stripe_price == price:
                return name
        warnings.append(
            f"price {price} is not any plan's stripe_price in the fleet file: choose by hand"
        )
        return None

    def _checkout_price(self, session_id: str, warnings: list[str]) -> str | None:
        """A Checkout Session's line items are not in the event; ask Stripe for them."""
        try:
            items = self.client.v1.checkout.sessions.line_items.list(session_id, {"limit": 10})
        except DbopsError as exc:
            warnings.append(f"cannot read the line items: {exc.message}")
            return None
        except stripe.StripeError as exc:
            warnings.append(f"cannot read the line items from Stripe: {_stripe_reason(exc)}")
            return None
        for item in items.data:
            found = _id(getattr(item, "price", None))
            if found:
                return found
        return None

    # -- SLA credits ---------------------------------------------------------------------------

    def credit(self, incident_id: int, customer: str) -> CreditResult | None:
        """The credit already applied for (incident, customer), if any."""
        with Session(self.engine) as session:
            row = session.exec(
                select(SlaCredit).where(
                    SlaCredit.incident_id == incident_id, SlaCredit.customer == customer
                )
            ).first()
            return _credit_result(row, already=True) if row else None

    def apply_credit(
        self, incident_id: int, customer: str, amount_cents: int, actor: str
    ) -> CreditResult:
        """Apply an SLA credit as a Stripe customer balance transaction, once.

        Refused: an unknown incident or one not about this customer, an amount over a month of
        the customer's plan, a customer without a Stripe customer on record.
        """
        validate_name(customer)
        if isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents <= 0:
            raise DbopsError("a credit is a positive whole number of cents.")
        self._check_incident(incident_id, customer)
        self._check_amount(customer, amount_cents)
        done = self.credit(incident_id, customer)
        if done is not None:
            return done
        account = billing_account(self.engine, customer)
        if account is None:
            raise DbopsError(
                f"{customer} has no Stripe customer on record; no credit was applied.",
                hint="Link it (provisioning from a Stripe payment does), or credit by hand.",
            )
        key = credit_key(incident_id, customer)
        owner = uuid.uuid4().hex
        try:
            with op_lock(self.engine, f"credit:{incident_id}:{customer}", owner,
                         lease=timedelta(minutes=5), holder=actor):  # fmt: skip
                done = self.credit(incident_id, customer)
                if done is not None:
                    return done
                return self._create_credit(
                    incident_id, customer, amount_cents, account.stripe_customer, key, actor
                )
        except LockBusy:
            raise DbopsError(
                f"the credit for {customer} (inc-{incident_id}) is being applied right now."
            ) from None

    def _check_incident(self, incident_id: int, customer: str) -> None:
        with Session(self.engine) as session:
            row = session.get(IncidentRow, incident_id)
        if row is None:
            raise NotFound(f"no incident inc-{incident_id}.")
        if customer not in (row.customers or []) and customer not in (
            row.recovered_customers or []
        ):
            raise DbopsError(f"inc-{incident_id} is not about {customer}; no credit applied.")

    def _check_amount(self, customer: str, amount_cents: int) -> None:
        c = get_customer(self.engine, customer)
        plan = self.fleet.plans.get(c.plan or "")
        if plan is not None and amount_cents > plan.price_usd_month * 100:
            raise DbopsError(
                f"{amount_cents / 100:.2f} USD is more than a month of {customer}'s plan "
                f"({plan.price_usd_month} USD); no credit applied."
            )

    def _create_credit(
        self,
        incident_id: int,
        customer: str,
        amount_cents: int,
        stripe_customer: str,
        key: str,
        actor: str,
    ) -> CreditResult:
        ref = f"inc-{incident_id}"
        try:
            txn = self.client.v1.customers.balance_transactions.create(
                stripe_customer,
                {
                    "amount": -amount_cents,
                    "currency": "usd",
                    "description": f"SLA credit: {ref} downtime for {customer}",
                    "metadata": {"incident": ref, "customer": customer, "actor": actor},
                },
                {"idempotency_key": key},
            )
        except stripe.StripeError as exc:
            reason = _stripe_reason(exc)
            self.events.append(
                "billing.credit_failed",
                customer,
                {"incident": ref, "amount_cents": amount_cents, "error": reason},
                actor=actor,
            )
            raise DbopsError(f"Stripe did not apply the credit: {reason}") from None
        row = SlaCredit(
            incident_id=incident_id,
            customer=customer,
            amount_cents=amount_cents,
            currency="usd",
            idempotency_key=key,
            stripe_customer=stripe_customer,
            stripe_txn=str(txn.id),
            actor=actor,
        )
        try:
            with Session(self.engine) as session:
                session.add(row)
                session.commit()
                session.refresh(row)
        except IntegrityError:
            done = self.credit(incident_id, customer)
            if done is None:
                raise
            return done
        result = _credit_result(row, already=False)
        self.events.append(
            "billing.credit_applied",
            customer,
            {**result.as_json(), "incident": ref},
            actor=actor,
            source="sla-credit",
            source_id=key,
        )
        return result

    def link(self, customer: str, stripe_customer: str, actor: str) -> None:
        """Link an existing customer to their Stripe customer (for credits)."""
        get_customer(self.engine, customer)
        if not re.fullmatch(r"cus_[A-Za-z0-9]{1,64}", stripe_customer):
            raise DbopsError(f"{stripe_customer[:40]!r} is not a Stripe customer id (cus_...).")
        try:
            link_stripe_customer(self.engine, customer, stripe_customer)
        except ValueError as exc:
            raise DbopsError(str(exc)) from None
        self.events.append(
            "billing.linked", customer, {"stripe_customer": stripe_customer}, actor=actor
        )


def _stripe_reason(exc: stripe.StripeError) -> str:
    text = exc.user_message or type(exc).__name__
    status = getattr(exc, "http_status", None)
    return (f"{text} (HTTP {status})" if status else str(text))[:200]


__all__ = [
    "BadSignature",
    "Billing",
    "CreditResult",
    "OnboardingProposal",
    "Received",
    "WebhookOutcome",
    "credit_key",
    "name_from_email",
    "normalise_name",
    "verify_webhook",
]
