"""Provisioning, the Stripe onboarding card and the SLA credit's Apply button, from Slack.

Carol (an admin) types `/db provision newco --plan small` in #db-ops: a signed slash command into
the real HTTP app (Starlette + Bolt), the reply on the response_url of our Slack stub. A run
stopped half-way (core's failpoint) is finished by running it again: one role, one database, one
welcome email, and the password is in that email only. A paid Stripe checkout posted to the same
app puts one onboarding card in the ops channel, however often Stripe sends it; Carol presses its
Provision button. An outage over an hour resolved in Slack offers an Apply button for the SLA
credit; pressed twice, Stripe (our stub) is asked once. Alice (an operator) and Bob (a viewer)
are told no.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
import time_machine
from aiosmtpd.controller import Controller
from starlette.routing import BaseRoute

from bot.commands.roles import Roles
from bot.commands.router import Invocation, Router
from bot.runtime import Runtime
from bot.slack.background import build_services
from bot.web.asgi import build_asgi, webhook_routes
from core.customers import customer_from_mapping, get_customer, upsert_customers
from core.fleet import Fleet
from core.settings import load_settings
from storage.events import canonical
from storage.migrate import upgrade
from storage.models_billing import billing_account, link_stripe_customer
from tests.bot_kit import make_router
from tests.pgserver import free_port
from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, Call, SlackStub, action_body, slash_body
from tests.slack_stub import sign as slack_sign
from tests.stripe_stub import StripeStub, running_stub
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    admin,
    drop_everything,
    restore_server_logs,
)
from tests.test_billing import API_KEY, checkout_session, event
from tests.test_billing import SECRET as WEBHOOK_SECRET
from tests.test_billing import sign as stripe_sign
from tests.test_pgbouncer import forget
from tests.test_provisioning import Inbox, body_of, emailed_password, server_state

ALICE, BOB, CAROL = "U_ALICE", "U_BOB", "U_CAROL"  # operator, viewer, admin
OPS = "C0DBOPS"
TZ = ZoneInfo("America/New_York")
PRICE = "price_small_monthly"


@dataclass
class Env:
    rt: Runtime
    router: Router
    routes: list[BaseRoute]
    slack: SlackStub
    stripe: StripeStub
    inbox: Inbox
    made: list[str] = field(default_factory=list)  # customers to drop from the sandbox after


@pytest.fixture(scope="module")
def env(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    inbox, smtp_port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    # The sandbox's plans, with small sold at a Stripe price (the card takes the plan from it).
    plans = {**sandbox_fleet.plans}
    plans["small"] = plans["small"].model_copy(update={"stripe_price": PRICE})
    fleet = sandbox_fleet.model_copy(update={"plans": plans})
    with SlackStub() as slack, running_stub() as stripe:
        settings = load_settings(
            database_url=f"sqlite:///{tmp_path_factory.mktemp('provision') / 'dbops.db'}",
            slack_bot_token=BOT_TOKEN,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_url=slack.base_url,
            ops_channel=OPS,
            dbops_operators=ALICE,
            dbops_admins=CAROL,
            stripe_api_key=API_KEY,
            stripe_webhook_secret=WEBHOOK_SECRET,
            stripe_api_base=stripe.base_url,
            smtp_url=f"smtp://127.0.0.1:{smtp_port}?from=jeremy@costplusdb.example",
            timezone=str(TZ),
        )
        rt = Runtime(settings, fleet=fleet)
        upgrade(rt.engine)
        upsert_customers(rt.engine, [customer_from_mapping(c) for c in sandbox["customers"]])
        router = make_router(rt, Roles.from_settings(settings))
        made: list[str] = []
        try:
            yield Env(rt, router, webhook_routes(rt), slack, stripe, inbox, made)
        finally:
            controller.stop()
            rt.close()
            for name in made:  # leave the session sandbox as it was
                for spec in sandbox["servers"]:
                    forget(sandbox_fleet.server(spec["name"]), name)  # its pgBouncer entry
                    drop_everything(admin(sandbox, spec["name"]), name)
                    shutil.rmtree(Path(spec["backup_path"]) / name, ignore_errors=True)
            rt.engine.dispose()


# --- Slack and Stripe as they reach `dbops serve` -----------------------------------------------


def post(env: Env, path: str, body: str | bytes, headers: dict[str, str]) -> httpx.Response:
    """One request into the real HTTP app (Starlette, Bolt, the Stripe route) in process; the
    work after the ack (and the Stripe route's background task) finishes before this returns."""
    services = build_services(env.rt, router=env.router)
    app = build_asgi(env.rt, services=services, socket_mode=False, extra_routes=env.routes)

    async def scenario() -> httpx.Response:
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dbops") as client:
                resp = await client.post(path, content=body, headers=headers)
            await services.background.drain(timeout=120)
            return resp
        finally:
            services.background.close()
            await services.replier.close()

    return asyncio.run(scenario())


def slash(env: Env, user: str, text: str) -> Call:
    """`/db <text>` typed by ``user`` in #db-ops; the reply Slack got on the response_url."""
    token = uuid.uuid4().hex
    body = slash_body(text, user=user, response_url=env.slack.response_url(token), channel=OPS)
    assert post(env, "/slack/events", body, slack_sign(body)).status_code == 200
    return env.slack.wait_for(lambda c: c.path == f"/response/{token}")


def press(env: Env, user: str, button: dict[str, Any]) -> Call:
    """``user`` presses a button of a message we posted (confirming its dialog, if any)."""
    token = uuid.uuid4().hex
    body = action_body(
        button["action_id"],
        button["value"],
        user=user,
        response_url=env.slack.response_url(token),
        channel=OPS,
    )
    assert post(env, "/slack/events", body, slack_sign(body)).status_code == 200
    return env.slack.wait_for(lambda c: c.path == f"/response/{token}")


def stripe_post(env: Env, body: bytes) -> httpx.Response:
    return post(env, "/stripe/webhook", body, {"Stripe-Signature": stripe_sign(body)})


def buttons(call: Call) -> list[dict[str, Any]]:
    return [
        el
        for block in call.body.get("blocks") or []
        if block["type"] == "actions"
        for el in block["elements"]
    ]


def typed_then_pressed(env: Env, user: str, text: str) -> tuple[Call, Call]:
    """`/db <text>` typed, which runs nothing and answers with a Provision button behind a
    confirm dialog; then ``user`` presses it. (the preview, what the press did)"""
    preview = slash(env, user, text)
    (button,) = buttons(preview)
    assert button["action_id"] == "db_provision", preview.text
    assert button["style"] == "danger" and button["confirm"]["style"] == "danger"
    assert "Press Provision to go ahead" in preview.text, preview.text
    return preview, press(env, user, button)


def newcomer(env: Env, prefix: str = "newco") -> str:
    name = f"{prefix}_{secrets.token_hex(3)}"
    env.made.append(name)
    return name


def connects(sandbox: dict[str, Any], server: str, name: str, password: str) -> bool:
    port = next(s for s in sandbox["servers"] if s["name"] == server)["port"]
    conninfo = f"host=127.0.0.1 port={port} dbname={name} user={name} password={password}"
    with psycopg.connect(conninfo, connect_timeout=5) as conn:
        return conn.execute("SELECT current_user, current_database()").fetchone() == (name, name)


# --- /db provision ------------------------------------------------------------------------------


def test_provision_from_slack_finishes_after_a_failure_and_the_password_goes_only_by_email(
    env: Env, sandbox: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env.inbox.messages.clear()
    name = newcomer(env)
    provisioner = env.rt.onboarding.provisioner
    provisioner.failpoints.add("after:role")
    try:
        # Typed, it runs nothing yet: it says where it will go (no --server: the one with the
        # most room) and to whom the password goes, and its button carries both.
        shown = slash(env, CAROL, f"provision {name} --plan small --email ops@newco.example.com")
        assert shown.body["response_type"] == "ephemeral"
        (button,) = buttons(shown)
        chosen = button["value"].split("--server ")[1].split()[0]
        assert provisioner.job(name) is None and server_state(sandbox, chosen, name)["roles"] == []
        assert button["value"] == (
            f"provision {name} --plan small --server {chosen} --email ops@newco.example.com"
        )
        assert f"creates {name}'s role and database (plan small) on {chosen}," in shown.text
        assert f"Chosen by capacity: {chosen} has the most room" in shown.text
        assert "welcome email to ops@newco.example.com" in shown.text
        assert button["style"] == "danger" and button["confirm"]["style"] == "danger"
        first = press(env, CAROL, button)
    finally:
        provisioner.failpoints.discard("after:role")
    assert first.body["response_type"] == "ephemeral"
    assert "stopped at role" in first.text and "run it again" in first.text, first.text
    job = provisioner.job(name)
    assert job is not None and job.server == chosen
    server = job.server
    halfway = server_state(sandbox, server, name)
    assert len(halfway["roles"]) == 1 and halfway["dbs"] == [] and env.inbox.messages == []

    # Again, the address as Slack sends a typed one (should_escape): the job is finished.
    shown, again = typed_then_pressed(
        env,
        CAROL,
        f"provision {name} --plan small "
        "--email <mailto:ops@newco.example.com|ops@newco.example.com>",
    )
    assert f"finishes provisioning {name} on {server}" in shown.text, shown.text
    assert "stopped after role" in shown.text
    assert again.body["response_type"] == "in_channel"
    assert f"Finished provisioning *{name}* on *{server}*" in again.text, again.text
    assert "welcome email sent to ops@newco.example.com" in again.text

    state = server_state(sandbox, server, name)
    assert len(state["roles"]) == 1 and state["dbs"] == [(name, False, True)]
    (mail,) = env.inbox.messages
    assert mail["To"] == "ops@newco.example.com"
    password = emailed_password(mail)
    assert connects(sandbox, server, name, password)
    assert get_customer(env.rt.engine, name).plan == "small"  # backups and monitoring on
    assert f"postgresql://{name}:{password}@" in body_of(mail)

    # The password is in no Slack call (every kind, every body and header), no event, no log
    # record (but the test SMTP server's own, which logs the mail it receives).
    secret = state["roles"][0][0].split("$", 1)[1]
    places = {
        "Slack": [json.dumps([c.path, c.headers, c.body]) for c in env.slack.calls],
        "event log": [canonical(e.as_json()) for e in env.rt.events.iter_all()],
        "log": [
            r.getMessage() + (r.exc_text or "") for r in caplog.records if r.name != "mail.log"
        ],
    }
    assert len(places["Slack"]) >= 2 and len(places["event log"]) > 20
    for where, texts in places.items():
        for text in texts:
            assert password not in text, f"the password is in the {where}"
            assert secret not in text, f"the SCRAM secret is in the {where}"
    done = env.rt.events.query(kind="provision.done", subject=name)
    assert len(done) == 1 and done[0].actor == CAROL
    assert len(env.rt.events.query(kind="email.sent", subject=name)) == 1


def test_only_admins_provision_and_bad_input_says_what_to_do(env: Env) -> None:
    name = newcomer(env)
    provisioner = env.rt.onboarding.provisioner

    denied = slash(env, ALICE, f"provision {name} --plan small --email ops@newco.example.com")
    assert denied.body["response_type"] == "ephemeral"
    assert "needs the admin role" in denied.text and "DBOPS_ADMINS" in denied.text
    assert env.rt.events.query(kind="auth.denied", subject=name)

    no_plan = slash(env, CAROL, f"provision {name} --plan gigantic --email ops@n.example.com")
    assert "no plan 'gigantic'" in no_plan.text
    for plan in ("small", "medium", "large"):
        assert plan in no_plan.text, plan
    assert "Usage" in no_plan.text and "--plan" in no_plan.text

    assert "not a plan name" in slash(env, CAROL, f"provision {name} --plan sm@ll").text
    no_mail = slash(env, CAROL, f"provision {name} --plan small")
    assert "no email address" in no_mail.text and "--email" in no_mail.text
    bad_mail = slash(env, CAROL, f"provision {name} --plan small --email nope")
    assert "not an email address" in bad_mail.text
    hostile = slash(env, CAROL, "provision x;drop --plan small --email a@b.example.com")
    assert "not a valid customer name" in hostile.text
    assert provisioner.job(name) is None  # none of it started anything


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("pgbouncer", "`pgbouncer` is reserved (pgBouncer's own admin user"),
        ("postgres", "`postgres` is reserved (PostgreSQL's superuser"),
        ("template1", "`template1` is reserved (PostgreSQL's template databases"),
        ("pg_foo", "`pg_foo` is reserved (PostgreSQL reserves role names that start with pg_"),
        ("dbops_monitor", "`dbops_monitor` is reserved (the monitoring role in vps1's dsn"),
    ],
)
def test_a_reserved_name_typed_is_refused_at_once_and_says_what_to_do(
    env: Env, name: str, why: str
) -> None:
    provisioner = env.rt.onboarding.provisioner
    refused = slash(env, CAROL, f"provision {name} --plan small --email ops@n.example.com")
    assert why in refused.text and "choose another customer name" in refused.text, refused.text
    assert "/db provision &lt;name&gt; --plan" in refused.text or "/db provision <name>" in (
        refused.text
    )
    assert buttons(refused) == [] and provisioner.job(name) is None


