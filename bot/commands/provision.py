"""`/db provision <customer> --plan <plan> [--server <s>] [--email <address>]` and
`/db credit apply <id> <customer>` (both admin), and the Stripe onboarding card.

Provisioning is core.provisioning (SOP-102/103): the server chosen by capacity unless named; the
role, database, pgBouncer entry, backups and monitoring, a connection test and the welcome
email, which is the only place the password goes. Running it again after a failure finishes the
job. The welcome email goes to ``--email``, else to the address the job started with, else to
the one the Stripe payment gave (its onboarding proposal, which also links the Stripe customer
so SLA credits can reach them). Provisioning is destructive: typed, it runs nothing and answers
with what it will do (the server chosen, the address) and a red Provision button behind a
confirm dialog that carries that server and address; a name that is reserved or taken on the
server is refused at once, before anything is made.

The onboarding card (``onboarding_reply``) is what a paid Stripe checkout or first invoice posts
in OPS_CHANNEL (bot/web/asgi.py). Its Provision button (behind a confirm dialog) carries
`provision <customer> --plan <plan> --server <server>`, so a press is parsed and role-checked
like typing it; a reserved name gets no button.

SLA credits: the resolution message's Apply button runs `credit apply <id> <customer>`. The
amount is not on the button: it is the one core proposed when the incident was resolved (event
``sla.credit_proposed``), so a button cannot carry an arbitrary amount. Core applies a credit
once (Stripe idempotency key ``sla-credit:{incident}:{customer}``); a second press says so.

``SPECS`` go on the router through bot/commands/catalog.py (with ``KINDS``: a plan, an email
address, a new customer's name).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from zoneinfo import ZoneInfo

from slack_sdk.models.blocks import Block, ButtonElement

from bot.commands.roles import Role
from bot.commands.router import Arg, Call, Kind, Look, Registry, Spec, UsageError, shown
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core import email as mail
from core.billing import CreditResult, OnboardingProposal, stripe_proposal
from core.errors import DbopsError
from core.fleet import Fleet
from core.incidents import parse_incident_id
from core.incidents.sla import proposed_credit
from core.names import validate_new_name
from core.provisioning import Provisioner, ProvisionResult, ServerCapacity
from core.settings import Settings
from core.units import pretty_bytes
from storage.spool import RECORD_LATER

SHOWN_SERVERS = 5
_PLAN = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_EMAIL = re.compile(r"^[^@\s<>|]{1,64}@[^@\s<>|]{1,190}\.[^@\s<>|.]{2,63}$")
_MAILTO = re.compile(r"^<mailto:([^|>]+)(?:\|[^>]*)?>$")


# --- argument kinds --------------------------------------------------------------------------


def _plan(value: str) -> str:
    """A plan's name as the fleet file spells them; whether it exists is checked on use."""
    value = value.lower()
    if not _PLAN.fullmatch(value):
        raise DbopsError(
            f"{shown(value)!r} is not a plan name.",
            hint="Plans are named in the fleet file, e.g. `--plan small`.",
        )
    return value


def _email(value: str) -> str:
    """An email address. Slack sends a typed one as ``<mailto:a@b.example|a@b.example>``."""
    match = _MAILTO.fullmatch(value)
    address = match.group(1) if match else value
    if len(address) > 254 or not address.isprintable() or not _EMAIL.fullmatch(address):
        raise DbopsError(
            f"{shown(value)!r} is not an email address.",
            hint="e.g. `--email ops@newco.example.com`.",
        )
    return address


def _new_customer(value: str) -> str:
    """A new customer's name: a safe identifier that is not reserved on any server (what a
    server already has is checked by the preflight and again by core, before anything)."""
    return validate_new_name(value.lower(), "customer")


KINDS: Mapping[str, Kind] = {"plan": _plan, "email": _email, "new_customer": _new_customer}


# --- start-up ---------------------------------------------------------------------------------


def require_email_branding(settings: Settings, fleet: Callable[[], Fleet]) -> None:
    """The start-up check of `dbops serve` and `dbops shell`: with SMTP_URL set, customer
    emails go out, and fleet.toml must say whose they are ([business] name, support_email)."""
    if settings.smtp_url and settings.dbops_fleet is not None:
        mail.require_branding(settings.smtp_url, fleet().business, str(settings.dbops_fleet))


# --- provisioning ------------------------------------------------------------------------------


def plans_text(fleet: Fleet) -> str:
    return ", ".join(
        f"{name} ({p.ram_mb:,} MB RAM, {p.storage_gb} GB, ${p.price_usd_month}/month)"
        for name, p in fleet.plans.items()
    )


def _arguments(call: Call) -> tuple[Provisioner, dict[str, Any], str]:
    """The provisioner, the Stripe payment's proposal (or {}), and the welcome email's
    address: ``--email``, else the address the job started with, else Stripe's."""
    name, plan = call.arg("customer"), call.arg("plan")
    ops = call.ops
    if plan not in ops.fleet.plans:
        raise UsageError(
            f"There is no plan {plan!r}. The plans are: {plans_text(ops.fleet)}.",
            usage=call.command.spec.usage,
        )
    provisioner = call.rt.onboarding.provisioner
    paid = stripe_proposal(ops.events, name) or {}
    job = provisioner.job(name)
    email = call.command.args.get("email") or (job.email if job else None) or paid.get("email")
    if not email:
        raise DbopsError(
            f"I have no email address for {name}'s welcome email (it carries the password).",
            hint=f"Add one: `/db provision {name} --plan {plan} --email <address>`.",
        )
    return provisioner, paid, str(email)


