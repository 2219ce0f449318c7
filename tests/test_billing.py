"""Stripe in and out: signed webhooks become one onboarding proposal; SLA credits go out once.

Events are built in the shape Stripe documents (an Event wrapping a Checkout Session or an
Invoice) and signed the way Stripe signs them (``t=<ts>,v1=HMAC-SHA256(secret, "<ts>.<body>")``),
computed here rather than by the library under test. Credits go to tests/stripe_stub.py through
the real stripe library (STRIPE_API_BASE).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from starlette.applications import Starlette

from bot.web.stripe import stripe_routes
from core.billing import BadSignature, Billing, OnboardingProposal, name_from_email
from core.customers import Customer, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet, parse_fleet
from core.incidents import Incidents
from core.provisioning import ServerCapacity, ServerProposal
from storage.events import EventLog
from storage.models_billing import link_stripe_customer
from tests.stripe_stub import StripeStub, running_stub

SECRET = "whsec_test_0123456789abcdef"
API_KEY = "sk_test_dbops"
CAROL = "U0CAROL"  # the admin who presses Apply
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


def sign(body: bytes, secret: str = SECRET, at: int | None = None) -> str:
    ts = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def event(kind: str, obj: dict[str, Any], event_id: str) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": int(time.time()),
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": kind,
        }
    ).encode()


def checkout_session(**over: Any) -> dict[str, Any]:
    """A Checkout Session as Stripe documents it (subscription mode, paid)."""
    session = {
        "id": "cs_test_a1NewCo",
        "object": "checkout.session",
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": 1500,
        "amount_total": 1500,
        "billing_address_collection": None,
        "cancel_url": "https://costplusdb.example/cancel",
        "client_reference_id": None,
        "created": int(time.time()) - 60,
        "currency": "usd",
        "customer": "cus_NewCo01",
        "customer_creation": "always",
        "customer_details": {
            "address": {"city": None, "country": "US", "line1": None, "postal_code": "94103"},
            "business_name": "NewCo Labs",
            "email": "ops@newco-labs.example.com",
            "name": "Jenny Rosen",
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        },
        "customer_email": None,
        "expires_at": int(time.time()) + 86000,
        "invoice": "in_1NewCo",
        "livemode": False,
        "locale": None,
        "metadata": {},
        "mode": "subscription",
        "payment_intent": None,
        "payment_method_types": ["card"],
        "payment_status": "paid",
        "status": "complete",
        "submit_type": None,
        "subscription": "sub_1NewCo",
        "success_url": "https://costplusdb.example/thanks",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "url": None,
    }
    session.update(over)
    return session


def first_invoice(**over: Any) -> dict[str, Any]:
    """An Invoice as Stripe documents it for API 2025-03-31 and later (parent, pricing)."""
    invoice = {
        "id": "in_1NewCo",
        "object": "invoice",
        "amount_due": 1500,
        "amount_paid": 1500,
        "billing_reason": "subscription_create",
        "currency": "usd",
        "customer": "cus_NewCo01",
        "customer_email": "ops@newco-labs.example.com",
        "customer_name": "Jenny Rosen",
        "lines": {
            "object": "list",
            "data": [
                {
                    "id": "il_1",
                    "object": "line_item",
                    "amount": 1500,
                    "currency": "usd",
                    "pricing": {
                        "type": "price_details",
                        "price_details": {"price": "price_small_monthly", "product": "prod_db"},
                        "unit_amount_decimal": "1500",
                    },
                    "quantity": 1,
                }
            ],
            "has_more": False,
        },
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"metadata": {}, "subscription": "sub_1NewCo"},
        },
        "status": "paid",
    }
    invoice.update(over)
    return invoice


@pytest.fixture
def fleet() -> Fleet:
    return parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}],
            "plans": {
                "small": {
                    "ram_mb": 1024,
                    "storage_gb": 10,
                    "connection_limit": 20,
                    "price_usd_month": 15,
                    "stripe_price": "price_small_monthly",
                },
                "large": {
                    "ram_mb": 4096,
                    "storage_gb": 60,
                    "connection_limit": 100,
                    "price_usd_month": 59,
                    "stripe_price": "price_large_monthly",
                },
            },
        }
    )


@pytest.fixture
def stub() -> Iterator[StripeStub]:
    with running_stub() as s:
        yield s


def proposer(plan: str) -> ServerProposal:
    cap = ServerCapacity("vps1", True, customers=2, fits=True, load_after=0.3)
    return ServerProposal(plan, "vps1", [cap], "vps1 has the most room")


@pytest.fixture
def billing(engine: Engine, fleet: Fleet, stub: StripeStub) -> Billing:
    upsert_customers(
        engine, [Customer("acme", "vps1", "acme", "acme", "small", "ops@acme.example.com")]
    )
    return Billing(
        engine,
        EventLog(engine),
        fleet,
        api_key=API_KEY,
        webhook_secret=SECRET,
        api_base=stub.base_url,
        propose=proposer,
        max_network_retries=0,
    )


def post_all(app: Starlette, deliveries: list[tuple[bytes, str | None]]) -> list[httpx.Response]:
    """POST each body to the app in turn, as Stripe would (the ASGI app runs in process; its
    background work finishes before the call returns)."""

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dbops") as client:
            out = []
            for body, signature in deliveries:
                headers = {"Stripe-Signature": signature} if signature else {}
                out.append(await client.post("/stripe/webhook", content=body, headers=headers))
            return out

    return asyncio.run(run())


# --- webhooks -----------------------------------------------------------------------------------


def test_paid_checkout_session_gives_one_onboarding_proposal(
    billing: Billing, stub: StripeStub
) -> None:
    stub.line_items["cs_test_a1NewCo"] = ["price_small_monthly"]
    body = event("checkout.session.completed", checkout_session(), "evt_1Checkout")

    first = billing.handle_webhook(body, sign(body))
    again = billing.handle_webhook(body, sign(body))  # Stripe retries, or replays

    assert first.proposal is not None and not first.received.duplicate
    p = first.proposal
    assert (p.customer, p.name_source, p.plan, p.email) == (
        "newco_labs",
        "business name",
        "small",
        "ops@newco-labs.example.com",
    )
    assert (p.stripe_customer, p.stripe_subscription, p.price) == (
        "cus_NewCo01",
        "sub_1NewCo",
        "price_small_monthly",
    )
    assert p.server is not None and p.server.server == "vps1" and p.ready
    assert p.provision_args()["customer"] == "newco_labs"
    assert again.received.duplicate and again.proposal is None
    # The price came from Stripe's line items endpoint (the event does not carry them).
    assert [r.path for r in stub.requests] == ["/v1/checkout/sessions/cs_test_a1NewCo/line_items"]
    stored = billing.events.query(kind="stripe.event", limit=10)
    assert [e.source_id for e in stored] == ["evt_1Checkout"]
    proposals = billing.events.query(kind="billing.onboarding_proposed", limit=10)
    assert len(proposals) == 1 and proposals[0].payload["customer"] == "newco_labs"


def test_first_invoice_of_the_same_subscription_adds_no_second_card(
    billing: Billing, stub: StripeStub
) -> None:
    stub.line_items["cs_test_a1NewCo"] = ["price_small_monthly"]
    checkout = event("checkout.session.completed", checkout_session(), "evt_1Checkout")
    invoice = event("invoice.paid", first_invoice(), "evt_2Invoice")
    assert billing.handle_webhook(checkout, sign(checkout)).proposal is not None
    outcome = billing.handle_webhook(invoice, sign(invoice))
    assert not outcome.received.duplicate and outcome.proposal is None


def test_first_invoice_alone_proposes_from_its_line_price(billing: Billing) -> None:
    inv = first_invoice(
        id="in_2Other",
        customer="cus_Other02",
        customer_email="dba@globex.example.com",
        parent={
            "type": "subscription_details",
            "subscription_details": {"metadata": {}, "subscription": "sub_2Other"},
        },
    )
    inv["lines"]["data"][0]["pricing"]["price_details"]["price"] = "price_large_monthly"
    body = event("invoice.paid", inv, "evt_3Invoice")
    p = billing.handle_webhook(body, sign(body)).proposal
    assert p is not None
    assert (p.plan, p.customer, p.name_source) == ("large", "jenny_rosen", "customer name")


@pytest.mark.parametrize(
    ("kind", "obj"),
    [
        ("checkout.session.completed", checkout_session(payment_status="unpaid")),
        ("invoice.paid", first_invoice(billing_reason="subscription_cycle")),
        ("customer.created", {"id": "cus_X", "object": "customer"}),
    ],
)
def test_unpaid_renewals_and_other_events_propose_nothing(
    billing: Billing, kind: str, obj: dict[str, Any]
) -> None:
    body = event(kind, obj, f"evt_other_{kind.replace('.', '_')}")
    outcome = billing.handle_webhook(body, sign(body))
    assert outcome.proposal is None and not outcome.received.duplicate


def test_name_taken_gets_a_suffix_and_a_warning(billing: Billing, stub: StripeStub) -> None:
    stub.line_items["cs_test_acme2"] = ["price_small_monthly"]
    body = event(
        "checkout.session.completed",
        checkout_session(id="cs_test_acme2", client_reference_id="acme", subscription="sub_A2"),
        "evt_4Acme",
    )
    p = billing.handle_webhook(body, sign(body)).proposal
    assert p is not None and p.customer == "acme_2" and p.name_source == "client_reference_id"
    assert any("taken" in w for w in p.warnings)


def test_names_from_email() -> None:
    assert name_from_email("ops@db.acme.co.uk") == "acme"
    assert name_from_email("Jane.Doe@gmail.com") == "jane_doe"
    assert name_from_email("sales@123shop.com") == "c_123shop"


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "t=1,v1=deadbeef",
        sign(b"{}"),  # signed, but another body
        "garbage",
    ],
    # Named, not shown: the signed one holds the time it was made (pytest-xdist's workers must
    # collect the same ids).
    ids=["none", "empty", "stale", "another-body", "garbage"],
)
def test_bad_signature_is_refused_and_not_recorded(billing: Billing, signature: str | None) -> None:
    body = event("checkout.session.completed", checkout_session(), "evt_forged")
    with pytest.raises(BadSignature):
        billing.receive(body, signature)
    assert billing.events.query(kind="stripe.event", limit=5) == []


def test_old_or_wrong_secret_signature_is_refused(billing: Billing) -> None:
    body = event("checkout.session.completed", checkout_session(), "evt_old")
    with pytest.raises(BadSignature):
        billing.receive(body, sign(body, at=int(time.time()) - 3600))  # a replay an hour later
    with pytest.raises(BadSignature):
        billing.receive(body, sign(body, secret="whsec_someone_else"))


def test_http_route_400_on_bad_signature_one_card_when_sent_twice(
    billing: Billing, stub: StripeStub
) -> None:
    stub.line_items["cs_test_a1NewCo"] = ["price_small_monthly"]
    cards: list[OnboardingProposal] = []
    app = Starlette(routes=stripe_routes(lambda: billing, cards.append))
    body = event("checkout.session.completed", checkout_session(), "evt_http1")
    bad, ok, twice = post_all(
        app,
        [(body, "t=1,v1=0"), (body, sign(body)), (body, sign(body))],
    )
    assert bad.status_code == 400 and "Stripe-Signature" in bad.json()["error"]
    assert ok.status_code == 200 and ok.json() == {
        "received": True,
        "id": "evt_http1",
        "duplicate": False,
    }
    assert twice.status_code == 200 and twice.json()["duplicate"] is True
    assert [c.customer for c in cards] == ["newco_labs"]


def test_http_route_is_off_without_a_secret(billing: Billing) -> None:
    billing.webhook_secret = None
    app = Starlette(routes=stripe_routes(lambda: billing, lambda p: None))
    (off,) = post_all(app, [(b"{}", None)])
    assert off.status_code == 503


# --- SLA credits ----------------------------------------------------------------------------------


@pytest.fixture
def two_hour_outage(billing: Billing, engine: Engine, fleet: Fleet) -> tuple[int, int]:
    """acme down two hours (inc resolved); (incident id, proposed credit in cents)."""
    desk = Incidents(engine, billing.events, fleet)
    inc = desk.open(
        "acme's database down", "P0", actor="U0ALICE", customers=["acme"], kind="db_down", now=T0
    )
    resolution = desk.resolve(inc.id, "disk full", actor="U0ALICE", now=T0 + timedelta(hours=2))
    (credit,) = resolution.credits
    assert credit.customer == "acme" and credit.credit_cents
    link_stripe_customer(engine, "acme", "cus_Acme0001")
    return inc.id, credit.credit_cents


def test_credit_reaches_stripe_once_with_the_idempotency_key(
    billing: Billing, stub: StripeStub, two_hour_outage: tuple[int, int]
) -> None:
    incident, cents = two_hour_outage
    first = billing.apply_credit(incident, "acme", cents, CAROL)
    again = billing.apply_credit(incident, "acme", cents, CAROL)  # Apply pressed twice

    posts = stub.posts("/v1/customers/")
    assert len(posts) == 1
    assert posts[0].path == "/v1/customers/cus_Acme0001/balance_transactions"
    assert posts[0].idempotency_key == f"sla-credit:{incident}:acme"
    assert posts[0].params["amount"] == str(-cents) and posts[0].params["currency"] == "usd"
    assert len(stub.balance_transactions) == 1
    assert stub.balance_transactions[0]["amount"] == -cents
    assert not first.already_applied and again.already_applied
    assert first.stripe_txn == again.stripe_txn == stub.balance_transactions[0]["id"]
    applied = billing.events.query(kind="billing.credit_applied", limit=5)
    assert len(applied) == 1 and applied[0].actor == CAROL


def test_two_presses_at_once_make_one_stripe_transaction(
    billing: Billing, stub: StripeStub, two_hour_outage: tuple[int, int]
) -> None:
    incident, cents = two_hour_outage
    results: list[Any] = []
    start = threading.Barrier(2)

    def press() -> None:
        start.wait()
        try:
            results.append(billing.apply_credit(incident, "acme", cents, CAROL))
        except DbopsError as exc:  # the other press holds the lock: told so, nothing sent
            results.append(exc)

    threads = [threading.Thread(target=press) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(stub.balance_transactions) == 1
    assert len({r.stripe_txn for r in results if not isinstance(r, Exception)}) == 1


def test_the_stripe_key_makes_a_lost_reply_harmless(
    billing: Billing, stub: StripeStub, two_hour_outage: tuple[int, int]
) -> None:
    """Stripe created the credit but our record of it was lost: pressing Apply again sends the
    same key, Stripe answers with the same object, and nothing is credited twice."""
    incident, cents = two_hour_outage
    billing.apply_credit(incident, "acme", cents, CAROL)
    from sqlmodel import Session, delete

    from storage.models_billing import SlaCredit

    with Session(billing.engine) as session:
        session.exec(delete(SlaCredit))  # type: ignore[call-overload]
        session.commit()
    billing.apply_credit(incident, "acme", cents, CAROL)
    posts = stub.posts("/v1/customers/")
    assert len(posts) == 2 and posts[1].replayed
    assert len(stub.balance_transactions) == 1


def test_credit_refusals(
    billing: Billing, engine: Engine, stub: StripeStub, two_hour_outage: tuple[int, int]
) -> None:
    incident, _ = two_hour_outage
    with pytest.raises(DbopsError, match="more than a month"):
        billing.apply_credit(incident, "acme", 15_01, CAROL)
    with pytest.raises(DbopsError, match="no incident"):
        billing.apply_credit(incident + 99, "acme", 100, CAROL)
    with pytest.raises(DbopsError, match="positive"):
        billing.apply_credit(incident, "acme", 0, CAROL)
    upsert_customers(engine, [Customer("globex", "vps1", "globex", "globex", "small")])
    with pytest.raises(DbopsError, match="not about globex"):
        billing.apply_credit(incident, "globex", 100, CAROL)
    assert stub.posts() == []


def test_credit_without_a_stripe_customer_says_so(
    billing: Billing, engine: Engine, fleet: Fleet, stub: StripeStub
) -> None:
    desk = Incidents(engine, billing.events, fleet)
    inc = desk.open("acme down", "P0", actor="U0ALICE", customers=["acme"], now=T0)
    with pytest.raises(DbopsError, match="no Stripe customer on record"):
        billing.apply_credit(inc.id, "acme", 100, CAROL)
    assert stub.posts() == []
