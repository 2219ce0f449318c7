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
