"""Restart a server's PostgreSQL on an operator's word: `/db restart <server|customer>`.

SOP-201: restart a cluster only when it does not answer. A restart of one that answers drops
every connection of every customer on that server and does not bring back a database that
refuses connections for its own reasons, so it is refused, with why the database is down and
what to do instead. A customer stands for its server (one cluster holds all its customers).

One policy (``decide``, pure, over what ``observe`` saw) for `/db restart` and the incident
card's Restart alike. With an outage incident open on the server, the restart goes through the
incident (``restart_on_incident``: on its timeline, acknowledging it, marking it recovered);
without one, straight to the server. Both end in ``restart_server``: one restart per server at
a time, every remote command an event, and a ``server.restart`` event with the result and the
policy's reason. A refusal from either is a ``restart.refused`` event with the same reason.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from core.customers import Customer, list_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.health import Check, ServerHealth, check_fleet
from core.incidents import Incident, Incidents
from core.names import not_found, validate_server_name
from core.remote import FleetAccess, RunnerPool, quote_argv
from storage.events import EventLog
from storage.spool import RECORD_LATER, caught_up, record

log = logging.getLogger("dbops.incidents")

CHECK_DEADLINE_S = 3.0  # the look before a restart: quick, like the incident card's
RECHECK_S = 30.0  # after it, how long to wait for PostgreSQL to answer
SHOWN = 5  # customers named in a message; the rest are counted

# --- the policy -------------------------------------------------------------------------------

DISK_FULL_PERCENT = 99  # a cluster that stopped on a full disk will not start again


@dataclass(frozen=True)
class Down:
    """A customer's database that does not answer, and what its probe was told."""

    customer: str
    database: str
    why: str  # the connection check's detail: "FATAL: database ... not accepting connections"


@dataclass(frozen=True)
class Seen:
    """A look at one server, as the restart policy reads it (``observe`` takes one)."""

    server: str
    reachable: bool  # its commands (SSH) answer
    postgres: str  # "up" or "down": whether the cluster answers the monitoring role
    connection: str = ""  # why the cluster does not answer, when it does not
    disk_percent: int | None = None
    offline: tuple[Down, ...] = ()
    unrouted: tuple[str, ...] = ()  # databases pgBouncer does not route (not registered, disabled)


@dataclass(frozen=True)
class Decision:
    """Restart or not, and why; ``hint``: what to do instead, when refused."""

    restart: bool
    reason: str
    hint: str = ""
    answers: bool = False  # the cluster answers: a restart would drop every connection on it

    @property
    def ok(self) -> bool:  # the card's word for a button that makes sense now
        return self.restart

    @property
    def verdict(self) -> str:
        return "restart" if self.restart else "refuse"


# What a database's probe was told -> (why it is down, what to do instead). The first match wins.
_CAUSES: tuple[tuple[str, str, str], ...] = (
    (
        "not currently accepting connections",
        "it does not accept connections (datallowconn is off)",
        "`/db log {c}` shows whether a restore or maintenance turned them off; if nothing did, "
        "`ALTER DATABASE {d} ALLOW_CONNECTIONS true` brings it back; if its data is damaged, "
        "`/db restore {c}`.",
    ),
    (
        "too many connections for database",
        "it is at its connection limit",
        "`/db status {c}` shows its connections: end the idle ones, or raise its limit.",
    ),
    (
        "too many connections for role",
        "its role is at its connection limit",
        "`/db status {c}` shows its connections: end the idle ones, or raise the role's limit.",
    ),
    (
        "not permitted to log in",
        "its role cannot log in",
        "give its role LOGIN back (`/db log {c}` shows who changed it).",
    ),
    (
        "does not exist",
        "it does not exist",
        "`/db restore {c}` brings it back from its newest verified backup.",
    ),
)


