"""The one error type for failures a user can act on.

Anything raised as ``DbopsError`` is shown to the user as it is: it must say what went wrong
and what to do, and must never carry a password, a DSN or a stack trace. Any other exception
is a bug: the bot logs it with a correlation id and shows only the id.
"""

from __future__ import annotations


class DbopsError(Exception):
    """An expected failure with a message fit for the person who caused it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class NotFound(DbopsError):
    """A named thing (customer, server, incident, backup) does not exist."""


class Unreachable(DbopsError):
    """A server or database did not answer in time."""
