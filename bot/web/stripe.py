"""``POST /stripe/webhook``: Stripe's events, signed with ``STRIPE_WEBHOOK_SECRET``.

Mount with ``build_asgi(rt, extra_routes=stripe_routes(factory, on_onboarding))``. The factory
is called once, at the first request, and returns a ``core.billing.Billing`` (the runtime's:
``rt.onboarding.billing``).

* No webhook secret configured: 503. A body over 1 MB: 413.
* A bad or missing ``Stripe-Signature`` (or a body that is not an event): 400 with the reason;
  nothing is recorded, since anyone can send that.
* Otherwise 200 as soon as the event is recorded (once per Stripe event id: a retry is a 200
  that does nothing). An onboarding event is then worked out after the response (its server
  proposal asks every server for its capacity) and ``on_onboarding(proposal)`` posts the card.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot.web.alertmanager import built_once, read_body
from core.billing import MAX_BODY_BYTES, BadSignature, Billing, OnboardingProposal, Received
from core.errors import DbopsError

log = logging.getLogger("dbops.stripe")

PATH = "/stripe/webhook"


def _process(
    billing: Billing, received: Received, on_onboarding: Callable[[OnboardingProposal], object]
) -> None:
    try:
        proposal = billing.process(received)
        if proposal is not None:
            on_onboarding(proposal)
    except Exception:
        # The 200 has gone; the event is in the log (stripe.event) for a person to pick up.
        log.exception("stripe event %s (%s) failed after it was accepted", received.event_id,
                      received.type)  # fmt: skip


def stripe_routes(
    ctx_factory: Callable[[], Billing],
    on_onboarding: Callable[[OnboardingProposal], object],
    *,
    path: str = PATH,
) -> list[Route]:
    billing = built_once(ctx_factory)

    async def receive(request: Request) -> Response:
        b = await run_in_threadpool(billing)
        if not b.webhook_secret:
            return JSONResponse(
                {"error": "STRIPE_WEBHOOK_SECRET is not set: the Stripe endpoint is off"}, 503
            )
        raw = await read_body(request, MAX_BODY_BYTES)
        if raw is None:
            return JSONResponse({"error": f"body over {MAX_BODY_BYTES} bytes"}, 413)
        signature = request.headers.get("stripe-signature")
        try:
            received = await run_in_threadpool(b.receive, raw, signature)
        except BadSignature as exc:
            log.warning("stripe webhook refused: %s", exc.message)
            return JSONResponse({"error": exc.message}, 400)
        except DbopsError as exc:
            return JSONResponse({"error": exc.message}, 503)
        body = {"received": True, "id": received.event_id, "duplicate": received.duplicate}
        if not received.actionable:
            return JSONResponse(body, 200)
        return JSONResponse(
            body, 200, background=BackgroundTask(_process, b, received, on_onboarding)
        )

    return [Route(path, receive, methods=["POST"], name="stripe_webhook")]