def diagnose(down: Down, unrouted: Sequence[str] = ()) -> tuple[str, str]:
    """Why a database on a cluster that answers is down, and what to do instead of a restart:
    from its probe's error (datallowconn, connection limits, a role that cannot log in, a
    missing database) and pgBouncer's routing."""
    c, d = down.customer, down.database
    for needle, cause, todo in _CAUSES:
        if needle in down.why:
            return cause, todo.format(c=c, d=d)
    if d in unrouted:
        return (
            "pgBouncer does not route it",
            f"the pgbouncer check in `/db status {c}` says why (not registered, or disabled).",
        )
    cause = down.why or "its probe got no answer"
    return cause, (
        f"`/db status {c}` shows its checks; SOP-201 (database down) lists what to look at; "
        f"`/db restore {c}` if its data is damaged."
    )


def decide(seen: Seen, customers: Sequence[str] = ()) -> Decision:
    """The restart policy (SOP-201), for `/db restart` and the incident card alike.

    Restart only when PostgreSQL itself does not answer and the restart can be sent and can
    help: not over a full disk, not to a server whose commands do not answer. A cluster that
    answers is never restarted, even with a database of ``customers`` (every customer on the
    server when empty) down: a restart drops every other customer's connections and does not
    bring back a database that refuses connections for its own reasons; the refusal says why
    it is down and what to do instead.
    """
    name = seen.server
    up = seen.postgres == "up"
    if seen.disk_percent is not None and seen.disk_percent >= DISK_FULL_PERCENT:
        return Decision(
            False,
            f"the disk on {name} is {seen.disk_percent}% full: a restart will not help; "
            "free space first (SOP-201 step 6)",
            answers=up,
        )
    if not seen.reachable:
        return Decision(
            False,
            f"{name} does not answer over SSH either: the restart cannot be sent "
            "(check the VPS; SOP-201 step 7: contact the provider)",
            answers=up,
        )
    if not up:
        detail = f": {seen.connection}" if seen.connection else ""
        return Decision(True, f"PostgreSQL on {name} is not answering{detail}")
    down = [d for d in seen.offline if not customers or d.customer in customers]
    if down:
        cause, todo = diagnose(down[0], seen.unrouted)
        who = f"{down[0].customer}'s database"
        more = f" (and {', '.join(d.customer for d in down[1:])}'s)" if len(down) > 1 else ""
        return Decision(
            False,
            f"PostgreSQL on {name} answers; {who}{more} does not: {cause}; a restart would "
            "not bring it back",
            hint=todo,
            answers=True,
        )
    return Decision(False, f"PostgreSQL on {name} answers: nothing to restart", answers=True)


def seen_from_health(health: ServerHealth) -> Seen:
    """What ``decide`` reads, from a health look at one server (core.health.check_fleet)."""
    checks = {c.name: c for c in health.checks}
    return _seen(
        health.name,
        health.reachable,
        health.postgres,
        {
            n: {"value": c.value, "detail": c.detail, "verdict": c.verdict}
            for n, c in checks.items()
        },
        [Down(d.customer, d.database, _detail(d.checks)) for d in health.databases if not d.online],
    )


def seen_from_json(health: Mapping[str, Any]) -> Seen:
    """What ``decide`` reads, from a customer_status dict (``server`` and ``database``) or a
    report's server entry (core.report)."""
    server = health.get("server") if isinstance(health.get("server"), Mapping) else health
    database = health.get("database") if isinstance(health.get("database"), Mapping) else None
    assert isinstance(server, Mapping)
    checks = {c.get("name"): c for c in server.get("checks", [])}
    offline: list[Down] = []
    if database is not None and not database.get("online", True):
        found = [c for c in database.get("checks", []) if c.get("name") == "connection"]
        conn: Mapping[str, Any] = found[0] if found else {}
        offline.append(
            Down(
                str(database.get("customer", "the")),
                str(database.get("database", "")),
                str(conn.get("detail") or ""),
            )
        )
    return _seen(
        str(server.get("name", "the server")),
        bool(server.get("reachable", True)),
        str(server.get("postgres", "up")),
        checks,
        offline,
    )


def _detail(checks: Sequence[Check]) -> str:
    conn = next((c for c in checks if c.name == "connection"), None)
    return conn.detail if conn is not None else ""


