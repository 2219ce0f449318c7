"""The work after the ack: Slack's listeners (bot.slack.listeners) ack at once and hand the work to
``Background``, which runs the router in threads and replies through response_url. ``Services``
is what the listeners are given, built once per process around its Runtime.

    Slack -> Bolt (signature, 5-minute window) -> listener: ack() + Background.submit
          -> (once the burst of acks has passed: Quiet)
          -> thread: Router.begin (event "command" keyed by the delivery: a retry stops here;
                     parse; role gate)
          -> thread: Router.execute (core call, render; identical reads in flight share one)
          -> response_url, at most DELIVERIES at once (429s retried) -> event "message.sent"

In `dbops serve` events go through ``GroupCommitLog`` (``Runtime(group_commit=True)``): appends
from many threads share one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from bot.commands.errors import reply_for
from bot.commands.roles import Roles
from bot.commands.router import Command, Invocation, Router
from bot.notifiers import SlackNotifier, web_client
from bot.runtime import Runtime
from bot.slack.client import Replier, make_web_client
from bot.slack.forms import Forms
from bot.slack.listeners.delivery import Destination
from bot.views.blocks import Reply
from core.checkpoints import Checkpointer, publish
from core.settings import Settings
from storage.events import EventLog
from storage.group_commit import GroupCommitLog

log = logging.getLogger("dbops.bot")
WORKERS = 16  # threads for core calls (I/O-bound: SSH, libpq) and event-log writes
DELIVERIES = 8  # replies being sent at once: a read shared by 200 people fans out gently
QUIET_S = 0.02  # no new request for this long: the acks have passed, the work may start
MAX_DEFER_S = 1.0  # the longest the work after an ack waits for the acks to pass
FORM_WAIT_S = 1.2  # a form ready by then opens as it is; later, a placeholder opens first


class Quiet:
    """Acks first: the work after an ack starts once no request has arrived for QUIET_S, or
    after MAX_DEFER_S at the latest.

    A burst (an outage, everyone typing `/db status`) is acked at bare-Bolt speed and its
    replies follow right after; under longer load the work goes ahead anyway. One timer per
    request, whatever the number of waiting jobs.
    """

    def __init__(self, quiet_s: float = QUIET_S, max_defer_s: float = MAX_DEFER_S) -> None:
        self.quiet_s = quiet_s
        self.max_defer_s = max_defer_s
        self._open = asyncio.Event()
        self._open.set()
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around the handling of one request."""
        self._in_flight += 1
        self._open.clear()
        if self._timer is not None:
            self._timer.cancel()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.quiet_s, self._open.set)

    async def wait(self) -> None:
        if not self._open.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._open.wait(), self.max_defer_s)


