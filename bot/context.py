"""What every entry point needs, built once: settings, the database engine, the event log, the
fleet. The CLI, the HTTP app, the scheduler and the shell all start from ``Context.load``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy import Engine

from core.errors import DbopsError
from core.fleet import Fleet, load_fleet
from core.settings import Settings, load_settings
from storage.db import make_engine
from storage.eventkeys import Keyring
from storage.events import EventLog
from storage.migrate import SchemaError, check_schema, ensure_schema
from storage.spool import Spool, flush_spool, use_spool

log = logging.getLogger("dbops")


@dataclass
class Context:
    settings: Settings
    _fleet: Fleet | None = field(default=None, repr=False)

    @classmethod
    def load(cls, **overrides: object) -> Context:
        return cls(load_settings(**overrides))

    @cached_property
    def engine(self) -> Engine:
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
        return EventLog(self.engine, keys=self.keys)

    def ready(self) -> Context:
        """Create the schema on a brand-new database; refuse to go on against an older one."""
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

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            if self.settings.dbops_fleet is None:
                raise DbopsError(
                    "No fleet configured.",
                    hint="Set DBOPS_FLEET to your fleet.toml, or try `dbops demo` for a sandbox.",
                )
            self._fleet = load_fleet(self.settings.dbops_fleet)
        return self._fleet
