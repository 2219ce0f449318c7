"""Customers: who they are and which server and database hold them."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from core.errors import DbopsError
from core.names import not_found, validate_name, validate_server_name
from storage.models import Customer as CustomerRow


@dataclass(frozen=True)
class Customer:
    name: str
    server: str
    database: str
    role: str
    plan: str | None = None
    email: str | None = None
    status: str = "active"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "server": self.server,
            "database": self.database,
            "role": self.role,
            "plan": self.plan,
            "email": self.email,
            "status": self.status,
        }


def _from_row(row: CustomerRow) -> Customer:
    return Customer(row.name, row.server, row.database, row.role, row.plan, row.email, row.status)


def list_customers(engine: Engine, server: str | None = None) -> list[Customer]:
    with Session(engine) as session:
        stmt = select(CustomerRow).order_by(CustomerRow.name)
        if server is not None:
            stmt = stmt.where(CustomerRow.server == server)
        return [_from_row(r) for r in session.exec(stmt)]


def get_customer(engine: Engine, name: str) -> Customer:
    """The customer called ``name``; a bad name or an unknown one is a DbopsError."""
    validate_name(name, "customer")
    with Session(engine) as session:
        row = session.get(CustomerRow, name)
        if row is not None:
            return _from_row(row)
        names = list(session.exec(select(CustomerRow.name)))
    raise not_found("customer", name, names)


def customer_from_mapping(item: Mapping[str, Any]) -> Customer:
    try:
        name = validate_name(str(item["name"]), "customer")
        return Customer(
            name=name,
            server=validate_server_name(str(item["server"])),
            database=validate_name(str(item.get("database") or name), "database"),
            role=validate_name(str(item.get("role") or name), "role"),
            plan=item.get("plan"),
            email=item.get("email"),
            status=str(item.get("status") or "active"),
        )
    except KeyError as exc:
        raise DbopsError(f"a customer entry needs {exc.args[0]!r}: {dict(item)!r}") from None


def upsert_customers(engine: Engine, customers: Iterable[Customer]) -> int:
    """Insert or update customers by name; returns how many were written."""
    count = 0
    with Session(engine) as session:
        for c in customers:
            row = session.get(CustomerRow, c.name) or CustomerRow(
                name=c.name, server=c.server, database=c.database, role=c.role
            )
            row.server, row.database, row.role = c.server, c.database, c.role
            row.plan, row.email, row.status = c.plan, c.email, c.status
            session.add(row)
            count += 1
        session.commit()
    return count


def read_customers(path: Path) -> list[Mapping[str, Any]]:
    """Customer entries from a JSON file (a list, or an object with "customers", such as a
    sandbox.json) or a TOML file with [[customers]] tables."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DbopsError(f"cannot read {path}: {exc.strerror}.") from None
    try:
        data: Any = tomllib.loads(raw) if path.suffix == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise DbopsError(
            f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from None
    items = data.get("customers") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise DbopsError(
            f"{path} holds no list of customers.",
            hint='Use [{"name": ..., "server": ...}] or [[customers]] tables.',
        )
    return items