def _seen(
    name: str, reachable: bool, postgres: str, checks: Mapping[Any, Any], offline: list[Down]
) -> Seen:
    disk = checks.get("disk_space") or {}
    conn = checks.get("connection") or {}
    bouncer = checks.get("pgbouncer") or {}
    routed = str(bouncer.get("detail") or "") if bouncer.get("verdict") == "crit" else ""
    return Seen(
        server=name,
        reachable=reachable,
        postgres=postgres,
        connection=str(conn.get("detail") or "") if postgres != "up" else "",
        disk_percent=disk["value"] if isinstance(disk.get("value"), int) else None,
        offline=tuple(offline),
        unrouted=tuple(d.database for d in offline if _named(d.database, routed)),
    )


def _named(word: str, text: str) -> bool:
    return bool(word) and re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def restart_precondition(health: Mapping[str, Any]) -> Decision:
    """``decide`` over a customer_status dict or a report's server entry: for the customer of
    its ``database`` entry, else for every customer on the server."""
    seen = seen_from_json(health)
    return decide(seen, [d.customer for d in seen.offline])


def observe(
    fleet: Fleet,
    customers: Sequence[Customer],
    runners: RunnerPool,
    server: str,
    *,
    deadline_s: float = CHECK_DEADLINE_S,
) -> Seen:
    """A quick look at ``server`` (its cluster, its ``customers``' databases, disk, SSH,
    pgBouncer) for ``decide``."""
    (health,) = check_fleet(
        fleet,
        customers,
        runners,
        deadline_s=deadline_s,
        servers=[server],
        log_window=timedelta(minutes=5),
    )
    return seen_from_health(health)


# One restart per server at a time in this process, whoever asks (an incident card's button,
# `/db restart`): a second restart while the first runs would only bounce the cluster again.
_restarting: dict[str, float] = {}  # server -> when its restart started (monotonic)
_restarting_lock = threading.Lock()


def _busy(server: str, started: float) -> DbopsError:
    return DbopsError(
        f"a restart of {server}'s PostgreSQL is already running "
        f"(started {int(time.monotonic() - started)}s ago).",
        hint="Its result is posted when it finishes; one restart at a time.",
    )


def refuse_while_restarting(server: str) -> None:
    """A DbopsError when a restart of ``server`` is running now: the quick look a caller takes
    before its own slower checks (``restart_server`` enforces it in any case)."""
    with _restarting_lock:
        started = _restarting.get(server)
    if started is not None:
        raise _busy(server, started)


@contextlib.contextmanager
def _one_restart(server: str) -> Iterator[None]:
    with _restarting_lock:
        started = _restarting.get(server)
        if started is not None:
            raise _busy(server, started)
        _restarting[server] = time.monotonic()
    try:
        yield
    finally:
        with _restarting_lock:
            _restarting.pop(server, None)


def restart_server(
    fleet: Fleet,
    runner_pool: RunnerPool,
    server: str,
    actor: str,
    *,
    customers: Sequence[Customer] = (),
    events: EventLog | None = None,
    timeout: float = 120.0,
    recheck_s: float = 30.0,
    check_deadline_s: float = 5.0,
    reason: str = "",
) -> dict[str, Any]:
    """Run the server's ``restart_command`` through its runner, then re-check it (and the given
    customers' databases) until PostgreSQL answers or ``recheck_s`` runs out. A DbopsError
    while another restart of ``server`` runs.

    Returns ``{server, command, ran, exit_code, error, postgres, answering, databases_online,
    databases_total, offline, duration_ms, message, recorded}`` and, when given, ``reason``
    (what the restart policy said); the event ``server.restart``
    says the same, written best-effort (storage.spool: ``recorded`` False when it waits for the
    event log to be back). A failure after the command ran (the re-check) is recorded as what
    it is, a restart done and not re-checked, and raised as a DbopsError saying so.
    """
    with _one_restart(server):
        return _restart_server(
            fleet,
            runner_pool,
            server,
            actor,
            customers=customers,
            events=events,
            timeout=timeout,
            recheck_s=recheck_s,
            check_deadline_s=check_deadline_s,
            reason=reason,
        )


