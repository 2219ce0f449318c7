"""``POST /alerts/alertmanager``: Alertmanager's webhook (JSON version 4), Bearer ``ALERTS_TOKEN``.

Mount with ``build_asgi(rt, extra_routes=alertmanager_routes(factory))``. The factory is called
once, at the first request, and returns an ``AlertDesk`` over the runtime's incident desk
(``bot.web.asgi.webhook_routes``).

* No token configured: 503 (the endpoint is off). Missing or wrong token: 401, compared in
  constant time.
* A body that is not Alertmanager's JSON: 400 with the reason; the raw body (its first 64 KB;
  the event log scrubs secrets) is kept as the event ``alert.malformed``. Over 1 MB: 413.
* Good: 200 at once, and the alerts are processed in a worker thread after the response
  (Alertmanager's webhook timeout is short and it retries, which dedupe makes harmless).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.alerts import MAX_BODY_BYTES, Alert, MalformedAlert, parse_alertmanager
from core.incidents import Incidents
from core.settings import Settings
from storage.events import EventLog

log = logging.getLogger("dbops.webhooks")

PATH = "/alerts/alertmanager"
KEPT_BODY_BYTES = 64 * 1024
# "password": "..." inside a body too broken to parse: the event log scrubs URLs, bearer tokens
# and key=value passwords in text, not JSON members, so those are masked here first.
_JSON_SECRET = re.compile(
    r'("[^"]{0,64}(?:pass|token|secret|dsn|api[_-]?key|authori[sz]ation|credential|cookie)'
    r'[^"]{0,64}"\s*:\s*)"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)


@dataclass
class AlertDesk:
    """What the endpoint needs: the token, the event log and the incident desk (with its pager,
    so an incident opened by an alert pages the primary straight away)."""

    settings: Settings
    events: EventLog
    incidents: Incidents
    # Called with the id of each incident an alert opened (the bot posts its card).
    on_opened: Callable[[int], object] | None = None


def _authorised(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` (read no further)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _process(desk: AlertDesk, alerts: Sequence[Alert], delivery: str) -> None:
    try:
        outcomes = desk.incidents.ingest(alerts)
        log.info(
            "alertmanager delivery %s: %s",
            delivery,
            ", ".join(f"{o.alert.dedupe_key}={o.action}" for o in outcomes),
        )
        if desk.on_opened is not None:
            for o in outcomes:
                if o.action == "opened" and o.incident is not None:
                    desk.on_opened(o.incident.id)
    except Exception:
        # The 200 has gone; Alertmanager re-sends firing alerts every repeat_interval, and
        # the dedupe key makes the next delivery pick up where this one failed.
        log.exception("alertmanager delivery %s failed", delivery)


T = TypeVar("T")


def built_once(factory: Callable[[], T]) -> Callable[[], T]:
    """``factory``'s result, made at the first call (from whichever thread) and then kept: a
    route's services are built at its first request, so `dbops serve` starts without them."""
    lock = threading.Lock()
    made: list[T] = []

    def get() -> T:
        with lock:
            if not made:
                made.append(factory())
            return made[0]

    return get


def alertmanager_routes(ctx_factory: Callable[[], AlertDesk], *, path: str = PATH) -> list[Route]:
    desk = built_once(ctx_factory)

    async def receive(request: Request) -> Response:
        ctx = await run_in_threadpool(desk)
        secret = ctx.settings.alerts_token
        token = secret.get_secret_value() if secret is not None else ""
        if not token:
            return JSONResponse(
                {"error": "ALERTS_TOKEN is not set: the alerts endpoint is off"}, 503
            )
        if not _authorised(request, token):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                401,
                headers={"WWW-Authenticate": 'Bearer realm="dbops"'},
            )
        raw = await read_body(request, MAX_BODY_BYTES)
        delivery = uuid.uuid4().hex[:12]
        if raw is None:
            await run_in_threadpool(
                ctx.events.append,
                "alert.malformed",
                "alertmanager",
                {"reason": "body too large", "limit": MAX_BODY_BYTES, "delivery": delivery},
                actor="alertmanager",
            )
            return JSONResponse({"error": f"body over {MAX_BODY_BYTES} bytes"}, 413)
        try:
            alerts = parse_alertmanager(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, MalformedAlert) as exc:
            reason = _reason(exc)
            kept = _JSON_SECRET.sub(
                r'\1"[redacted]"', raw[:KEPT_BODY_BYTES].decode("utf-8", "replace")
            )
            await run_in_threadpool(
                ctx.events.append,
                "alert.malformed",
                "alertmanager",
                {
                    "reason": reason,
                    "body": kept,
                    "bytes": len(raw),
                    "truncated": len(raw) > KEPT_BODY_BYTES,
                    "delivery": delivery,
                },
                actor="alertmanager",
            )
            return JSONResponse({"error": reason, "delivery": delivery}, 400)
        return JSONResponse(
            {"status": "accepted", "alerts": len(alerts), "delivery": delivery},
            200,
            background=BackgroundTask(_process, ctx, alerts, delivery),
        )

    return [Route(path, receive, methods=["POST"], name="alertmanager")]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return "the body is not UTF-8"
    if isinstance(exc, RecursionError):
        return "the JSON is nested too deeply"
    return f"not Alertmanager's webhook JSON: {exc}"
