"""The HTTP side of `dbops serve`: Starlette under uvicorn.

``POST /slack/events`` goes to Bolt's Starlette adapter (signature and timestamp checked there,
401 otherwise); ``GET /healthz`` answers JSON with the schema state. With SLACK_APP_TOKEN set,
Slack is reached over Socket Mode instead and /slack/events is not served; /healthz still is,
and later webhooks (Stripe, Alertmanager) mount beside it with ``extra_routes``.
Every route sits behind the body cap and read deadlines of ``bot.web.limits``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bot.runtime import Runtime
from bot.slack.app import create_app, withhold_bodies
from bot.slack.background import Services, build_services
from bot.slack.health import SlackHealth
from bot.web.limits import (
    KEEP_ALIVE_S,
    LIMIT_CONCURRENCY,
    MAX_HEADER_BYTES,
    BodyLimits,
    shedding_protocol,
)
from core.errors import DbopsError
from core.outbox import failures as outbox_failures
from storage.migrate import current_revision, head_revision

log = logging.getLogger("dbops.http")


def schema_state(rt: Runtime) -> dict[str, Any]:
    current, head = current_revision(rt.engine), head_revision()
    return {"current": current, "head": head, "ok": current == head}


def build_asgi(
    rt: Runtime,
    *,
    services: Services | None = None,
    socket_mode: bool | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    settings = rt.settings
    services = services or build_services(rt)
    bolt = create_app(services)
    if socket_mode is None:
        socket_mode = settings.slack_app_token is not None
    if not socket_mode and settings.slack_signing_secret is None:
        raise DbopsError(
            "SLACK_SIGNING_SECRET is not set, so Slack's requests cannot be checked.",
            hint="Set it (Basic Information -> Signing Secret), or SLACK_APP_TOKEN for "
            "Socket Mode.",
        )
    handler = AsyncSlackRequestHandler(bolt)

    async def slack_events(request: Request) -> Response:
        with services.background.quiet.busy():
            return await handler.handle(request)

    socket: tuple[Any, asyncio.Task[None]] | None = None

    async def socket_connected() -> bool:
        return socket is not None and bool(await socket[0].client.is_connected())

    health = SlackHealth(
        services.replier.client,
        [settings.ops_channel, *_escalation_channel(rt)],
        socket_connected=socket_connected if socket_mode else None,
        stored=lambda: outbox_failures(rt.engine),
    )

    async def healthz(request: Request) -> Response:
        # The HTTP status is for load balancers (503: this process cannot serve, the schema is
        # not current); "status" is for alerting: "degraded" names what a person must fix in
        # Slack. Nothing here calls Slack: those checks are cached by SlackHealth.
        try:
            schema = await asyncio.to_thread(schema_state, rt)
        except Exception as exc:
            log.warning("healthz: database unreachable: %s", type(exc).__name__)
            return JSONResponse(
                {"ok": False, "status": "down", "schema": None, "error": "database unreachable"},
                503,
            )
        mode = "socket" if socket_mode else "http"
        reasons = await health.reasons()
        if not schema["ok"]:
            reasons.insert(0, "database schema is not current: run `dbops db upgrade`")
        body = {
            "ok": schema["ok"],
            "status": "ok" if not reasons else ("degraded" if schema["ok"] else "down"),
            "reasons": reasons,
            "schema": schema,
            "slack": mode,
        }
        return JSONResponse(body, status_code=200 if schema["ok"] else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal socket
        socket = _start_socket_mode(bolt, rt) if socket_mode else None
        await health.start()
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise stall the loop (and every ack) for ~100 ms at a time.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await health.stop()
            if socket is not None:
                handler, connecting = socket
                connecting.cancel()
                await handler.close_async()
            await services.aclose()

    routes: list[BaseRoute] = [Route("/healthz", healthz, methods=["GET"]), *extra_routes]
    if not socket_mode:
        routes.append(Route("/slack/events", slack_events, methods=["POST"]))
    # Around every route, the 404s included: a body over 1 MB is refused before anything reads it.
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(BodyLimits)])


def _escalation_channel(rt: Runtime) -> list[str]:
    """fleet.toml's escalation channel, if it names one (and a fleet is configured)."""
    try:
        channel = rt.fleet.oncall.escalation_channel
    except Exception as exc:  # /healthz must come up even when the fleet file does not
        log.warning("healthz: no escalation channel to check: %s", exc)
        return []
    return [channel] if channel else []


def _start_socket_mode(bolt: AsyncApp, rt: Runtime) -> tuple[Any, asyncio.Task[None]]:
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    token = rt.settings.slack_app_token
    assert token is not None
    handler = AsyncSocketModeHandler(bolt, token.get_secret_value())
    # In the background: slack_sdk keeps retrying until Slack answers, and /healthz should
    # answer meanwhile.

    async def connect() -> None:
        await handler.connect_async()  # type: ignore[no-untyped-call]
        log.info("connected to Slack over Socket Mode")

    connecting = asyncio.create_task(connect())
    return handler, connecting


def uvicorn_server(rt: Runtime, host: str, port: int, **kwargs: Any) -> uvicorn.Server:
    config = uvicorn.Config(
        build_asgi(rt, **kwargs),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # Read deadlines and caps: bot/web/limits.py says why each figure is what it is.
        http=shedding_protocol(),
        limit_concurrency=LIMIT_CONCURRENCY,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # Slack's requests are small; a long keep-alive lets its connections be reused.
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return uvicorn.Server(config)


def webhook_routes(rt: Runtime) -> list[BaseRoute]:
    """POST /alerts/alertmanager (alerts open incidents that page through Slack) and
    POST /stripe/webhook (a paid checkout proposes onboarding in the ops channel)."""
    from bot.commands.cards import as_message
    from bot.commands.incidents import announce
    from bot.commands.provision import onboarding_reply
    from bot.web.alertmanager import AlertDesk, alertmanager_routes
    from bot.web.stripe import stripe_routes
    from core.billing import Billing, OnboardingProposal

    def billing() -> Billing:
        # The onboarding desk the Provision button's command uses too.
        return rt.onboarding.billing

    def onboarding(proposal: OnboardingProposal) -> None:
        # The card (customer, email, plan, server and its capacity, warnings) with a Provision
        # button (admins) that runs `/db provision ...` through the router.
        card = onboarding_reply(proposal, rt.registry)
        rt.notifier.post(rt.settings.ops_channel, as_message(card))

    def card(incident_id: int) -> None:
        try:
            announce(rt, incident_id)
        except Exception:
            log.exception("could not post the card of incident %s", incident_id)

    def alert_desk() -> AlertDesk:
        return AlertDesk(rt.settings, rt.events, rt.incidents, on_opened=card)

    routes: list[BaseRoute] = list(alertmanager_routes(alert_desk))
    routes += stripe_routes(billing, onboarding)
    return routes


def serve(rt: Runtime, host: str = "127.0.0.1", port: int = 3000) -> None:
    """Run until interrupted (uvicorn handles SIGINT/SIGTERM and drains the lifespan)."""
    server = uvicorn_server(rt, host, port, extra_routes=webhook_routes(rt))
    # Every line this process writes, uvicorn's included (its Config has made its handlers by
    # now): no request body, no message over MAX_LOG_BYTES.
    handlers = [logging.getLogger(name).handlers for name in ("", "uvicorn", "uvicorn.access")]
    withhold_bodies(*(h for group in handlers for h in group))
    from bot.outbox import start_outbox_worker

    stop_outbox = start_outbox_worker(rt.settings, rt.events, rt.registry)
    try:
        server.run()
    finally:
        stop_outbox()
        rt.close()