def _restart_server(
    fleet: Fleet,
    runner_pool: RunnerPool,
    server: str,
    actor: str,
    *,
    customers: Sequence[Customer],
    events: EventLog | None,
    timeout: float,
    recheck_s: float,
    check_deadline_s: float,
    reason: str,
) -> dict[str, Any]:
    started = time.monotonic()
    config = fleet.server(server)
    argv = config.argv(config.restart_command)
    ran, exit_code, error = False, None, ""
    try:
        result = runner_pool.get(server).run(argv, timeout=timeout)
        ran, exit_code = True, result.exit_code
        if not result.ok:
            error = (result.stderr.strip().splitlines() or [""])[-1][:300]
    except DbopsError as exc:
        error = exc.message[:300]
    except Exception as exc:  # it may have gone out all the same: the re-check tells
        error = f"an unexpected error ({type(exc).__name__})"
        log.error("sending the restart of %s failed", server, exc_info=exc)
    postgres, online, offline = "down", 0, [c.name for c in customers]
    deadline = time.monotonic() + max(0.0, recheck_s)
    stopped: BaseException | None = None
    try:
        while True:
            (health,) = check_fleet(
                fleet,
                customers,
                runner_pool,
                deadline_s=check_deadline_s,
                servers=[server],
                log_window=timedelta(minutes=5),
            )
            postgres = health.postgres
            offline = [d.customer for d in health.databases if not d.online]
            online = len(health.databases) - len(offline)
            if (postgres == "up" and not offline) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)  # polling a restarting cluster, not timing a test
    except BaseException as exc:  # the restart ran: record that before anything else
        stopped, postgres = exc, "unknown"
        log.error("the re-check after restarting %s failed", server, exc_info=exc)
    answering = postgres == "up" and not offline
    if stopped is not None:
        ran_text = f"ran (exit {exit_code})" if ran else "was sent"
        message = (
            f"the restart of PostgreSQL on {server} {ran_text}, but the re-check after it "
            f"failed ({type(stopped).__name__}); `/db status` shows the server now."
        )
    elif answering:
        message = f"PostgreSQL on {server} answers again" + (
            f"; {online}/{len(customers)} databases online." if customers else "."
        )
    elif postgres == "up":
        message = f"PostgreSQL on {server} is up, but {', '.join(offline)} still not answering."
    else:
        why = f" ({error})" if error else ""
        message = f"PostgreSQL on {server} still does not answer after the restart{why}."
    out: dict[str, Any] = {
        "server": server,
        "command": quote_argv(argv),
        "ran": ran,
        "exit_code": exit_code,
        "error": error,
        "postgres": postgres,
        "answering": answering,
        "databases_online": online,
        "databases_total": len(customers),
        "offline": offline,
        "duration_ms": int((time.monotonic() - started) * 1000),
        "message": message,
    }
    if reason:
        out["reason"] = reason
    recorded = True
    if events is not None:
        recorded = record(events, "server.restart", server, out, actor=actor) or caught_up(events)
    out["recorded"] = recorded
    if stopped is not None:
        if not isinstance(stopped, Exception):
            raise stopped
        later = "" if recorded else " The event log is down: its record is written when it is back."
        raise DbopsError(message[:1].upper() + message[1:] + later) from stopped
    return out


@dataclass(frozen=True)
class Target:
    """What `/db restart NAME` restarts: a server's cluster, named directly or by a customer."""

    server: str
    customer: str | None  # the customer it was named by, if any
    customers: tuple[str, ...]  # every active customer on the server: all of them restart

    @property
    def scope(self) -> str:
        """Who a restart touches, in words: "2 databases (acme, umbrella)"."""
        n = len(self.customers)
        names = ", ".join(self.customers[:SHOWN]) + (f" +{n - SHOWN}" if n > SHOWN else "")
        return f"{n} database{'s' if n != 1 else ''}" + (f" ({names})" if n else "")


