"""Tables for provisioning, billing and operation locks (revision 0005_billing).

* ``provision_jobs``: one row per customer being (or once) provisioned, so that running
  provisioning again after a failure finishes the job: which steps are done, whether the names
  on the server are ours, and whether the welcome email (the only place the password goes) has
  been sent.
* ``billing_accounts``: our customer <-> Stripe customer, written at provisioning.
* ``sla_credits``: each SLA credit applied through Stripe, once per (incident, customer).
* ``op_locks``: named leases so that two admins (or two processes) cannot run the same
  destructive operation on one customer at once; a holder that dies loses it when the lease ends.

Timestamps are stored in UTC; SQLite hands them back naive, so readers go through ``aware()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Engine, UniqueConstraint, delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from storage.models import utcnow


def aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


class ProvisionJob(SQLModel, table=True):
    """Where provisioning of one customer got to (SOP-103)."""

    __tablename__ = "provision_jobs"

    customer: str = Field(primary_key=True, max_length=63)
    server: str = Field(max_length=63)
    plan: str = Field(max_length=63)
    email: str = Field(max_length=254)
    status: str = Field(default="running", max_length=16)  # running, failed, done
    steps: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # True once this job saw that no role or database of the customer's name existed: from
    # then on a role or database of that name on that server is ours to finish, not someone's.
    names_claimed: bool = False
    welcome: str = Field(default="pending", max_length=16)  # pending, sending, sent, failed
    welcome_sent_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    stripe_customer: str | None = Field(default=None, max_length=64)
    owner: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=300)
    actor: str = Field(max_length=64)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class BillingAccount(SQLModel, table=True):
    """Which Stripe customer pays for which of our customers."""

    __tablename__ = "billing_accounts"

    customer: str = Field(primary_key=True, max_length=63)
    stripe_customer: str = Field(max_length=64, unique=True)
    stripe_subscription: str | None = Field(default=None, max_length=64)
    email: str | None = Field(default=None, max_length=254)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class SlaCredit(SQLModel, table=True):
    """An SLA credit that Stripe accepted (a customer balance transaction)."""

    __tablename__ = "sla_credits"
    __table_args__ = (UniqueConstraint("incident_id", "customer", name="uq_sla_credits_once"),)

    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(index=True)
    customer: str = Field(max_length=63)
    amount_cents: int
    currency: str = Field(default="usd", max_length=3)
    idempotency_key: str = Field(max_length=200, unique=True)
    stripe_customer: str = Field(max_length=64)
    stripe_txn: str = Field(max_length=64)
    actor: str = Field(max_length=64)
    applied_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


class OpLock(SQLModel, table=True):
    """A named lease (``restore:acme``), held until released or until the lease runs out."""

    __tablename__ = "op_locks"

    name: str = Field(primary_key=True, max_length=128)
    owner: str = Field(max_length=128)
    holder: str | None = Field(default=None, max_length=64)  # who asked (a Slack user id)
    acquired_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    lease_until: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class LockBusy(Exception):
    """The lock is held by someone else; ``holder`` and ``since`` say who and since when."""

    def __init__(self, name: str, holder: str | None, since: datetime | None) -> None:
        super().__init__(f"{name} is held by {holder or 'another process'}")
        self.name = name
        self.holder = holder
        self.since = since


def acquire_lock(
    engine: Engine,
    name: str,
    owner: str,
    *,
    lease: timedelta,
    holder: str | None = None,
    now: datetime | None = None,
) -> None:
    """Take ``name`` for ``owner`` or raise LockBusy. A lease that has run out is taken over."""
    now = now or datetime.now(UTC)
    until = now + lease
    try:
        with Session(engine) as session:
            session.add(
                OpLock(name=name, owner=owner, holder=holder, acquired_at=now, lease_until=until)
            )
            session.commit()
            return
    except IntegrityError:
        pass
    with engine.begin() as conn:
        taken = conn.execute(
            update(OpLock)
            .where(col(OpLock.name) == name, col(OpLock.lease_until) < now)
            .values(owner=owner, holder=holder, acquired_at=now, lease_until=until)
        )
        if taken.rowcount == 1:
            return
    with Session(engine) as session:
        row = session.get(OpLock, name)
        raise LockBusy(name, row.holder if row else None, aware(row.acquired_at) if row else None)


def release_lock(engine: Engine, name: str, owner: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(OpLock).where(col(OpLock.name) == name, col(OpLock.owner) == owner))


@contextlib.contextmanager
def op_lock(
    engine: Engine, name: str, owner: str, *, lease: timedelta, holder: str | None = None
) -> Iterator[None]:
    acquire_lock(engine, name, owner, lease=lease, holder=holder)
    try:
        yield
    finally:
        release_lock(engine, name, owner)


def row_json(row: SQLModel) -> dict[str, Any]:
    """A row as plain JSON-able data, timestamps as aware UTC."""
    out: dict[str, Any] = {}
    for key, value in row.model_dump().items():
        out[key] = aware(value) if isinstance(value, datetime) else value
    return out


def link_stripe_customer(
    engine: Engine,
    customer: str,
    stripe_customer: str,
    *,
    subscription: str | None = None,
    email: str | None = None,
) -> BillingAccount:
    """Record which Stripe customer pays for ``customer`` (idempotent; a new subscription or
    email replaces the old one). A Stripe customer already linked to someone else is refused
    with ValueError: one payer per account keeps credits from landing on the wrong bill."""
    with Session(engine) as session:
        other = session.exec(
            select(BillingAccount).where(BillingAccount.stripe_customer == stripe_customer)
        ).first()
        if other is not None and other.customer != customer:
            raise ValueError(f"{stripe_customer} already pays for {other.customer}")
        row = session.get(BillingAccount, customer) or BillingAccount(
            customer=customer, stripe_customer=stripe_customer
        )
        row.stripe_customer = stripe_customer
        if subscription is not None:
            row.stripe_subscription = subscription
        if email is not None:
            row.email = email
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def billing_account(engine: Engine, customer: str) -> BillingAccount | None:
    with Session(engine) as session:
        return session.get(BillingAccount, customer)
