"""The one place dbops's objects are built: a ``Runtime`` per process, from Settings.

Every entry point (the Slack app, the web routes, the scheduler, the shell, the CLI, a test)
makes one and hands it on; a handler reaches it as ``call.rt``. Nothing here is built before it
is used: `/db help`, /healthz and the shell's hints work without a fleet, and `dbops --help`
imports none of this.

    rt = Runtime.load().ready()      # settings from the environment, schema checked
    rt.ops                           # core.ops.Ops over rt.fleet, rt.engine, rt.events
    rt.desk.incidents                # the incident desk: Incidents + its Escalator (pager)
    rt.backups, rt.restarts, rt.onboarding.provisioner, rt.onboarding.billing
    rt.maintenance                   # core.maintenance.Maintenance: maintenance windows
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from bot.desk import Desk, Onboarding
from core.errors import DbopsError
from core.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bot.commands.router import Registry
    from core.backups import Backups
    from core.escalation import Escalator
    from core.fleet import Fleet
    from core.incidents import Incidents
    from core.maintenance import Maintenance
    from core.notify import Notifier
    from core.ops import Ops
    from core.restarts import Restarts
    from storage.eventkeys import Keyring
    from storage.events import EventLog

log = logging.getLogger("dbops")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Runtime:
    """Settings and everything built from them, once per process, each on first use.

    ``engine``, ``events``, ``fleet``, ``notifier``, ``registry`` and ``clock`` may be given
    (tests, the demo); otherwise they come from ``settings``. ``group_commit``: the event log
    commits appends from many threads together (`dbops serve`: storage/group_commit.py).
    Without a ``notifier`` messages go through the Slack outbox when SLACK_BOT_TOKEN is set,
    and nowhere otherwise (core.notify's QuietNotifier: the reply itself shows them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        events: EventLog | None = None,
        fleet: Fleet | None = None,
        notifier: Notifier | None = None,
        registry: Registry | None = None,
        clock: Callable[[], datetime] = utcnow,
        group_commit: bool = False,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.group_commit = group_commit
        self._engine = engine
        self._events = events
        self._fleet = fleet
        self._notifier = notifier
        self._registry = registry
        self._ops: Ops | None = None
        self._lock = threading.RLock()

    @classmethod
    def load(cls, **overrides: object) -> Runtime:
        """From the environment (and .env), with ``overrides`` for some settings."""
        return cls(load_settings(**overrides))

    # --- the database and the event log ----------------------------------------------------

    @cached_property
    def engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        from storage.db import make_engine
        from storage.spool import Spool, use_spool

        engine = make_engine(self.settings.database_url)
        # Events the log cannot take (its database down) wait in this file: storage/spool.py.
        use_spool(engine, Spool(self.settings.spool_path))
        return engine

    @cached_property
    def keys(self) -> Keyring | None:
        """DBOPS_EVENTS_KEY's keys: every event log of the process seals with them."""
        return self.settings.events_keyring()

    @cached_property
    def events(self) -> EventLog:
        if self._events is not None:
            return self._events
        if self.group_commit:
            from storage.group_commit import GroupCommitLog

            return GroupCommitLog(self.engine, keys=self.keys)
        from storage.events import EventLog

        return EventLog(self.engine, keys=self.keys)

    def ready(self) -> Runtime:
        """Create the schema on a brand-new database; refuse to go on against an older one."""
        from storage.migrate import SchemaError, check_schema, ensure_schema
        from storage.spool import flush_spool

        made = ensure_schema(self.engine)
        if made is not None:
            log.info("created the dbops schema (revision %s) in a new database", made)
            self.events.append(
                "db.upgrade", "schema", {"from": None, "to": made, "first_use": True}, actor="dbops"
            )
        try:
            check_schema(self.engine)
        except SchemaError as exc:
            raise DbopsError(str(exc)) from None
        # What an earlier run (this process's predecessor, or another) kept while the log was
        # down goes in now; the scheduler's health sweep does it again every minute.
        flush_spool(self.events)
        return self

    # --- the fleet and what works on it --------------------------------------------------------

    @property
    def fleet(self) -> Fleet:
        with self._lock:
            if self._fleet is None:
                if self.settings.dbops_fleet is None:
                    raise DbopsError(
                        "No fleet configured.",
                        hint="Set DBOPS_FLEET to your fleet.toml, or try `dbops demo` for a "
                        "sandbox.",
                    )
                from core.fleet import load_fleet

                self._fleet = load_fleet(self.settings.dbops_fleet)
            return self._fleet

    def _get_fleet(self) -> Fleet:
        return self.fleet

    @property
    def tz(self) -> ZoneInfo:
        return self.settings.tz

    @property
    def ops(self) -> Ops:
        """core's Ops (its SSH and libpq runners), built at the first command that needs it."""
        with self._lock:
            if self._ops is None:
                from core.ops import Ops

                self._ops = Ops(self.fleet, self.engine, self.events)
            return self._ops

    @property
    def registry(self) -> Registry:
        """Every /db command, built once from bot/commands/catalog.py: the routers' commands
        and what builds buttons outside a command (the incident card an alert opens, a page's
        Ack)."""
        with self._lock:
            if self._registry is None:
                from bot.commands.catalog import build_registry

                self._registry = build_registry()
            return self._registry

    @cached_property
    def notifier(self) -> Notifier:
        if self._notifier is not None:
            return self._notifier
        if self.settings.slack_bot_token is not None:
            from bot.outbox import outbox_notifier

            return outbox_notifier(self.settings, self.events, registry=self.registry)
        from bot.notifiers import QuietNotifier

        return QuietNotifier()

    def with_notifier(self, notifier: Notifier) -> Runtime:
        """Send through ``notifier`` (the CLI's console one when there is no Slack token);
        only before anything has been built with the default one."""
        if "notifier" in self.__dict__:
            raise RuntimeError("the runtime's notifier is already in use")
        self._notifier = notifier
        return self

    @cached_property
    def escalator(self) -> Escalator:
        from core.escalation import Escalator

        return Escalator(
            self.engine,
            self.events,
            self._get_fleet,
            self.notifier,
            ops_channel=self.settings.ops_channel,
            clock=self.clock,
            tz=self.tz,
        )

    @cached_property
    def incidents(self) -> Incidents:
        from core.incidents import Incidents

        return Incidents(
            self.engine,
            self.events,
            self._get_fleet,
            escalator=self.escalator,
            clock=self.clock,
            tz=self.tz,
        )

    @cached_property
    def desk(self) -> Desk:
        slack = self.settings.slack_bot_token is not None
        return Desk(self.incidents, self.notifier, self.settings.ops_channel, slack)

    @cached_property
    def backups(self) -> Backups:
        from core.backups import Backups

        # A failed restore test (the scheduler's) is an alert: it opens or updates an incident.
        return Backups(
            self.engine,
            self.events,
            self._get_fleet,
            self.ops.runners,
            clock=self.clock,
            on_alert=lambda alert: self.incidents.ingest([alert]),
        )

    @cached_property
    def restarts(self) -> Restarts:
        """core.restarts' one policy: the card's Restart and `/db restart` both go through it."""
        from core.restarts import Restarts

        ops = self.ops
        return Restarts(
            ops.engine, ops.events, self._get_fleet, ops.runners, incidents=self.incidents
        )

    @cached_property
    def onboarding(self) -> Onboarding:
        from core import email as mail
        from core.billing import Billing
        from core.provisioning import Provisioner

        ops = self.ops
        # Said here with the fleet file's path; the Provisioner refuses on its own as well.
        mail.require_branding(
            self.smtp_url, ops.fleet.business, str(self.settings.dbops_fleet or "")
        )
        provisioner = Provisioner(
            ops.engine, ops.events, self._get_fleet, ops.runners, smtp_url=self.smtp_url
        )
        billing = Billing.from_settings(
            self.settings,
            ops.engine,
            ops.events,
            self._get_fleet,
            propose=provisioner.propose_server,
        )
        return Onboarding(provisioner, billing)

    @cached_property
    def maintenance(self) -> Maintenance:
        """Maintenance windows (`/db maintenance`, the modal, the scheduler's end of each
        window): one per process, like the incident desk. The fleet is read when first needed
        (the list needs none)."""
        from core.maintenance import Maintenance

        return Maintenance(
            self.engine,
            self.events,
            self._get_fleet,
            clock=self.clock,
            tz=self.tz,
            smtp_url=self.smtp_url,
        )

    @property
    def smtp_url(self) -> str | None:
        """Where customer email goes (SMTP_URL); None: no email can be sent."""
        return self.settings.smtp_url

    # --- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close what this process opened: the runners' connections, a group-commit writer."""
        with self._lock:
            ops, self._ops = self._ops, None
        if ops is not None:
            ops.close()
        events = self.__dict__.get("events")
        if self._events is None and self.group_commit and events is not None:
            from storage.group_commit import GroupCommitLog

            if isinstance(events, GroupCommitLog):
                events.close()