def restart_on_incident(
    desk: Incidents,
    incident_id: int | str,
    runners: RunnerPool,
    *,
    actor: str,
    recheck_s: float = 30.0,
    now: datetime | None = None,
    reason: str = "",
) -> dict[str, Any]:
    """Restart the incident's server, re-check it and say so in the timeline. Pressing it
    acknowledges an open incident (someone is on it); PostgreSQL answering again marks the
    incident recovered (resolving stays a human's call, with a cause). Whether a restart
    makes sense is ``decide``'s call (``Restarts.restart_incident``); ``reason`` is what it
    said, kept with the result."""
    inc = desk.get(incident_id)
    if inc.server is None:
        raise DbopsError(f"{inc.ref} names no server to restart.")
    if not inc.active:
        raise DbopsError(f"{inc.ref} is resolved.")
    refuse_while_restarting(inc.server)  # before the ack: a refused press changes nothing
    if inc.status == "open":
        desk.ack(inc.id, actor=actor, now=now)
    customers = [c for c in list_customers(desk.engine, inc.server) if c.name in inc.customers]
    result = restart_server(
        desk.fleet,
        runners,
        inc.server,
        actor,
        customers=customers,
        events=desk.events,
        recheck_s=recheck_s,
        reason=reason,
    )
    # After the restart: best-effort records (storage.spool), never the reason it fails.
    logged = desk.restarted(inc.id, result, actor=actor, now=now)
    recorded = bool(result.get("recorded", True)) and logged
    return {**result, "recorded": recorded or caught_up(desk.events)}


