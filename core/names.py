"""Validation of the names that reach SQL and shells: customers, servers, roles, databases.

A name is checked here before it is used anywhere; what fails never reaches a query or a command.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from core.errors import DbopsError, NotFound

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
# Server names may carry a hyphen or digit-led suffix as VPS hostnames do ("vps-2"); they never
# reach SQL as identifiers, only our own lookups and event subjects.
SERVER_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def _shown(value: str) -> str:
    """A short, printable rendering of a rejected value for an error message."""
    text = value.encode("ascii", "backslashreplace").decode("ascii")
    return repr(text if len(text) <= 40 else text[:37] + "...")


def validate_name(value: str, what: str = "customer") -> str:
    """``value`` if it is a safe identifier; else a DbopsError saying what is allowed."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise DbopsError(
            f"{_shown(str(value))} is not a valid {what} name.",
            hint="Use 2-63 characters: a lowercase letter, then lowercase letters, digits or _.",
        )
    return value


# Names a new customer (its role and database) may never take, on any server: PostgreSQL's and
# pgBouncer's own, and words that mean something else where the names are written (pg_hba.conf).
# Why each is reserved is said to the person who chose it.
RESERVED: dict[str, str] = {
    "pgbouncer": "pgBouncer's own admin user and console database",
    "postgres": "PostgreSQL's superuser and maintenance database",
    "public": "PostgreSQL's name for every role",
    "none": "a role name PostgreSQL reserves",
    "current_user": "a role name PostgreSQL reserves",
    "current_role": "a role name PostgreSQL reserves",
    "session_user": "a role name PostgreSQL reserves",
    "all": "a keyword in pg_hba.conf and pgbouncer_hba.conf",
    "replication": "a keyword in pg_hba.conf and pgbouncer_hba.conf",
    "sameuser": "a keyword in pg_hba.conf",
    "samerole": "a keyword in pg_hba.conf",
    "samegroup": "a keyword in pg_hba.conf",
}
RESERVED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("pg_", "PostgreSQL reserves role names that start with pg_"),
    ("template", "PostgreSQL's template databases are named template*"),
)
CHOOSE_ANOTHER = "Provision under a name of your own: `/db provision <name> --plan <plan> ...`."


def reserved(value: str) -> str | None:
    """Why ``value`` can never be a customer's name (see RESERVED), or None."""
    if value in RESERVED:
        return RESERVED[value]
    for prefix, why in RESERVED_PREFIXES:
        if value.startswith(prefix):
            return why
    return None


def refuse_name(
    value: str, why: str, *, status: str = "reserved", hint: str = CHOOSE_ANOTHER
) -> DbopsError:
    """The error for a customer name that is someone else's: whose, and what to do instead.
    ``status``: "reserved" (everywhere), or e.g. "taken on vps1"."""
    return DbopsError(f"`{value}` is {status} ({why}); choose another customer name.", hint=hint)


def validate_new_name(value: str, what: str = "customer") -> str:
    """``value`` if it may name a new customer (its role and database): a safe identifier
    (``validate_name``) that is not reserved on any server. What a given server already has
    (its roles, databases, pgBouncer entries, the fleet's roles) is checked at provisioning."""
    validate_name(value, what)
    why = reserved(value)
    if why is not None:
        raise refuse_name(value, why)
    return value


def validate_server_name(value: str) -> str:
    if not isinstance(value, str) or not SERVER_RE.fullmatch(value):
        raise DbopsError(
            f"{_shown(str(value))} is not a valid server name.",
            hint="Use up to 63 characters: a lowercase letter, then letters, digits, - or _.",
        )
    return value


def closest(value: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(value, list(candidates), n=n, cutoff=0.5)


def not_found(what: str, value: str, candidates: Iterable[str]) -> NotFound:
    """A NotFound error for ``value`` that suggests the closest known names."""
    near = closest(value, candidates)
    hint = f"Did you mean {', '.join(repr(c) for c in near)}?" if near else None
    return NotFound(f"no {what} {value!r}.", hint=hint)
