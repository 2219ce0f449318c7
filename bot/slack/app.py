"""The Slack app: ``create_app`` builds a Bolt AsyncApp whose listeners (bot.slack.listeners) ack at
once and hand the work to ``Background`` (bot.slack.background), which runs the router in threads
and replies through response_url. Bolt's log lines never carry a request body (``NoBodies``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot.runtime import Runtime
from bot.slack import listeners
from bot.slack.background import Services, build_services
from core.errors import DbopsError


class _ClientGiven(logging.Filter):
    """Bolt reads SLACK_BOT_TOKEN itself and warns that our client (which carries the same token,
    SLACK_API_URL and the retry handlers) wins; that is the intent, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


MAX_LOG_BYTES = 800  # a log message; with its time, level and logger name a line stays under 1 KB
# Where a body starts in Bolt's lines: "... signature detected (signature: .., timestamp: ..,
# body: <the raw body>)", "Unhandled request ({..})", "... for the request ({..})" and the DEBUG
# 'Responding with status: 200 body: "..."'.
_BODY_STARTS = re.compile(r"\bbody: |\bUnhandled request \(|\bfor the request \(")


class NoBodies(logging.Filter):
    """No request body in a log line, and no message over MAX_LOG_BYTES (UTF-8).

    Bolt logs the whole raw body of a request whose signature fails, at INFO: anyone on the
    internet chooses what goes in (it was a 100 MB line), and a signed-looking body may hold a
    customer's data. The line keeps its words up to the body and says how long the body was.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "bodies_withheld", False):  # a logger's filter and a handler's
            return True
        record.bodies_withheld = True
        try:
            text = kept = record.getMessage()
        except Exception:  # bad arguments: the handler reports them (Handler.handleError)
            return True
        cut = _BODY_STARTS.search(text)
        if cut is not None:
            kept = f"{text[: cut.end()]}... ({len(text) - cut.end()} characters withheld)"
        if len(kept) > MAX_LOG_BYTES // 4:  # else under MAX_LOG_BYTES whatever its characters
            raw = kept.encode("utf-8", "replace")
            if len(raw) > MAX_LOG_BYTES:
                head = raw[:MAX_LOG_BYTES].decode("utf-8", "ignore")
                kept = f"{head}... ({len(raw) - MAX_LOG_BYTES} more bytes)"
        if kept is not text:
            record.msg, record.args = kept, None
        return True


def withhold_bodies(*handlers: logging.Handler) -> None:
    """NoBodies on these handlers (the root's when none are given): a handler's filter sees
    every record that reaches it, from Bolt's loggers and everyone else's."""
    for handler in handlers or tuple(logging.getLogger().handlers):
        if not any(isinstance(f, NoBodies) for f in handler.filters):
            handler.addFilter(NoBodies())


_bolt_log = logging.getLogger("dbops.bolt")
_bolt_log.addFilter(_ClientGiven())
# Bolt's own loggers (slack_bolt.AsyncRequestVerification, ...) copy this logger's filters when
# they are made, so this holds even where no handler has NoBodies (tests, embedding).
_bolt_log.addFilter(NoBodies())


def create_app(
    rt: Runtime | Services,
    *,
    client: AsyncWebClient | None = None,
    extra_admins: Iterable[str] = (),
) -> AsyncApp:
    """The Bolt app with every listener registered; ``rt`` may be prebuilt Services."""
    services = rt
    if not isinstance(services, Services):
        services = build_services(services, client=client, extra_admins=extra_admins)
    settings = services.settings
    if settings.slack_bot_token is None:
        raise DbopsError(
            "SLACK_BOT_TOKEN is not set.", hint="Copy it from your Slack app's OAuth page."
        )
    secret = settings.slack_signing_secret
    app = AsyncApp(
        name="dbops",
        logger=_bolt_log,
        # The token travels in the client (built with it, or handed in by a test).
        signing_secret=secret.get_secret_value() if secret else None,
        # Without a signing secret only Socket Mode can deliver (its socket is authenticated).
        request_verification_enabled=secret is not None,
        client=services.replier.client,
        # Listeners only ack and hand off, so running them before the response costs nothing
        # and avoids Bolt's 10 ms polling for the ack.
        process_before_response=True,
    )
    listeners.register(app, services)
    return app