class Background:
    """The work after the ack. Nothing here runs on the request path."""

    def __init__(
        self,
        router: Router,
        replier: Replier,
        workers: int = WORKERS,
        deliveries: int = DELIVERIES,
    ) -> None:
        self.router = router
        self.replier = replier
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbops-work")
        self._tasks: set[asyncio.Task[None]] = set()
        self._flights: dict[str, asyncio.Future[Reply]] = {}
        self.quiet = Quiet()
        self._deliveries = asyncio.Semaphore(deliveries)
        self.forms = Forms(replier.client)

    def submit(self, inv: Invocation, to: Destination) -> None:
        task = asyncio.get_running_loop().create_task(self._run(inv, to))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, inv: Invocation, to: Destination) -> None:
        await self.quiet.wait()
        loop = asyncio.get_running_loop()
        command: Command | None = None
        how = ""  # how the reply went out: "form" (a modal), "response_url", "chat"
        try:
            command = await loop.run_in_executor(self.pool, self.router.begin, inv)
            if command is None:
                log.info("dropped a repeated delivery of %s", inv.delivery)
                return
            if inv.trigger and command.spec.needs_form(command):
                reply, how = await self._form(inv.trigger, command, inv.actor, to)
            else:
                reply = await self._execute(command, inv.actor)
        except Exception as exc:
            reply = reply_for(exc)
        if not how:
            reply = replace(reply, view=None)
            try:
                async with self._deliveries:
                    how = await self.replier.deliver(
                        reply, response_url=to.response_url, channel=to.channel, user=to.user
                    )
            except Exception as exc:
                log.warning("could not deliver a reply to %s: %s", inv.actor, type(exc).__name__)
        payload: dict[str, Any] = {
            "to": inv.actor,
            "channel": inv.channel,
            "via": how or "failed",
            "ephemeral": reply.ephemeral,
            "text": reply.text[:200],
        }
        subject = command.subject if command else None
        events = self.router.events
        if isinstance(events, GroupCommitLog):  # queued for the writer; nothing to wait for
            events.submit("message.sent", subject, payload, actor="dbops")
        else:
            await asyncio.to_thread(events.append, "message.sent", subject, payload, actor="dbops")

    async def _form(
        self, trigger: str, command: Command, actor: str, to: Destination
    ) -> tuple[Reply, str]:
        """Open the command's form on Slack's trigger, which lasts 3 seconds: the form itself
        when the command answers within FORM_WAIT_S, else a placeholder at once, filled in when
        it answers. ``(reply, "form")`` when a modal shows the reply; ``(reply, "")`` when none
        could (the reply then goes out as a message, which says how to do it by typing). An
        error before the placeholder opens is a message too."""
        title = (command.spec.button or command.spec.name).rstrip("…")
        work = asyncio.ensure_future(self._execute(command, actor))
        try:
            reply = await asyncio.wait_for(asyncio.shield(work), FORM_WAIT_S)
        except TimeoutError:
            view_id = await self.forms.open(trigger, title, f"`/db {command.line}` …")
            try:
                reply = await work
            except Exception as exc:
                reply = reply_for(exc)
            shown = view_id is not None and await self.forms.show(view_id, reply, to, title)
            return reply, "form" if shown else ""
        opened = reply.view is not None and await self.forms.open_form(trigger, reply, to)
        return reply, "form" if opened else ""

    async def _execute(self, command: Command, actor: str) -> Reply:
        loop = asyncio.get_running_loop()
        if not command.spec.shared:
            return await loop.run_in_executor(self.pool, self.router.execute, command, actor)
        # A read already in flight answers everyone who asked for it meanwhile: twenty
        # people typing `/db status acme` during an outage make one round of checks.
        key = command.line
        flight = self._flights.get(key)
        if flight is None:
            flight = loop.run_in_executor(self.pool, self.router.execute, command, actor)
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Services:
    """What the listeners need, built once per process around its Runtime."""

    rt: Runtime
    router: Router
    replier: Replier
    background: Background
    registered: dict[str, list[str]] = field(default_factory=dict)
    checkpointer: Checkpointer | None = None

    async def aclose(self) -> None:
        await self.background.drain()
        self.background.close()
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpointer.close)
        await self.replier.close()

    @property
    def settings(self) -> Settings:
        return self.rt.settings


def make_router(rt: Runtime, *, extra_admins: Iterable[str] = ()) -> Router:
    """The router over ``rt``: its commands, and the roles from its settings."""
    return Router(
        rt, roles=Roles.from_settings(rt.settings, extra_admins=extra_admins), registry=rt.registry
    )


def build_services(
    rt: Runtime,
    *,
    client: AsyncWebClient | None = None,
    router: Router | None = None,
    extra_admins: Iterable[str] = (),
) -> Services:
    router = router or make_router(rt, extra_admins=extra_admins)
    if client is not None and client.token is None and rt.settings.slack_bot_token:
        client.token = rt.settings.slack_bot_token.get_secret_value()
    replier = Replier(client or make_web_client(rt.settings))
    services = Services(rt, router, replier, Background(router, replier))
    services.checkpointer = checkpointer_for(rt, router.events)
    return services


def checkpointer_for(rt: Runtime, events: EventLog) -> Checkpointer | None:
    """A checkpoint of the log after each destructive action this process runs (from Slack or
    the shell), appended to DBOPS_CHECKPOINTS and posted to the ops channel as the scheduler
    posts its own (core.checkpoints); None when there is nowhere to publish."""
    settings = rt.settings
    if settings.slack_bot_token is None and settings.dbops_checkpoints is None:
        return None
    with _checkpointers_lock:  # one per event log, however many times services are built
        made = _checkpointers.get(id(events))
        if made is not None and not made.closed:
            return made
        notifier = SlackNotifier(web_client(settings), events) if settings.slack_bot_token else None
        made = _checkpointers[id(events)] = Checkpointer(
            lambda: publish(events, notifier, settings.ops_channel, settings.dbops_checkpoints)
        ).watch(events)
        return made


# By the log's id: a checkpointer lives exactly as long as the log it listens on (each holds
# the other), so an entry goes when its log does, before the id can be reused.
_checkpointers: weakref.WeakValueDictionary[int, Checkpointer] = weakref.WeakValueDictionary()
_checkpointers_lock = threading.Lock()