def _provision_look(call: Call) -> Look:
    """Typed `/db provision`: what it will do and where, refused at once when core would refuse
    before making anything (a name taken on the server, no room). The button carries the
    server and address shown, so the press provisions what was confirmed."""
    provisioner, _, email = _arguments(call)
    name, plan = call.arg("customer"), call.arg("plan")
    p = provisioner.preview(name, plan, call.command.args.get("server"), email=email)
    if p.resumed:
        stopped = f" after {p.steps_done[-1]}" if p.steps_done else ""
        error = f": {p.last_error[:150]}" if p.last_error else ""
        what = (
            f"finishes provisioning {name} on {p.server} (an earlier run stopped{stopped}"
            f"{error}), keeping what it made; the password goes only in the welcome email to "
            f"{email}"
        )
    else:
        what = (
            f"creates {name}'s role and database (plan {plan}) on {p.server}, registers it in "
            "pgBouncer and turns on backups and monitoring; the password goes only in the "
            f"welcome email to {email}" + (f". Chosen by capacity: {p.why}" if p.why else "")
        )
    return Look(what, line=f"provision {name} --plan {plan} --server {p.server} --email {email}")


def _provision(call: Call) -> Reply:
    name, plan = call.arg("customer"), call.arg("plan")
    args = call.command.args
    provisioner, paid, email = _arguments(call)
    result = provisioner.provision(
        name,
        plan,
        args.get("server"),
        email=email,
        actor=call.actor,
        stripe_customer=paid.get("stripe_customer"),
        stripe_subscription=paid.get("stripe_subscription"),
    )
    return provisioned_reply(result, call.router.registry)


def provisioned_reply(result: ProvisionResult, registry: Registry) -> Reply:
    """What provisioning did; the password is not in ``result`` and so not here either."""
    name, server = escape(result.customer), escape(result.server)
    buttons = [registry.button(f"log {result.customer}")]
    if result.already_done:
        return Reply(
            text=result.summary(),
            blocks=[
                blocks.section(
                    f":information_source: *{name}* was already provisioned on *{server}*; "
                    "nothing to do."
                ),
                blocks.actions(buttons),
            ],
            ephemeral=False,
        )
    how = "Finished provisioning" if result.resumed else "Provisioned"
    out: list[Block] = [
        blocks.section(
            f":white_check_mark: {how} *{name}* on *{server}* (plan {escape(result.plan)})."
        ),
        blocks.fields(
            [
                ("Database", f"`{escape(result.database)}`"),
                ("Role", f"`{escape(result.role)}`"),
                ("Connect to", f"`{escape(result.host)}:{result.port}`"),
                ("Welcome email", f"sent to {escape(result.email)}"),
            ]
        ),
    ]
    if not result.recorded:
        out.append(blocks.section(f":warning: Provisioned; the event log is down: {RECORD_LATER}."))
    if result.warnings:
        out.append(blocks.section("\n".join(f":warning: {escape(w)}" for w in result.warnings)))
    out.append(
        blocks.context(
            "Steps: " + " → ".join(escape(s) for s in result.steps) + ". The password went only "
            "into the welcome email. Backups and monitoring are on."
        )
    )
    out.append(blocks.actions(buttons))
    return Reply(text=result.summary(), blocks=out, ephemeral=False)


# --- the Stripe onboarding card ------------------------------------------------------------------


def _capacity_line(c: ServerCapacity, chosen: str | None) -> str:
    label = f"`{escape(c.server)}`" + (" *(proposed)*" if c.server == chosen else "")
    if not c.reachable:
        return f":grey_question: {label}: not measured ({escape('; '.join(c.reasons) or '?')})"
    icon = ":white_check_mark:" if c.fits else ":no_entry_sign:"
    ram = (
        f"RAM {c.committed_ram_mb:,} MB promised of {c.mem_total_mb:,} MB"
        if c.mem_total_mb
        else "RAM ?"
    )
    if c.disk_total_bytes is not None and c.disk_used_bytes is not None:
        disk = (
            f"disk {pretty_bytes(c.disk_used_bytes)} used of {pretty_bytes(c.disk_total_bytes)}, "
            f"{c.committed_storage_gb} GB promised"
        )
    else:
        disk = "disk ?"
    after = f"{round(c.load_after * 100)} % of its line after" if c.load_after is not None else ""
    parts = [f"{c.customers} customers", ram, disk, f"{c.committed_connections} connections"]
    line = f"{icon} {label}: " + " · ".join([*parts, *([after] if after else [])])
    if c.reasons:
        line += f" ({escape('; '.join(c.reasons))})"
    return line