# --- the Stripe onboarding card ------------------------------------------------------------------


def test_a_paid_checkout_posts_one_card_whose_button_provisions(
    env: Env, sandbox: dict[str, Any]
) -> None:
    env.inbox.messages.clear()
    seed = secrets.token_hex(3)
    name = f"prov_{seed}_labs"
    env.made.append(name)
    session_id, customer = f"cs_test_{seed}", f"cus_Prov{seed}"
    env.stripe.line_items[session_id] = [PRICE]
    details = {
        **checkout_session()["customer_details"],
        "business_name": f"Prov {seed} Labs",
        "email": f"dba@prov-{seed}.example.com",
    }
    session = checkout_session(
        id=session_id, customer=customer, subscription=f"sub_{seed}", customer_details=details
    )
    body = event("checkout.session.completed", session, f"evt_{seed}")

    first, again = stripe_post(env, body), stripe_post(env, body)  # Stripe retries
    assert first.status_code == 200 and first.json()["duplicate"] is False
    assert again.status_code == 200 and again.json()["duplicate"] is True
    cards = env.slack.find(
        lambda c: c.kind == "chat.postMessage" and name in c.body.get("text", "")
    )
    assert len(cards) == 1
    (card,) = cards
    assert card.body["channel"] == OPS
    for part in (name, f"dba@prov-{seed}.example.com", "*small*", PRICE, customer):
        assert part in card.text, part
    assert "Capacity for small" in card.text and "MB promised" in card.text
    proposal = env.rt.events.query(kind="billing.onboarding_proposed", subject=name)
    server = proposal[0].payload["proposed_server"]
    assert server in {s["name"] for s in sandbox["servers"]}
    (button,) = buttons(card)
    assert button["action_id"] == "db_provision"
    assert button["value"] == f"provision {name} --plan small --server {server}"
    assert button["style"] == "danger" and button["confirm"]["style"] == "danger"  # Slack asks

    # Bob may look but not provision; Carol's press does it, with the address Stripe gave.
    assert "needs the admin role" in press(env, BOB, button).text
    done = press(env, CAROL, button)
    assert f"Provisioned *{name}* on *{server}*" in done.text, done.text
    (mail,) = env.inbox.messages
    assert mail["To"] == f"dba@prov-{seed}.example.com"
    assert connects(sandbox, server, name, emailed_password(mail))
    account = billing_account(env.rt.engine, name)
    assert account is not None and account.stripe_customer == customer  # credits can reach them