class Refused(DbopsError):
    """A restart the policy said no to: ``decision`` holds its reason and what to do instead."""

    def __init__(self, decision: Decision, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.decision = decision


@dataclass(frozen=True)
class Restarted:
    target: Target
    reason: str  # why it was allowed: what the look before found
    incident: Incident | None  # the incident it was recorded on, as it is afterwards
    result: dict[str, Any]  # restart_server's result: command, exit_code, answering, ...

    @property
    def recorded(self) -> bool:
        """False: the event log was down after the restart; its events are spooled."""
        return bool(self.result.get("recorded", True))

    @property
    def state(self) -> str:
        """What the restart reached, in words."""
        said = "restarted" if self.result.get("ran") else "restart not run"
        if self.result.get("ran"):
            said += "; answering" if self.result.get("answering") else "; still not answering"
        return said if self.recorded else f"{said}; {RECORD_LATER}"


class Restarts(FleetAccess):
    events: EventLog

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        runners: RunnerPool,
        *,
        incidents: Incidents | None = None,
        check_deadline_s: float = CHECK_DEADLINE_S,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.engine = engine
        self.events = events
        self._init_fleet_access(fleet, runners)
        self.incidents = incidents
        self.check_deadline_s = check_deadline_s
        self.recheck_s = recheck_s

    def target(self, name: str) -> Target:
        """A server by its name, or the server a customer is on; else a NotFound with the
        nearest names."""
        name = validate_server_name(str(name).strip().lower())
        fleet = self.fleet
        servers = [s.name for s in fleet.servers]
        everyone = list_customers(self.engine)
        if name in servers:
            server, customer = name, None
        else:
            found = next((c for c in everyone if c.name == name), None)
            if found is None:
                error = not_found("server or customer", name, servers + [c.name for c in everyone])
                error.hint = error.hint or "`/db servers` lists the servers and their customers."
                raise error
            server, customer = fleet.server(found.server).name, found.name
        on_it = tuple(c.name for c in everyone if c.server == server and c.status == "active")
        return Target(server, customer, on_it)

    def open_incident(self, server: str) -> Incident | None:
        """The outage incident open on ``server`` a restart belongs to: a server-down one
        first, then the most severe; merged ones go with their parent."""
        if self.incidents is None:
            return None
        found = [
            i
            for i in self.incidents.list_incidents(active=True, server=server, limit=50)
            if i.parent_id is None and i.is_outage
        ]
        found.sort(key=lambda i: i.kind != "server_down")  # stable: keeps severity order
        return found[0] if found else None

    def check(self, name: str, actor: str) -> tuple[Target, str]:
        """The look before a restart of NAME's server: its target and why a restart is
        allowed (``decide``), or a Refused (recorded as ``restart.refused``) saying why not
        and what to do instead; a DbopsError while a restart of it is running."""
        target = self.target(name)
        wanted = (target.customer,) if target.customer else ()
        return target, self._decide(target, wanted, actor).reason

    def check_incident(self, incident_id: int | str, actor: str) -> tuple[Incident, Target, str]:
        """The incident card's look before its Restart: the same policy as ``check``, for the
        incident's server and its customers."""
        assert self.incidents is not None, "an incident restart needs the incident desk"
        inc = self.incidents.get(incident_id)
        if inc.server is None or not inc.active:
            why = "it names no server" if inc.server is None else "it is resolved"
            raise DbopsError(f"Not restarting for {inc.ref}: {why}.")
        target = self._target_of(inc.server, inc.customers)
        return inc, target, self._decide(target, tuple(inc.customers), actor, ref=inc.ref).reason

    def restart(self, name: str, actor: str) -> Restarted:
        """Restart NAME's server when its PostgreSQL does not answer (``check``, again: a
        confirmation may be minutes old), then re-check it. Nothing runs on the server when
        the check refuses. Its events after the restart are best-effort (storage.spool): an
        event log that is down never turns a restart that ran into a reported failure."""
        target, reason = self.check(name, actor)
        incident = self.open_incident(target.server)
        if incident is not None:
            return self._on_incident(incident, target, reason, actor)
        result = restart_server(
            self.fleet,
            self.runners,
            target.server,
            actor,
            customers=self._customers(target),
            events=self.events,
            recheck_s=self.recheck_s,
            reason=reason,
        )
        return Restarted(target, reason, None, result)

    def restart_incident(self, incident_id: int | str, actor: str) -> Restarted:
        """The incident card's Restart: ``check_incident``, then the restart on the incident
        (acknowledged, on its timeline, recovered when PostgreSQL answers again)."""
        inc, target, reason = self.check_incident(incident_id, actor)
        return self._on_incident(inc, target, reason, actor)

    def _on_incident(self, inc: Incident, target: Target, reason: str, actor: str) -> Restarted:
        assert self.incidents is not None
        result = restart_on_incident(
            self.incidents,
            inc.id,
            self.runners,
            actor=actor,
            recheck_s=self.recheck_s,
            reason=reason,
        )
        return Restarted(target, reason, self.incidents.get(inc.id), result)

    def _target_of(self, server: str, named: Sequence[str]) -> Target:
        everyone = list_customers(self.engine, server)
        on_it = tuple(c.name for c in everyone if c.status == "active")
        return Target(self.fleet.server(server).name, named[0] if len(named) == 1 else None, on_it)

    def _decide(
        self, target: Target, customers: Sequence[str], actor: str, *, ref: str | None = None
    ) -> Decision:
        refuse_while_restarting(target.server)
        seen = observe(
            self.fleet,
            self._customers(target),
            self.runners,
            target.server,
            deadline_s=self.check_deadline_s,
        )
        decision = decide(seen, customers)
        if not decision.restart:
            raise self._refuse(target, decision, actor, ref=ref)
        return decision

    def _customers(self, target: Target) -> list[Customer]:
        return [c for c in list_customers(self.engine, target.server) if c.name in target.customers]

    def _refuse(
        self, target: Target, decision: Decision, actor: str, *, ref: str | None
    ) -> Refused:
        """The refusal: recorded (who asked, why not) and said with what to do instead."""
        server, customer = target.server, target.customer
        payload = {"server": server, "customer": customer, "reason": decision.reason}
        if ref is not None:
            payload["incident"] = ref
        # Best effort (storage.spool): the refusal is what the operator needs to read.
        record(self.events, "restart.refused", server, payload, actor=actor)
        said = f"Not restarting {server}'s PostgreSQL: {decision.reason}"
        if not decision.answers:  # unreachable, or a full disk: the reason says what to do
            return Refused(decision, f"{said}.", hint=decision.hint or None)
        look = f"`/db status {customer}`" if customer else "`/db servers`"
        return Refused(
            decision,
            f"{said}, and a restart would drop every connection of its {target.scope}.",
            hint=decision.hint or f"{look} shows what is wrong instead.",
        )
