"""Who may do what: viewer (anyone), operator, admin.

Roles come from DBOPS_OPERATORS and DBOPS_ADMINS. ``Roles.require`` is the one gate: the router
calls it for every command, typed or pressed, before any handler runs. A button press is checked
again here, since a confirm dialog is not an authorization.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from core.errors import DbopsError
from core.settings import Settings
from storage.events import EventLog


class Role(IntEnum):
    VIEWER = 0
    OPERATOR = 1
    ADMIN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Denied(DbopsError):
    """The user's role is below what the command needs."""

    def __init__(self, user: str, has: Role, needs: Role, what: str) -> None:
        super().__init__(
            f"`{what}` needs the {needs.label} role; you are a {has.label}.",
            hint="Ask an admin to add your Slack user id to "
            + ("DBOPS_ADMINS." if needs is Role.ADMIN else "DBOPS_OPERATORS."),
        )
        self.user, self.has, self.needs, self.what = user, has, needs, what


@dataclass(frozen=True)
class Roles:
    operators: frozenset[str] = field(default_factory=frozenset)
    admins: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_settings(cls, settings: Settings, *, extra_admins: Iterable[str] = ()) -> Roles:
        return cls(
            frozenset(settings.dbops_operators),
            frozenset(settings.dbops_admins) | frozenset(extra_admins),
        )

    def of(self, user: str) -> Role:
        if user in self.admins:
            return Role.ADMIN
        if user in self.operators:
            return Role.OPERATOR
        return Role.VIEWER

    def require(
        self,
        user: str,
        needs: Role,
        what: str,
        *,
        events: EventLog | None,
        surface: str,
        subject: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Role:
        """The user's role when it is at least ``needs``; else an ``auth.denied`` event and
        a Denied error (shown to the user alone)."""
        has = self.of(user)
        if has >= needs:
            return has
        if events is not None:
            payload = {"command": what, "has": has.label, "needs": needs.label, "surface": surface}
            events.append("auth.denied", subject, {**payload, **(detail or {})}, actor=user)
        raise Denied(user, has, needs, what)