# --- the SLA credit ------------------------------------------------------------------------------


def test_apply_on_a_long_outage_credits_stripe_once(env: Env) -> None:
    link_stripe_customer(env.rt.engine, "acme", "cus_Acme0001")
    opened = env.router.run(
        Invocation(ALICE, "slack", text="incident open acme P0 acme database down", channel=OPS)
    )
    assert opened is not None and "Opened" in opened.text
    inc = env.rt.events.query(kind="incident.opened", newest_first=True, limit=1)[0]
    number = int(str(inc.subject).removeprefix("inc-"))

    # Two hours later (over the SLA's hour), Alice resolves it in Slack.
    with time_machine.travel(datetime.now(UTC) + timedelta(hours=2), tick=True):
        resolved = slash(env, ALICE, f"incident resolve {number} disk filled by WAL")
    (proposed,) = env.rt.events.query(kind="sla.credit_proposed", subject=f"inc-{number}")
    cents = proposed.payload["credit_cents"]
    assert proposed.payload["customer"] == "acme" and cents > 0
    thread = env.slack.wait_for(
        lambda c: c.kind == "chat.postMessage" and "Proposed SLA credits" in c.text
    )
    for message in (resolved, thread):
        (apply,) = buttons(message)
        assert apply["action_id"] == "db_credit_apply"
        assert apply["value"] == f"credit apply inc-{number} acme"  # no amount on the button
        assert apply["style"] == "danger" and apply["confirm"]["style"] == "danger"
        assert f"${cents / 100:.2f}" in apply["text"]["text"]

    assert "needs the admin role" in press(env, ALICE, apply).text
    assert env.stripe.posts() == []
    first, second = press(env, CAROL, apply), press(env, CAROL, apply)

    (create,) = env.stripe.posts("/v1/customers/")
    assert create.path == "/v1/customers/cus_Acme0001/balance_transactions"
    assert create.idempotency_key == f"sla-credit:{number}:acme"
    assert create.params["amount"] == str(-cents) and int(create.params["amount"]) < 0
    assert "Applied the SLA credit for acme" in first.text, first.text
    assert "already applied" in second.text and "Nothing was sent again" in second.text
    applied = env.rt.events.query(kind="billing.credit_applied", subject="acme")
    assert len(applied) == 1 and applied[0].actor == CAROL
