"""The one error handler: what a user sees when a command fails.

A DbopsError is a message the user can act on, shown to them alone. Anything else is a bug: it
is logged with a short correlation id and the user sees only the id, never a stack trace,
hostname, DSN or password. Slack (``@app.error``), the background work after an ack and the
shell all come through ``reply_for``.
"""

from __future__ import annotations

import logging
import uuid

from bot.commands.roles import Denied
from bot.commands.router import UsageError
from bot.views import render
from bot.views.blocks import Reply
from core.errors import DbopsError
from storage.group_commit import EventLogUnavailable

log = logging.getLogger("dbops.bot")


def correlation_id() -> str:
    return uuid.uuid4().hex[:8]


def reply_for(exc: BaseException, *, where: str = "command") -> Reply:
    if isinstance(exc, Denied):
        return render.error_reply(exc, icon=":no_entry:")
    if isinstance(exc, UsageError):
        return render.error_reply(exc, usage=exc.usage, icon=":thinking_face:")
    if isinstance(exc, DbopsError):
        return render.error_reply(exc)
    if isinstance(exc, EventLogUnavailable):  # nothing unrecorded is run
        log.error("event log unavailable in %s: %s", where, exc)
        return render.error_reply(
            DbopsError(
                "The event log could not be written, so nothing was done.",
                hint="Try again in a minute; if it goes on, check the database (DATABASE_URL).",
            )
        )
    cid = correlation_id()
    log.error("unexpected error in %s [%s]", where, cid, exc_info=exc)
    return render.internal_error_reply(cid)
