"""Maintenance windows (issue 18): planned work that checks keep watching but nobody is paged for.

A window is on a server (covering the server and every customer database on it) or on one
customer's database, from ``starts_at`` to ``ends_at``, with a mandatory reason. Overlapping
windows combine: a subject is covered until the latest end of the windows chained together.
Inside a window:

* the health sweep still runs every check and records it (measurement history, report), and
  the report says ``in maintenance until ...`` instead of the failure;
* an alert about a covered subject opens no incident: it is recorded in the window
  (``maintenance.suppressed``; ``maintenance.recovered`` when it clears) for the summary;
* no page, escalation step or reminder is sent, including steps planned before the window
  began: the pager holds them to the window's end (core.escalation);
* no customer email goes out by itself.

At the end (planned, or ``end`` early), handled once by whoever runs the sweep first
(``close_due``): what still fails opens its incident and pages at that sweep (the sweep's own
alerts; Alertmanager's, which are not sent again for hours, are raised again from the window's
record); what failed and recovered inside the window pages no one and gets one line in the
window's summary, which the scheduler posts in the thread of the window's announcement. Downtime
inside a window does not count toward SLA credits (core.incidents.sla).

Customer notices: a window scheduled with ``notify`` emails each affected customer (the
customers on the server, or the one customer) once ahead and once at the end
(templates/email/maintenance-scheduled-*, maintenance-complete-*); each an ``email.sent``
event with source ``maintenance`` and source id ``mw-<id>:<ahead|end>:<customer>``, so none
is ever sent twice.

API (the bot's `/db maintenance`, the modal and the shell call these; data in, data out):

    m = Maintenance(engine, events, fleet, clock=..., tz=..., smtp_url=settings.smtp_url)
    m.schedule(target, duration, reason, *, actor, starts_at=None, notify=False) -> Scheduled
        target: a customer or a server name; duration "30m", "2h", "1h30m" (core.units.
        parse_span) or a timedelta, at most MAX_DURATION (7 days); reason required; starts_at
        aware (naive: TIMEZONE), from 5 minutes ago to MAX_AHEAD. Event maintenance.created.
        Scheduled.window, Scheduled.notices (list[Notice]: customer, to, phase, sent, detail).
    m.end(selector, *, actor) -> list[Window]
        selector: "mw-3", "3", "#3", or a server/customer name (its active windows; when none
        is active, its planned ones).
        Ends an active window (maintenance.ended) or cancels one not started yet
        (maintenance.cancelled); held pages are looked at again at once.
    m.get(id) -> Window; m.active(now), m.upcoming(now), m.windows(now, recent=24h) -> list[Window]
    m.list_json(now) -> {"windows": [Window.as_json(now), ...]}
    m.covering(server, customer, now) -> Cover | None   (Cover.until, Cover.window, as_json())
    m.covers(now) -> core.windows.Covers                 (for reports)
    m.expire(now) -> list[Window]     claims the windows whose end has passed, once each, safe
                                      with two schedulers (maintenance.expired for a planned end)
    m.close_due(now, raise_again=incidents.ingest) -> list[Closing]
        expire + per window: its Summary, the end notices, the alerts to raise again; and the
        summaries not posted yet (a failed post is retried the next sweep). The scheduler posts
        Closing.text in Closing.thread_ts (the announcement) of Closing.channel (else
        OPS_CHANNEL), then calls m.summary_posted(window.id).
    m.summary(window, now) -> Summary   (data: see Summary; text: the post)
    m.set_announcement(id, channel, ts) -> Window   (the bot, after posting the announcement)

``Window.as_json(now)``: ``{id, ref: "mw-3", target_kind, target, starts_at, ends_at, end,
reason, notify, created_by, created_at, ended_at, ended_by, closed_at, announcement:
{channel, ts} | null, summary_posted_at, status: scheduled|active|ended|expired|cancelled}``.
The report's and status's ``maintenance`` entry on a server or database: ``{id, ref, until,
reason}`` (null when not covered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal

from sqlalchemy import Engine, or_, update
from sqlmodel import Session, col, select

from core import email as mail
from core.alerts import Alert
from core.customers import Customer, get_customer, list_customers
from core.errors import DbopsError, NotFound
from core.escalation import release_held
from core.fleet import Fleet
from core.names import not_found, validate_server_name
from core.notify import inert
from core.units import parse_span, pretty_age, pretty_span
from core.windows import (
    Cover,
    Covers,
    Seen,
    Window,
    alert_from_json,
    cover_of,
    iso,
    load_windows,
    seen_of,
    window_ref,
)
from storage.events import EventLog, NewEvent
from storage.models_incidents import utc, write_session
from storage.models_maintenance import MaintenanceWindowRow

log = logging.getLogger("dbops.maintenance")

MAX_DURATION = timedelta(days=7)
MAX_AHEAD = timedelta(days=90)
PAST_GRACE = timedelta(minutes=5)  # "now" typed a moment ago, a modal's start time rounded down
REASON_MAX = 500
RECENT = timedelta(hours=24)
# A summary whose post failed is tried again at each sweep for this long.
SUMMARY_RETRY = timedelta(hours=6)
NOTICE_SOURCE = "maintenance"

TABLE = MaintenanceWindowRow.__table__  # type: ignore[attr-defined]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Notice:
    """One customer notice: sent (or already sent before), or why not."""

    customer: str
    to: str | None
    phase: Literal["ahead", "end"]
    sent: bool
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "to": self.to,
            "phase": self.phase,
            "sent": self.sent,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Scheduled:
    window: Window
    notices: list[Notice]

    def as_json(self, now: datetime | None = None) -> dict[str, Any]:
        return {
            "window": self.window.as_json(now),
            "notices": [n.as_json() for n in self.notices],
        }


@dataclass(frozen=True)
class Summary:
    """What a window saw: ``data`` is ``{window, down: [{key, check, kind, server, customer,
    customers, from, to, down_s, still_failing}], customers: [...], still_failing: [keys]}``
    and ``text`` the post (plain text, someone else's words made inert)."""

    window: Window
    data: dict[str, Any]
    text: str


@dataclass(frozen=True)
class Closing:
    """A window whose end was handled: its summary to post (``channel``/``thread_ts``: the
    announcement; None, the ops channel), the alerts raised again, the end notices.
    ``fresh``: handled by this call (False: only its summary post is being retried)."""

    window: Window
    summary: Summary
    raised_again: list[Alert] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    fresh: bool = True

    @property
    def text(self) -> str:
        return self.summary.text

    @property
    def channel(self) -> str | None:
        return self.window.announcement_channel

    @property
    def thread_ts(self) -> str | None:
        return self.window.announcement_ts


def parse_window_id(text: str) -> int | None:
    """``mw-3``, ``#3`` or ``3`` as 3; None for anything else (a name)."""
    raw = str(text).strip().lower().removeprefix("#").removeprefix("mw-")
    if raw.isascii() and raw.isdigit() and 0 < len(raw) <= 9 and int(raw) > 0:
        return int(raw)
    return None


class Maintenance:
    """Maintenance windows: one per process, like the incident desk."""

    def __init__(
        self,
        engine: Engine,
        events: EventLog,
        fleet: Fleet | Callable[[], Fleet],
        *,
        clock: Callable[[], datetime] = utcnow,
        tz: tzinfo = UTC,
        smtp_url: str | None = None,
        sender: str | None = None,
    ) -> None:
        self.engine = engine
        self.events = events
        self._fleet = fleet
        self.clock = clock
        self.tz = tz
        self.smtp_url = smtp_url
        self.sender = sender

    @property
    def fleet(self) -> Fleet:
        return self._fleet() if callable(self._fleet) else self._fleet

    def _now(self, now: datetime | None) -> datetime:
        return utc(now or self.clock())

    def _local(self, ts: datetime) -> str:
        return ts.astimezone(self.tz).strftime("%Y-%m-%d %H:%M %Z")

    # -- scheduling --------------------------------------------------------------------------

    def target(self, name: str) -> tuple[Literal["server", "customer"], str]:
        """A window's target: a customer (as `/db incident open` reads names), else a server."""
        name = str(name).strip()
        try:
            return "customer", get_customer(self.engine, name).name
        except DbopsError:
            pass
        servers = [s.name for s in self.fleet.servers]
        if name in servers:
            return "server", name
        validate_server_name(name)
        known = servers + [c.name for c in list_customers(self.engine)]
        raise not_found("server or customer", name, known)

    def schedule(
        self,
        target: str,
        duration: str | timedelta,
        reason: str,
        *,
        actor: str,
        starts_at: datetime | None = None,
        notify: bool = False,
        now: datetime | None = None,
    ) -> Scheduled:
        """Plan a window (see the module docstring); with ``notify``, each affected customer is
        emailed now (refused up front when no SMTP server is configured)."""
        now = self._now(now)
        kind, name = self.target(target)
        span = duration if isinstance(duration, timedelta) else parse_span(duration)
        if span <= timedelta(0):
            raise DbopsError("a maintenance window needs a positive duration.", hint="e.g. 2h.")
        if span > MAX_DURATION:
            raise DbopsError(
                f"a maintenance window is at most {pretty_span(MAX_DURATION)} long, not "
                f"{pretty_span(span)}.",
                hint="Plan longer work as several windows, each with its own reason.",
            )
        why = " ".join(str(reason or "").split())
        if not why:
            raise DbopsError(
                "a maintenance window needs a reason.",
                hint="Say what the work is: `/db maintenance vps1 2h kernel upgrade`.",
            )
        if len(why) > REASON_MAX:
            raise DbopsError(f"the reason is {len(why)} characters; keep it under {REASON_MAX}.")
        if not str(actor or "").strip():
            raise DbopsError("a maintenance window needs someone who planned it.")
        start = now if starts_at is None else self._aware(starts_at)
        if start < now - PAST_GRACE:
            raise DbopsError(f"{self._local(start)} is in the past.", hint="Start it now or later.")
        if start > now + MAX_AHEAD:
            raise DbopsError(
                f"{self._local(start)} is more than {MAX_AHEAD.days} days ahead.",
                hint="Plan it closer to the date.",
            )
        if notify:
            if not self.smtp_url:
                raise DbopsError(
                    "customer notices need an SMTP server, and none is configured.",
                    hint="Set SMTP_URL, or schedule the window without notices.",
                )
            mail.require_branding(self.smtp_url, self.fleet.business)
        with write_session(self.engine) as session:
            row = MaintenanceWindowRow(
                target_kind=kind,
                target=name,
                starts_at=start,
                ends_at=start + span,
                reason=why,
                notify=bool(notify),
                created_by=str(actor)[:64],
                created_at=now,
                seen={},
            )
            session.add(row)
            session.flush()
            window = Window.from_row(row)
        customers = [c.name for c in self.customers_of(window)]
        self.events.append(
            "maintenance.created",
            window.target,
            {**self._event(window, now), "customers": customers},
            actor=actor,
            ts=now,
        )
        notices = self._notices(window, "ahead", actor=actor, now=now) if notify else []
        return Scheduled(window, notices)

    def _aware(self, ts: datetime) -> datetime:
        return utc(ts if ts.tzinfo is not None else ts.replace(tzinfo=self.tz))

    @staticmethod
    def _event(window: Window, now: datetime) -> dict[str, Any]:
        data = window.as_json(now)
        data.pop("announcement", None)
        return {"window": window.ref, **data}

    # -- reading -----------------------------------------------------------------------------

    def get(self, window_id: int | str) -> Window:
        number = parse_window_id(str(window_id))
        if number is None:
            raise DbopsError(f"{str(window_id)[:40]!r} is not a maintenance window id.")
        with Session(self.engine) as session:
            row = session.get(MaintenanceWindowRow, number)
        if row is None:
            raise NotFound(
                f"no maintenance window {window_ref(number)}.",
                hint="`/db maintenance list` shows them.",
            )
        return Window.from_row(row)

    def _since(self, since: datetime) -> list[Window]:
        stmt = (
            select(MaintenanceWindowRow)
            .where(col(MaintenanceWindowRow.ends_at) > utc(since))
            .order_by(col(MaintenanceWindowRow.starts_at), col(MaintenanceWindowRow.id))
        )
        with Session(self.engine) as session:
            return [Window.from_row(r) for r in session.exec(stmt)]

    def active(self, now: datetime | None = None) -> list[Window]:
        now = self._now(now)
        return [w for w in load_windows(self.engine, now) if w.active(now)]

    def upcoming(self, now: datetime | None = None) -> list[Window]:
        now = self._now(now)
        return [w for w in load_windows(self.engine, now) if w.status(now) == "scheduled"]

    def windows(self, now: datetime | None = None, *, recent: timedelta = RECENT) -> list[Window]:
        """Active and planned windows, and those that ended (or were cancelled) in the last
        ``recent``; by start."""
        now = self._now(now)
        return [
            w
            for w in self._since(now - recent)
            if w.status(now) in ("active", "scheduled") or (w.end > now - recent)
        ]

    def list_json(self, now: datetime | None = None) -> dict[str, Any]:
        now = self._now(now)
        return {"windows": [w.as_json(now) for w in self.windows(now)]}

    def covering(
        self, server: str | None, customer: str | None, now: datetime | None = None
    ) -> Cover | None:
        """The cover of an alert's subject: a server (``customer`` None), or a customer's
        database on ``server`` (its server's windows cover it too)."""
        now = self._now(now)
        if customer is not None and server is None:
            try:
                server = get_customer(self.engine, customer).server
            except DbopsError:
                server = None
        return cover_of(load_windows(self.engine, now), now, server, customer)

    def covers(self, now: datetime | None = None) -> Covers:
        return Covers.load(self.engine, self._now(now))

    def customers_of(self, window: Window) -> list[Customer]:
        """Who a window affects: the active customers on its server, or its one customer."""
        if window.target_kind == "server":
            return [c for c in list_customers(self.engine, window.target) if c.status == "active"]
        try:
            return [get_customer(self.engine, window.target)]
        except DbopsError:
            return []

    # -- ending ------------------------------------------------------------------------------

    def find(self, selector: str, now: datetime | None = None) -> list[Window]:
        """What ``end`` acts on: the window an id names, or the windows on a server or customer
        that are active now (else, when none is, those planned)."""
        now = self._now(now)
        number = parse_window_id(selector)
        if number is not None:
            return [self.get(number)]
        name = str(selector).strip()
        mine = [w for w in load_windows(self.engine, now) if w.target == name]
        active = [w for w in mine if w.status(now) == "active"]
        planned = [w for w in mine if w.status(now) == "scheduled"]
        if active or planned:
            return active or planned  # a name ends what runs now; else cancels what is planned
        self.target(name)  # an unknown name: a NotFound with suggestions
        raise NotFound(
            f"no maintenance window on {name} is active or planned.",
            hint="`/db maintenance list` shows them.",
        )

    def end(self, selector: str, *, actor: str, now: datetime | None = None) -> list[Window]:
        """End the windows ``selector`` names now: an active one ends (``maintenance.ended``),
        one not started is cancelled (``maintenance.cancelled``). Pages it held are looked at
        again at once; what still fails pages at the next sweep."""
        now = self._now(now)
        done: list[Window] = []
        for window in self.find(selector, now):
            status = window.status(now)
            if status not in ("active", "scheduled"):
                raise DbopsError(
                    f"{window.ref} on {window.target} is already {status}"
                    + (f" ({self._local(window.end)})." if status != "cancelled" else "."),
                )
            with write_session(self.engine) as session:
                changed = session.connection().execute(
                    update(TABLE)
                    .where(
                        TABLE.c.id == window.id,
                        TABLE.c.ended_at.is_(None),
                        TABLE.c.closed_at.is_(None),
                    )
                    .values(ended_at=now, ended_by=str(actor)[:64])
                )
            if not changed.rowcount:
                continue  # someone else ended it a moment ago
            ended = self.get(window.id)
            kind = "maintenance.cancelled" if ended.cancelled else "maintenance.ended"
            self.events.append(kind, ended.target, self._event(ended, now), actor=actor, ts=now)
            done.append(ended)
        if done:
            release_held(self.engine, "mw-", now, prefix=True)
        return done

    # -- the end: once each ------------------------------------------------------------------

    def expire(self, now: datetime | None = None) -> list[Window]:
        """Claim the windows whose end has passed and whose end nobody has handled; each is
        claimed by one caller however many run at once. ``maintenance.expired`` for those that
        ran to their planned end (an early end or a cancellation was its own event)."""
        now = self._now(now)
        due = (
            select(MaintenanceWindowRow.id)
            .where(col(MaintenanceWindowRow.closed_at).is_(None))
            .where(
                or_(
                    col(MaintenanceWindowRow.ends_at) <= now,
                    col(MaintenanceWindowRow.ended_at) <= now,
                )
            )
            .order_by(col(MaintenanceWindowRow.id))
        )
        with Session(self.engine) as session:
            candidates = [i for i in session.exec(due) if i is not None]
        mine: list[Window] = []
        for window_id in candidates:
            with write_session(self.engine) as session:
                claimed = session.connection().execute(
                    update(TABLE)
                    .where(TABLE.c.id == window_id, TABLE.c.closed_at.is_(None))
                    .values(closed_at=now)
                )
            if claimed.rowcount:
                mine.append(self.get(window_id))
        expired = [w for w in mine if w.ended_at is None]
        if expired:
            self.events.append_many(
                [
                    NewEvent(
                        "maintenance.expired",
                        w.target,
                        self._event(w, now),
                        actor="dbops",
                        source=NOTICE_SOURCE,
                        source_id=f"{w.ref}:expired",
                        ts=now,
                    )
                    for w in expired
                ]
            )
        if mine:
            release_held(self.engine, "mw-", now, prefix=True)
        return mine

    def close_due(
        self,
        now: datetime | None = None,
        *,
        raise_again: Callable[[list[Alert]], object] | None = None,
    ) -> list[Closing]:
        """Handle every window whose end has passed (``expire``): raise again the alerts
        still firing that nobody will send again (``raise_again``: the incident desk's
        ``ingest``), send the end notices, build the summary (event
        ``maintenance.summary``). Also returns, not fresh, the summaries still to post."""
        now = self._now(now)
        out: list[Closing] = []
        for window in self.expire(now):
            out.append(self._close(window, now, raise_again))
        fresh = {c.window.id for c in out}
        for window in self._unposted(now):
            if window.id not in fresh:
                out.append(Closing(window, self.summary(window, now), fresh=False))
        return out

    def _close(
        self, window: Window, now: datetime, raise_again: Callable[[list[Alert]], object] | None
    ) -> Closing:
        replay: list[Alert] = []
        if not window.cancelled:
            replay = [
                alert_from_json(s.alert)
                for s in seen_of(window)
                if s.firing and s.source != "health" and s.alert
            ]
        if replay and raise_again is not None:
            try:
                raise_again(replay)
            except Exception:  # the summary and notices still go; the sweep raises health's
                log.exception("could not raise %s's alerts again", window.ref)
        summary = self.summary(window, now)
        notices: list[Notice] = []
        if window.notify:
            try:
                notices = self._notices(window, "end", actor="dbops", now=now)
            except Exception:
                log.exception("could not send %s's end notices", window.ref)
        self.events.append(
            "maintenance.summary",
            window.target,
            {
                "window": window.ref,
                "down": summary.data["down"],
                "customers": summary.data["customers"],
                "raised_again": [a.dedupe_key for a in replay],
            },
            actor="dbops",
            source=NOTICE_SOURCE,
            source_id=f"{window.ref}:summary",
            ts=now,
        )
        return Closing(window, summary, replay, notices)

    def _unposted(self, now: datetime) -> list[Window]:
        stmt = (
            select(MaintenanceWindowRow)
            .where(col(MaintenanceWindowRow.closed_at).is_not(None))
            .where(col(MaintenanceWindowRow.closed_at) > now - SUMMARY_RETRY)
            .where(col(MaintenanceWindowRow.summary_posted_at).is_(None))
            .order_by(col(MaintenanceWindowRow.id))
        )
        with Session(self.engine) as session:
            return [Window.from_row(r) for r in session.exec(stmt)]

    def summary_posted(self, window_id: int, now: datetime | None = None) -> Window:
        now = self._now(now)
        with write_session(self.engine) as session:
            session.connection().execute(
                update(TABLE).where(TABLE.c.id == window_id).values(summary_posted_at=now)
            )
        return self.get(window_id)

    def set_announcement(self, window_id: int | str, channel: str, ts: str) -> Window:
        """Where the window was announced: its summary goes in that message's thread."""
        window = self.get(window_id)
        with write_session(self.engine) as session:
            session.connection().execute(
                update(TABLE)
                .where(TABLE.c.id == window.id)
                .values(announcement_channel=channel[:64], announcement_ts=ts[:64])
            )
        return self.get(window.id)

    # -- the summary -------------------------------------------------------------------------

    def summary(self, window: Window, now: datetime | None = None) -> Summary:
        """What was down inside the window, when and for how long, and who it touched."""
        now = self._now(now)
        end = min(window.end, now)
        seen = seen_of(window)
        servers_down = {s.server for s in seen if s.kind == "server_down" and s.server}
        rows: list[dict[str, Any]] = []
        affected: set[str] = set()
        for s in seen:
            if s.kind == "db_down" and s.server in servers_down:
                continue  # folded into its server's line
            customers = [s.customer] if s.customer else []
            if s.kind == "server_down" and s.server:
                on_server: set[str] = set()
                for x in seen:
                    if x.kind == "db_down" and x.server == s.server and x.customer:
                        on_server.add(x.customer)
                customers = sorted(on_server | {c.name for c in self._on(s.server)})
            affected.update(c for c in customers if c)
            rows.append(
                {
                    "key": s.key,
                    "check": s.check,
                    "kind": s.kind,
                    "server": s.server,
                    "customer": s.customer,
                    "customers": customers,
                    "from": iso(s.spans[0][0]),
                    "to": iso(s.spans[-1][1]) if not s.firing else None,
                    "down_s": s.down_s(end),
                    "still_failing": s.firing,
                    "source": s.source,
                }
            )
        data = {
            "window": window.as_json(now),
            "down": rows,
            "customers": sorted(affected),
            "still_failing": [r["key"] for r in rows if r["still_failing"]],
        }
        return Summary(window, data, self._summary_text(window, rows, sorted(affected)))

    def _on(self, server: str) -> list[Customer]:
        return [c for c in list_customers(self.engine, server) if c.status == "active"]

    def _summary_text(
        self, window: Window, rows: Sequence[dict[str, Any]], affected: Sequence[str]
    ) -> str:
        where = f"{window.target_kind} {window.target}"
        reason = inert(window.reason)
        if window.cancelled:
            return (
                f"Maintenance {window.ref} on {where} ({reason}) was cancelled before it "
                f"started, by <@{window.ended_by}>."
                if window.ended_by
                else f"Maintenance {window.ref} on {where} ({reason}) was cancelled."
            )
        how = (
            f"ended early by <@{window.ended_by}>"
            if window.ended_at is not None and window.ended_by
            else "as planned"
        )
        lines = [
            f"Maintenance {window.ref} on {where} is over ({reason}): "
            f"{self._local(window.starts_at)} to {self._local(window.end)}, {how}."
        ]
        if not rows:
            lines.append("Nothing went down inside the window.")
        else:
            lines.append("What was down:")
            for r in rows:
                lines.append("- " + self._line(r))
        if affected:
            lines.append("Customers affected: " + ", ".join(affected) + ".")
        if any(r["still_failing"] for r in rows):
            lines.append("What still fails opens its incident and pages at this sweep, as usual.")
        if rows:
            lines.append("Downtime inside the window does not count toward SLA credits.")
        return "\n".join(lines)

    def _line(self, r: dict[str, Any]) -> str:
        if r["kind"] == "server_down":
            what = f"PostgreSQL on {r['server']}"
        elif r["kind"] == "db_down":
            what = f"{r['customer']}'s database"
        else:
            what = f"{r['check']} on {r['customer'] or r['server'] or 'the fleet'}"
        start = self._local(datetime.fromisoformat(r["from"].replace("Z", "+00:00")))
        if r["still_failing"]:
            text = f"{what}: down since {start}, still failing at the end"
        else:
            stop = self._local(datetime.fromisoformat(r["to"].replace("Z", "+00:00")))
            text = (
                f"{what}: {start} to {stop} ({pretty_age(r['down_s'])}), recovered inside "
                "the window, no page"
            )
        if r["kind"] == "server_down" and r["customers"]:
            text += f" ({', '.join(r['customers'])})"
        return inert(text)

    # -- customer notices --------------------------------------------------------------------

    def _notices(
        self, window: Window, phase: Literal["ahead", "end"], *, actor: str, now: datetime
    ) -> list[Notice]:
        if not self.smtp_url:
            return [
                Notice(c.name, c.email, phase, False, "no SMTP server configured")
                for c in self.customers_of(window)
            ]
        brand = mail.branding(self.fleet.business)
        seen = seen_of(window)
        end = min(window.end, now)
        out: list[Notice] = []
        for customer in self.customers_of(window):
            if not customer.email:
                out.append(Notice(customer.name, None, phase, False, "no address on record"))
                continue
            context = {
                **brand,
                "customer": customer.name,
                "reason": window.reason,
                "starts": self._local(window.starts_at),
                "ends": self._local(window.ends_at),
                "ended": self._local(end),
                "on_server": window.target_kind == "server",
                "cancelled": window.cancelled,
                "down": self._down_for(customer, seen, end),
                "still_down": any(
                    s.firing and _touches(s, customer) and s.kind in ("db_down", "server_down")
                    for s in seen
                ),
            }
            name = "maintenance-scheduled" if phase == "ahead" else "maintenance-complete"
            source_id = f"{window.ref}:{phase}:{customer.name}"
            try:
                email = mail.render(name, context, to=[customer.email])
                sent = mail.send(
                    email,
                    self.smtp_url,
                    events=self.events,
                    actor=actor,
                    subject=customer.name,
                    sender=self.sender,
                    source=NOTICE_SOURCE,
                    source_id=source_id,
                )
            except DbopsError as exc:
                out.append(Notice(customer.name, customer.email, phase, False, exc.message))
                continue
            again = bool(sent.get("already_sent"))
            out.append(
                Notice(customer.name, customer.email, phase, True, "sent before" if again else "")
            )
        return out

    @staticmethod
    def _down_for(customer: Customer, seen: Iterable[Seen], end: datetime) -> str:
        spans = [
            s.down_s(end)
            for s in seen
            if s.kind in ("db_down", "server_down") and _touches(s, customer)
        ]
        return pretty_age(max(spans)) if spans and max(spans) > 0 else ""


def _touches(seen: Seen, customer: Customer) -> bool:
    if seen.kind == "server_down":
        return seen.server == customer.server
    return seen.customer == customer.name
