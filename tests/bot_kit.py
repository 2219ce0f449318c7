"""The bot as tests build it: a Runtime over a test's engine and fleet, the registry from
bot/commands/catalog.py, and the people who use it.

    rt = runtime(engine, sandbox_fleet, slack_bot_token=BOT_TOKEN, slack_api_url=stub.base_url)
    router = make_router(rt)             # alice operates, bob views, carol administers
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from bot.commands.roles import Roles
from bot.commands.router import Registry, Router
from bot.runtime import Runtime
from core.fleet import Fleet
from core.notify import Notifier
from core.ops import Ops
from core.settings import load_settings
from storage.events import EventLog

ALICE, BOB, CAROL = "U_ALICE", "U_BOB", "U_CAROL"  # operator, viewer, admin
ROLES = Roles(operators=frozenset({ALICE}), admins=frozenset({CAROL}))


def runtime(
    engine: Engine,
    fleet: Fleet | None = None,
    *,
    events: EventLog | None = None,
    registry: Registry | None = None,
    **settings: Any,
) -> Runtime:
    """A Runtime over ``engine`` (its event log: ``events``, or a new one) and ``fleet``, with
    ``settings`` over the environment's (e.g. ``slack_bot_token=None`` for the shell)."""
    return Runtime(
        load_settings(**settings),
        engine=engine,
        events=events if events is not None else EventLog(engine),
        fleet=fleet,
        registry=registry,
    )


class NoFleet(Runtime):
    """A runtime whose fleet must not be touched: the commands under test need none."""

    @property
    def fleet(self) -> Fleet:
        raise AssertionError("no fleet here")

    @property
    def ops(self) -> Ops:
        raise AssertionError("no fleet here")


def no_fleet(engine: Engine, *, registry: Registry | None = None, **settings: Any) -> Runtime:
    return NoFleet(
        load_settings(**settings), engine=engine, events=EventLog(engine), registry=registry
    )


def make_router(rt: Runtime, roles: Roles = ROLES, registry: Registry | None = None) -> Router:
    """The router over ``rt``: its registry unless another is given."""
    return Router(rt, roles=roles, registry=registry or rt.registry)


def sharing(
    rt: Runtime, *, notifier: Notifier | None = None, clock: Callable[[], datetime] | None = None
) -> Runtime:
    """Another process's runtime over ``rt``'s settings, database and event log (a scheduler
    beside the bot), sending through ``notifier`` and telling time by ``clock``."""
    return Runtime(
        rt.settings,
        engine=rt.engine,
        events=rt.events,
        notifier=notifier,
        **({"clock": clock} if clock is not None else {}),
    )