def onboarding_reply(proposal: OnboardingProposal, registry: Registry) -> Reply:
    """The card a paid Stripe checkout (or first invoice) posts: who, what plan, where, and a
    Provision button (admins) when everything it needs is known."""
    p = proposal
    chosen = p.server.server if p.server else None
    paid = (
        f"{p.amount_cents / 100:,.2f} {escape((p.currency or '').upper())}".strip()
        if p.amount_cents is not None
        else "?"
    )
    subscription = f", `{escape(p.stripe_subscription)}`" if p.stripe_subscription else ""
    pairs = [
        (
            "Customer",
            f"`{escape(p.customer)}` (from the {escape(p.name_source)})"
            if p.customer
            else ":warning: no name",
        ),
        ("Email", escape(p.email) if p.email else ":warning: none"),
        (
            "Plan",
            f"*{escape(p.plan)}* (price `{escape(p.price or '-')}`)"
            if p.plan
            else ":warning: unknown",
        ),
        ("Paid", paid),
        ("Proposed server", f"*{escape(chosen)}*" if chosen else ":warning: none has room"),
        ("Stripe", f"`{escape(p.stripe_customer or '-')}`{subscription}"),
    ]
    out: list[Block] = [
        blocks.header(":tada: New paying customer from Stripe"),
        blocks.fields(pairs),
    ]
    if p.server is not None:
        lines = [_capacity_line(c, chosen) for c in p.server.candidates[:SHOWN_SERVERS]]
        more = len(p.server.candidates) - SHOWN_SERVERS
        if more > 0:
            lines.append(f"…and {more} more")
        out += blocks.text_sections(
            f"*Capacity for {escape(p.server.plan)}:* {escape(p.server.reason)}\n"
            + "\n".join(lines)
        )
    warnings = list(p.warnings)
    button: ButtonElement | None = None
    if p.ready:
        try:
            button = registry.button(f"provision {p.customer} --plan {p.plan} --server {chosen}")
        except DbopsError as exc:  # a name the router refuses: say so rather than offer it
            warnings.append(f"no Provision button: {exc.message}")
    if warnings:
        out += blocks.text_sections(
            "*Check first*\n" + "\n".join(f":warning: {escape(w)}" for w in warnings)
        )
    how = (
        "Provision creates the role, database, backups and monitoring and emails the password "
        "to the customer (and nowhere else)."
        if button is not None
        else "Not enough to provision from here: type `/db provision <customer> --plan <plan> "
        "--email <address>` once you know."
    )
    out.append(blocks.context(f"SOP-102/103 · {how} · Stripe event `{escape(p.stripe_event)}`"))
    if button is not None:
        out.append(blocks.actions([button], block_id=f"onboarding-{p.stripe_object}"[:255]))
    text = (
        f"New paying customer from Stripe: {p.customer or 'no name'}, plan {p.plan or '?'}, "
        f"proposed server {chosen or 'none with room'}"
    )
    return Reply(text=text, blocks=out, ephemeral=False)


# --- SLA credits ---------------------------------------------------------------------------------


def _credit_apply(call: Call) -> Reply:
    incident_id = parse_incident_id(call.arg("incident"))
    customer = call.arg("customer")
    billing = call.rt.onboarding.billing
    done = billing.credit(incident_id, customer)
    if done is None:
        amount = proposed_credit(call.ops.events, incident_id, customer)
        done = billing.apply_credit(incident_id, customer, amount, call.actor)
    return credit_reply(done, call.tz)


def credit_reply(result: CreditResult, tz: ZoneInfo) -> Reply:
    ref, name = f"inc-{result.incident_id}", result.customer
    amount = f"${result.amount_cents / 100:,.2f}"
    if result.already_applied:
        when = result.applied_at.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
        text = (
            f"The SLA credit for {name} ({ref}) was already applied: {amount} on {when} "
            f"(Stripe {result.stripe_txn}). Nothing was sent again."
        )
        icon = ":information_source:"
    else:
        text = (
            f"Applied the SLA credit for {name} ({ref}): {amount} off their next invoice "
            f"(Stripe {result.stripe_txn})."
        )
        icon = ":white_check_mark:"
    return Reply(text=text, blocks=[blocks.section(f"{icon} {escape(text)}")])


# --- the commands --------------------------------------------------------------------------------

SPECS: list[Spec] = [
    Spec(
        "provision",
        "a new customer (SOP-103): server by capacity unless named, role, database, backups, "
        "monitoring, welcome email",
        _provision,
        (
            Arg("customer", "new_customer", metavar="customer"),
            Arg("plan", "plan", flag=True),
            Arg("server", "server", optional=True, flag=True),
            Arg("email", "email", optional=True, flag=True, metavar="address"),
        ),
        role=Role.ADMIN,
        button="Provision",
        destructive=True,
        public=True,
        preflight=_provision_look,
    ),
    Spec(
        "credit apply",
        "apply the SLA credit proposed when an incident was resolved (Stripe, once)",
        _credit_apply,
        (Arg("incident", "subject", metavar="id"), Arg("customer", "customer")),
        role=Role.ADMIN,
        button="Apply",
        destructive=True,
    ),
]
