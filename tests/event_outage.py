"""An event-log database that can be cut: a real PostgreSQL database behind tests/blackhole.py.

The ``event_outage`` fixture (registered in tests/conftest.py) gives a fresh, migrated database
on the test server, an engine that reaches it only through the proxy, and an ``EventLog`` on
that engine with a short deadline (``DEADLINE_S``), so tests wait seconds, not the production 5 s:

    def test_it_survives(event_outage: EventOutage) -> None:
        log = event_outage.events              # or event_outage.group_log(), or your own
        event_outage.blackhole(seconds=30)     # a dropped route: nothing answers, nothing resets
        event_outage.refuse(seconds=30)        # PostgreSQL down: connections refused and reset
        event_outage.heal()                    # before the seconds are up
        assert event_outage.verdict().ok       # read straight from the server, not the proxy

To cut the line at one step of an operation, arm it: the outage begins just before the INSERT
of the first matching event goes out (inside its transaction: the most awkward moment), for
every kind of log on ``event_outage.engine``:

    event_outage.arm(lambda kind, subject: kind == "restore.swapped", mode="refuse", seconds=30)

``stored()`` lists what reached the database, for "the events appear once the log is back".
A breaker opened by the outage stays open until its back-off ends (1 s after the first failure);
``wait_for_log`` appends until the log takes events again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from storage.db import make_engine
from storage.events import EventLog, EventLogUnavailable, StoredEvent, Verdict
from storage.group_commit import GroupCommitLog
from storage.migrate import upgrade
from tests.blackhole import Blackhole, Mode
from tests.pgserver import Databases

DEADLINE_S = 2.0
_KIND, _SUBJECT = 2, 4  # positions in EventLog's INSERT parameters


@dataclass
class EventOutage:
    proxy: Blackhole
    engine: Engine  # through the proxy
    direct: Engine  # straight to the server, for checks
    events: EventLog
    deadline: float = DEADLINE_S
    _logs: list[GroupCommitLog] = field(default_factory=list)

    def blackhole(self, seconds: float | None = None) -> None:
        self.proxy.blackhole(seconds)

    def refuse(self, seconds: float | None = None) -> None:
        self.proxy.refuse(seconds)

    def heal(self) -> None:
        self.proxy.heal()

    def group_log(self, **kwargs: Any) -> GroupCommitLog:
        """A GroupCommitLog on the proxied engine, with the short deadline; closed at teardown."""
        kwargs.setdefault("deadline", self.deadline)
        log = GroupCommitLog(self.engine, **kwargs)
        self._logs.append(log)
        return log

    def arm(
        self,
        when: Callable[[str, str | None], bool],
        *,
        mode: Mode = "blackhole",
        seconds: float | None = None,
    ) -> threading.Event:
        """Cut the line just before the first INSERT with an event matching ``when(kind,
        subject)``; the returned flag is set once it has been cut."""
        fired = threading.Event()

        def before(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if fired.is_set() or not statement.startswith("INSERT INTO events"):
                return
            rows = params if isinstance(params, list) else [params]
            if any(when(row[_KIND], row[_SUBJECT]) for row in rows):
                fired.set()
                if mode == "refuse":
                    self.refuse(seconds)
                else:
                    self.blackhole(seconds)

        event.listen(self.engine, "before_cursor_execute", before)
        return fired

    def stored(self) -> list[StoredEvent]:
        return list(EventLog(self.direct).iter_all())

    def verdict(self) -> Verdict:
        return EventLog(self.direct).verify()

    def wait_for_log(self, log: EventLog | None = None, timeout: float = 30.0) -> float:
        """Append a probe event until one is stored; the seconds that took."""
        log = log or self.events
        start = time.monotonic()
        while True:
            try:
                log.append("probe", "event-outage")
                return time.monotonic() - start
            except EventLogUnavailable as exc:
                if time.monotonic() - start > timeout:
                    raise
                time.sleep(min(0.05, exc.retry_after or 0.05))


@pytest.fixture
def event_outage(pg_databases: Databases) -> Iterator[EventOutage]:
    url = pg_databases.create()
    direct = make_engine(url)
    upgrade(direct)
    target = make_url(url)
    with Blackhole((target.host or "127.0.0.1", target.port or 5432)) as proxy:
        engine = make_engine(target.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
        outage = EventOutage(proxy, engine, direct, EventLog(engine, deadline=DEADLINE_S))
        try:
            yield outage
        finally:
            proxy.heal()
            for log in outage._logs:
                log.close()
            engine.dispose()
            direct.dispose()
