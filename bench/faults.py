"""How long dbops takes to notice a fault, against the deadline it is given.

SSH (a sandbox of 3 PostgreSQL clusters with an sshd each, in a temp dir, torn down at the end;
`dbops sandbox break ssh-hang vps2` stops vps2's sshd and everything under it):

- connect-hang: a call on a runner with no connection yet. TCP connects (the kernel's backlog)
  and no SSH banner ever comes.
- exec-hang: the connection was opened by an earlier command, then the server went silent: the
  call finds out through the liveness probe (a session open on the reused connection), tries one
  fresh connection, and gives up by its deadline.

Each is timed for a raw ``SSHRunner.run`` at the deadlines health gives its commands (status:
2.0 s of its 2.5 s; the report: 8 s of its 10 s), and for ``/db status`` of a customer on the hung
server (``Ops.status``'s path, 2.5 s), next to the same status on a healthy server.

The event writer (a database on the test PostgreSQL reached through tests/blackhole.py's proxy,
production deadline and breaker; and a SQLite file whose write lock another connection holds):

- events-blackhole: the proxy swallows everything. An append on a pooled connection, four
  appends queued at once in a GroupCommitLog, then appends while the breaker is open.
- events-refused: PostgreSQL down (connections refused and reset): an append.
- events-back: how long after the database is back the first append succeeds, with a client
  appending every 20 ms, after outages of 3 s and 30 s (by then the back-off is at its longest).
- events-locked: SQLite, the write lock held by another process for longer than the deadline.

    .venv/bin/python bench/faults.py [--rounds 3] [--json]

Each kind of fault is a function returning rows; ``main`` runs them all and prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy.engine import make_url

from core import sandbox
from core.customers import Customer, customer_from_mapping
from core.errors import DbopsError
from core.fleet import Fleet, load_fleet
from core.health import Limits
from core.ops import REPORT_DEADLINE_S, STATUS_DEADLINE_S
from core.remote import SSHRunner
from core.report import customer_status
from storage.db import make_engine
from storage.events import APPEND_DEADLINE_S, BREAKER_LONGEST_S, EventLog, EventLogUnavailable
from storage.group_commit import GroupCommitLog
from storage.migrate import upgrade
from tests.blackhole import Blackhole
from tests.pgserver import Databases, admin_conninfo

HUNG = "vps2"
HEALTHY = "vps1"


@dataclass
class Row:
    fault: str
    what: str
    deadline_s: float
    median_s: float
    max_s: float
    outcome: str


@dataclass
class SSHFleet:
    dir: Path
    fleet: Fleet
    customers: list[Customer]

    def runner(self, server: str) -> SSHRunner:
        return SSHRunner(self.fleet.server(server), self.fleet.known_hosts_path)

    def customer_on(self, server: str) -> Customer:
        return next(c for c in self.customers if c.server == server)

    @contextlib.contextmanager
    def hung(self) -> Iterator[None]:
        sandbox.break_fault(self.dir, "ssh-hang", HUNG)
        try:
            yield
        finally:
            sandbox.heal(self.dir)


@contextlib.contextmanager
def ssh_fleet() -> Iterator[SSHFleet]:
    directory = Path(tempfile.mkdtemp(prefix="dbops-bench-faults-"))
    try:
        state = sandbox.up(directory, servers=3, customers=6, ssh=True)
        yield SSHFleet(
            directory,
            load_fleet(state["fleet"]),
            [customer_from_mapping(c) for c in state["customers"]],
        )
    finally:
        sandbox.down(directory, remove=True)
        shutil.rmtree(directory, ignore_errors=True)


def _failure(fn: Callable[[], Any]) -> tuple[float, str]:
    """How long ``fn`` took to fail, and its message (a fault that went unnoticed is an error)."""
    started = time.monotonic()
    try:
        fn()
    except DbopsError as exc:
        return time.monotonic() - started, exc.message
    raise SystemExit("the hung server answered: the fault did not take")


def _row(fault: str, what: str, deadline: float, runs: list[tuple[float, str]]) -> Row:
    times = [t for t, _ in runs]
    return Row(
        fault,
        what,
        deadline,
        round(statistics.median(times), 2),
        round(max(times), 2),
        runs[-1][1],
    )


def _status_crit(env: SSHFleet, customer: Customer, runner: SSHRunner) -> tuple[float, str]:
    started = time.monotonic()
    got = customer_status(env.fleet, customer, runner, deadline_s=STATUS_DEADLINE_S)
    took = time.monotonic() - started
    if got["verdict"] != "crit":
        raise SystemExit(f"status on the hung server was {got['verdict']}, not crit")
    disk = next(c for c in got["server"]["checks"] if c["name"] == "disk_space")
    return took, f"crit: {disk['detail']}"


def _command_deadlines() -> list[float]:
    return [
        Limits.for_deadline(d).command_timeout_s for d in (STATUS_DEADLINE_S, REPORT_DEADLINE_S)
    ]


def connect_hang(env: SSHFleet, rounds: int) -> list[Row]:
    """The server hangs before a connection exists: every call starts with a connect."""
    rows = []
    with env.hung():
        for deadline in _command_deadlines():
            runs = []
            for _ in range(rounds):
                runner = env.runner(HUNG)
                runs.append(_failure(partial(runner.run, ["true"], timeout=deadline)))
                runner.close()
            rows.append(_row("connect-hang", "SSHRunner.run", deadline, runs))
        runs = []
        for _ in range(rounds):
            runner = env.runner(HUNG)
            runs.append(_status_crit(env, env.customer_on(HUNG), runner))
            runner.close()
        rows.append(_row("connect-hang", "/db status (hung server)", STATUS_DEADLINE_S, runs))
    return rows


def exec_hang(env: SSHFleet, rounds: int) -> list[Row]:
    """The server hangs after a command went through on the connection that is then reused."""
    rows = []
    for deadline in _command_deadlines():
        runs = []
        for _ in range(rounds):
            runner = env.runner(HUNG)
            runner.run(["true"]).check()
            with env.hung():
                runs.append(_failure(partial(runner.run, ["true"], timeout=deadline)))
            runner.close()
        rows.append(_row("exec-hang", "SSHRunner.run", deadline, runs))
    runs = []
    for _ in range(rounds):
        runner = env.runner(HUNG)
        runner.run(["true"]).check()
        with env.hung():
            runs.append(_status_crit(env, env.customer_on(HUNG), runner))
        runner.close()
    rows.append(_row("exec-hang", "/db status (hung server)", STATUS_DEADLINE_S, runs))
    return rows


def healthy_status(env: SSHFleet, rounds: int) -> list[Row]:
    """/db status on a healthy server, alone and while another server hangs: the comparison."""
    rows = []
    customer = env.customer_on(HEALTHY)
    for label, hung in (("alone", False), (f"while {HUNG} hangs", True)):
        runner = env.runner(HEALTHY)
        runner.run(["true"]).check()
        runs = []
        with env.hung() if hung else contextlib.nullcontext():
            for _ in range(rounds):
                started = time.monotonic()
                got = customer_status(env.fleet, customer, runner, deadline_s=STATUS_DEADLINE_S)
                runs.append((time.monotonic() - started, got["verdict"]))
        runner.close()
        rows.append(_row("none", f"/db status (healthy server, {label})", STATUS_DEADLINE_S, runs))
    return rows


def sessions_full(env: SSHFleet, rounds: int, calls: int = 10) -> list[Row]:
    """More calls at once than session slots, on an open connection to the server that hangs:
    the time until the last of them is back (the slowest of each round)."""
    deadline = Limits.for_deadline(STATUS_DEADLINE_S).command_timeout_s
    runs = []
    for _ in range(rounds):
        runner = env.runner(HUNG)
        runner.run(["true"]).check()
        with env.hung(), ThreadPoolExecutor(calls) as pool:
            futures = [
                pool.submit(_failure, partial(runner.run, ["true"], timeout=deadline))
                for _ in range(calls)
            ]
            outcomes = [f.result() for f in futures]
        runner.close()
        runs.append(max(outcomes))
    return [_row("exec-hang", f"{calls} SSHRunner.run at once (8 slots)", deadline, runs)]


def ssh_faults(rounds: int) -> list[Row]:
    with ssh_fleet() as env:
        rows = connect_hang(env, rounds) + exec_hang(env, rounds)
        return rows + sessions_full(env, rounds) + healthy_status(env, rounds)


# -- the event writer ------------------------------------------------------------------------


@contextlib.contextmanager
def proxied_event_db() -> Iterator[tuple[Blackhole, str]]:
    """A migrated event-log database on the test server, and its URL through the proxy."""
    with admin_conninfo() as admin:
        dbs = Databases(admin)
        try:
            url = dbs.create()
            direct = make_engine(url)
            upgrade(direct)
            direct.dispose()
            target = make_url(url)
            with Blackhole((target.host or "127.0.0.1", target.port or 5432)) as proxy:
                via = target.set(host="127.0.0.1", port=proxy.port)
                yield proxy, via.render_as_string(hide_password=False)
        finally:
            dbs.drop_all()


@contextlib.contextmanager
def _fresh_log(url: str) -> Iterator[GroupCommitLog]:
    """A log on a new engine (so a new, closed breaker), one event stored: a warm pool."""
    engine = make_engine(url)
    log = GroupCommitLog(engine)
    try:
        log.append("bench", "warm-up")
        yield log
    finally:
        log.close()
        engine.dispose()


def _unavailable(fn: Callable[[], Any]) -> tuple[float, str]:
    started = time.monotonic()
    try:
        fn()
    except EventLogUnavailable as exc:
        return time.monotonic() - started, str(exc)
    raise SystemExit("the event log took an event through the fault: it did not take")


def _queued(log: GroupCommitLog, n: int) -> tuple[float, str]:
    """``n`` appends from ``n`` threads at once: until the last has failed."""
    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda _: _unavailable(partial(log.append, "bench")), range(n)))
    return time.monotonic() - started, runs[-1][1]


def events_blackhole(proxy: Blackhole, url: str, rounds: int) -> list[Row]:
    one: list[tuple[float, str]] = []
    queued: list[tuple[float, str]] = []
    fast: list[tuple[float, str]] = []
    for _ in range(rounds):
        with _fresh_log(url) as log:
            proxy.blackhole()
            one.append(_unavailable(partial(log.append, "bench")))
            proxy.heal()
        with _fresh_log(url) as log:
            proxy.blackhole()
            queued.append(_queued(log, 4))
            fast += [_unavailable(partial(log.append, "bench")) for _ in range(100)]
            proxy.heal()
    fast_s = [t for t, _ in fast]
    return [
        _row("events-blackhole", "append, pooled connection", APPEND_DEADLINE_S, one),
        _row(
            "events-blackhole",
            "4 appends queued at once (GroupCommitLog)",
            APPEND_DEADLINE_S,
            queued,
        ),
        Row(
            "events-blackhole",
            "append while the breaker is open (100 a round)",
            APPEND_DEADLINE_S,
            round(statistics.median(fast_s), 6),
            round(max(fast_s), 6),
            f"median {statistics.median(fast_s) * 1e6:.0f} us, slowest {max(fast_s) * 1e6:.0f} us:"
            f" {fast[-1][1]}",
        ),
    ]


def events_refused(proxy: Blackhole, url: str, rounds: int) -> list[Row]:
    runs = []
    for _ in range(rounds):
        with _fresh_log(url) as log:
            proxy.refuse()
            runs.append(_unavailable(partial(log.append, "bench")))
            proxy.heal()
    return [_row("events-refused", "append, PostgreSQL refusing", APPEND_DEADLINE_S, runs)]


def events_back(proxy: Blackhole, url: str, outage_s: float, rounds: int) -> list[Row]:
    """After an outage of ``outage_s`` (black hole, then refused), appending every 20 ms: from
    the heal to the first append stored."""
    rows = []
    for fault in ("blackhole", "refuse"):
        runs = []
        for _ in range(rounds):
            with _fresh_log(url) as log:
                getattr(proxy, fault)(outage_s)
                stop = threading.Event()

                def client(log: GroupCommitLog = log) -> float:
                    while not stop.is_set():
                        try:
                            log.append("bench", "client")
                            return time.monotonic()
                        except EventLogUnavailable:
                            pass
                        time.sleep(0.02)
                    return 0.0

                with ThreadPoolExecutor(1) as pool:
                    back = pool.submit(client)
                    if not proxy.wait_healed(outage_s + 5):
                        raise SystemExit("the proxy did not heal")
                    healed = proxy.changed_at
                    try:
                        stored_at = back.result(timeout=60)
                    finally:
                        stop.set()
                runs.append(
                    (stored_at - healed, f"stored {stored_at - healed:.2f} s after the heal")
                )
        kind = "black hole" if fault == "blackhole" else "refusal"
        what = f"first append stored after a {outage_s:g} s {kind}"
        rows.append(_row("events-back", what, BREAKER_LONGEST_S + APPEND_DEADLINE_S, runs))
    return rows


def events_locked(rounds: int) -> list[Row]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.db"
        engine = make_engine(f"sqlite:///{path}")
        upgrade(engine)
        for _ in range(rounds):
            log = EventLog(make_engine(f"sqlite:///{path}"))
            log.append("bench", "warm-up")
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            runs.append(_unavailable(partial(log.append, "bench")))
            holder.execute("ROLLBACK")
            holder.close()
            log.engine.dispose()
        engine.dispose()
    return [_row("events-locked", "append, SQLite write lock held", APPEND_DEADLINE_S, runs)]


def event_writer_faults(rounds: int) -> list[Row]:
    with proxied_event_db() as (proxy, url):
        rows = events_blackhole(proxy, url, rounds) + events_refused(proxy, url, rounds)
        rows += events_back(proxy, url, 3.0, rounds) + events_back(proxy, url, 30.0, rounds)
    return rows + events_locked(rounds)


# Every group of faults: rounds -> rows. Each sets up (and tears down) what it needs.
GROUPS: list[Callable[[int], list[Row]]] = [ssh_faults, event_writer_faults]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=[g.__name__ for g in GROUPS], help="one group of faults")
    args = parser.parse_args()

    groups = [g for g in GROUPS if args.only in (None, g.__name__)]
    rows = [row for group in groups for row in group(args.rounds)]

    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"time to detect a fault, {os.cpu_count()} CPUs, {args.rounds} rounds each")
    print(f"{'fault':<13} {'what':<46} {'deadline':>8} {'median':>7} {'max':>6}  outcome")
    for r in rows:
        print(
            f"{r.fault:<13} {r.what:<46} {r.deadline_s:>7.1f}s {r.median_s:>6.2f}s "
            f"{r.max_s:>5.2f}s  {r.outcome[:90]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
