"""Maintenance windows as data: which windows cover a server or a customer at a moment, and
what failed inside each. No side effects beyond the windows' own rows; imported by the pager
(core.escalation), the alert intake (core.incidents) and the service (core.maintenance).

A window covers ``[starts_at, end)``, where its end is ``ended_at`` when someone ended it early,
else ``ends_at``; one ended at or before its start is cancelled and covers nothing. A window
on a server covers the server and every customer on it; a window on a customer covers that
customer's database and its checks (not its server's). Overlapping windows combine: a subject
is covered until the latest end of the windows that overlap or touch one another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Engine, and_, or_
from sqlmodel import Session, col, select

from core.alerts import Alert
from storage.models_incidents import aware, utc, write_session
from storage.models_maintenance import MaintenanceWindowRow

TargetKind = Literal["server", "customer"]
Status = Literal["scheduled", "active", "ended", "expired", "cancelled"]


def window_ref(window_id: int) -> str:
    return f"mw-{window_id}"


def iso(ts: datetime | None) -> str | None:
    return utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ") if ts is not None else None


def _parse(ts: str | None) -> datetime | None:
    return utc(datetime.fromisoformat(ts.replace("Z", "+00:00"))) if ts else None


@dataclass(frozen=True)
class Window:
    id: int
    target_kind: TargetKind
    target: str
    starts_at: datetime
    ends_at: datetime
    reason: str
    notify: bool
    created_by: str
    created_at: datetime
    ended_at: datetime | None
    ended_by: str | None
    closed_at: datetime | None
    announcement_channel: str | None
    announcement_ts: str | None
    summary_posted_at: datetime | None
    seen: Mapping[str, Any]

    @classmethod
    def from_row(cls, row: MaintenanceWindowRow) -> Window:
        assert row.id is not None
        starts, ends, created = aware(row.starts_at), aware(row.ends_at), aware(row.created_at)
        assert starts is not None and ends is not None and created is not None
        kind: TargetKind = "server" if row.target_kind == "server" else "customer"
        return cls(
            id=row.id,
            target_kind=kind,
            target=row.target,
            starts_at=starts,
            ends_at=ends,
            reason=row.reason,
            notify=bool(row.notify),
            created_by=row.created_by,
            created_at=created,
            ended_at=aware(row.ended_at),
            ended_by=row.ended_by,
            closed_at=aware(row.closed_at),
            announcement_channel=row.announcement_channel,
            announcement_ts=row.announcement_ts,
            summary_posted_at=aware(row.summary_posted_at),
            seen=dict(row.seen or {}),
        )

    @property
    def ref(self) -> str:
        return window_ref(self.id)

    @property
    def cancelled(self) -> bool:
        return self.ended_at is not None and self.ended_at <= self.starts_at

    @property
    def end(self) -> datetime:
        """When it stops covering: its early end, else its planned one."""
        return min(self.ends_at, self.ended_at) if self.ended_at is not None else self.ends_at

    def active(self, now: datetime) -> bool:
        return not self.cancelled and self.starts_at <= now < self.end

    def status(self, now: datetime) -> Status:
        if self.cancelled:
            return "cancelled"
        if now < self.starts_at:
            return "scheduled"
        if now < self.end:
            return "active"
        return "ended" if self.ended_at is not None and self.ended_at < self.ends_at else "expired"

    def covers(self, server: str | None, customer: str | None) -> bool:
        """Whether it is about this subject (whatever the time): a server window covers the
        server and its customers' databases; a customer window that customer's."""
        if self.target_kind == "server":
            return server is not None and self.target == server
        return customer is not None and self.target == customer

    def as_json(self, now: datetime | None = None) -> dict[str, Any]:
        announced = (
            {"channel": self.announcement_channel, "ts": self.announcement_ts}
            if self.announcement_channel and self.announcement_ts
            else None
        )
        out: dict[str, Any] = {
            "id": self.id,
            "ref": self.ref,
            "target_kind": self.target_kind,
            "target": self.target,
            "starts_at": iso(self.starts_at),
            "ends_at": iso(self.ends_at),
            "end": iso(self.end),
            "reason": self.reason,
            "notify": self.notify,
            "created_by": self.created_by,
            "created_at": iso(self.created_at),
            "ended_at": iso(self.ended_at),
            "ended_by": self.ended_by,
            "closed_at": iso(self.closed_at),
            "announcement": announced,
            "summary_posted_at": iso(self.summary_posted_at),
        }
        if now is not None:
            out["status"] = self.status(now)
        return out


@dataclass(frozen=True)
class Cover:
    """The windows covering a subject now, and until when it stays covered (the latest end
    of the windows chained to them). ``window`` is the one whose end that is."""

    windows: tuple[Window, ...]
    until: datetime

    @property
    def window(self) -> Window:
        return max(self.windows, key=lambda w: (w.end, w.id))

    @property
    def ids(self) -> list[int]:
        return [w.id for w in self.windows]

    def as_json(self) -> dict[str, Any]:
        """The report's and status's ``maintenance`` entry: ``{id, ref, until, reason}``."""
        lead = self.window
        return {"id": lead.id, "ref": lead.ref, "until": iso(self.until), "reason": lead.reason}


def load_windows(engine: Engine, now: datetime, *, since: datetime | None = None) -> list[Window]:
    """Windows that cover now or will (not ended early, planned end ahead); with ``since``,
    every window whose planned end is after it (ended, cancelled and all: the caller asks each
    about its own moment)."""
    stmt = select(MaintenanceWindowRow)
    if since is None:
        stmt = stmt.where(col(MaintenanceWindowRow.ends_at) > utc(now))
        stmt = stmt.where(col(MaintenanceWindowRow.ended_at).is_(None))
    else:
        stmt = stmt.where(col(MaintenanceWindowRow.ends_at) > utc(since))
    stmt = stmt.order_by(col(MaintenanceWindowRow.starts_at), col(MaintenanceWindowRow.id))
    with Session(engine) as session:
        return [Window.from_row(r) for r in session.exec(stmt)]


def cover_of(
    windows: Iterable[Window], now: datetime, server: str | None, customer: str | None
) -> Cover | None:
    """The cover of one subject: a server (``customer`` None) or a customer's database on
    ``server``."""
    mine = [w for w in windows if not w.cancelled and w.covers(server, customer)]
    active = [w for w in mine if w.active(now)]
    if not active:
        return None
    until = max(w.end for w in active)
    chained = list(active)
    grew = True
    while grew:  # windows starting before (or as) the cover ends extend it
        grew = False
        for w in mine:
            if w not in chained and w.starts_at <= until < w.end:
                chained.append(w)
                until, grew = w.end, True
    return Cover(tuple(active), until)


def cover_of_incident(
    windows: Sequence[Window], now: datetime, server: str | None, customers: Sequence[str]
) -> Cover | None:
    """An incident is covered when its server is, or when every customer it lists is (each by
    a window of its own or its server's): one customer's window never hides another's outage."""
    if server is not None:
        found = cover_of(windows, now, server, None)
        if found is not None:
            return found
    if not customers:
        return None
    covers = [cover_of(windows, now, server, c) for c in customers]
    if any(c is None for c in covers):
        return None
    held = [c for c in covers if c is not None]
    until = min(c.until for c in held)  # covered while every one of them is
    return Cover(tuple({w.id: w for c in held for w in c.windows}.values()), until)


class Covers:
    """Every window that covers now, indexed for a report: a server's cover, a database's."""

    def __init__(self, windows: Sequence[Window], now: datetime) -> None:
        self.windows = list(windows)
        self.now = utc(now)

    @classmethod
    def load(cls, engine: Engine, now: datetime) -> Covers:
        return cls(load_windows(engine, now), now)

    def __bool__(self) -> bool:
        return any(w.active(self.now) for w in self.windows)

    def server(self, name: str) -> Cover | None:
        return cover_of(self.windows, self.now, name, None)

    def database(self, customer: str, server: str | None) -> Cover | None:
        return cover_of(self.windows, self.now, server, customer)

    def alert(self, alert: Alert, server: str | None) -> Cover | None:
        return cover_of(self.windows, self.now, server, alert.customer)


# --- what failed inside a window ------------------------------------------------------------


def alert_json(alert: Alert) -> dict[str, Any]:
    """An alert as JSON that ``alert_from_json`` turns back into the same alert."""
    return {
        **alert.as_json(),
        "starts_at": iso(alert.starts_at),
        "ends_at": iso(alert.ends_at),
        "annotations": dict(alert.annotations),
    }


def alert_from_json(data: Mapping[str, Any]) -> Alert:
    return Alert(
        status=data["status"],
        kind=data["kind"],
        dedupe_key=data["dedupe_key"],
        severity=data["severity"],
        title=data["title"],
        source=data["source"],
        alertname=data.get("alertname") or "",
        server=data.get("server"),
        customer=data.get("customer"),
        fingerprint=data.get("fingerprint"),
        starts_at=_parse(data.get("starts_at")),
        ends_at=_parse(data.get("ends_at")),
        labels=dict(data.get("labels") or {}),
        annotations=dict(data.get("annotations") or {}),
        detail=data.get("detail") or "",
    )


@dataclass(frozen=True)
class Seen:
    """One alert key's story inside a window: when it failed and recovered (``spans``, each
    ``(from, to)``, ``to`` None while it still fails) and the alert, to raise again when it
    still fires at the end (an Alertmanager alert is not sent again for hours)."""

    key: str
    check: str
    kind: str
    title: str
    server: str | None
    customer: str | None
    source: str
    spans: tuple[tuple[datetime, datetime | None], ...]
    alert: Mapping[str, Any]

    @classmethod
    def from_json(cls, key: str, data: Mapping[str, Any]) -> Seen:
        spans = []
        for start, stop in data.get("spans") or []:
            began = _parse(start)
            assert began is not None
            spans.append((began, _parse(stop)))
        return cls(
            key,
            str(data.get("check") or ""),
            str(data.get("kind") or ""),
            str(data.get("title") or ""),
            data.get("server"),
            data.get("customer"),
            str(data.get("source") or ""),
            tuple(spans),
            dict(data.get("alert") or {}),
        )

    @property
    def firing(self) -> bool:
        return bool(self.spans) and self.spans[-1][1] is None

    def down_s(self, until: datetime) -> int:
        return int(sum(((stop or until) - start).total_seconds() for start, stop in self.spans))


def seen_of(window: Window) -> list[Seen]:
    return [Seen.from_json(k, v) for k, v in sorted(window.seen.items())]


def _locked(session: Session, ids: Sequence[int]) -> list[MaintenanceWindowRow]:
    stmt = (
        select(MaintenanceWindowRow)
        .where(col(MaintenanceWindowRow.id).in_(sorted(ids)))
        .order_by(col(MaintenanceWindowRow.id))
        .with_for_update()
    )
    return list(session.exec(stmt))


def note_firing(engine: Engine, ids: Sequence[int], alert: Alert, now: datetime) -> list[int]:
    """Record a firing alert in the windows ``ids``; returns those for which it is news (its
    first firing there, or a new one after it recovered)."""
    news: list[int] = []
    stamp = iso(now)
    with write_session(engine) as session:
        for row in _locked(session, ids):
            seen = dict(row.seen or {})
            entry = dict(seen.get(alert.dedupe_key) or {})
            spans = [list(s) for s in entry.get("spans") or []]
            if spans and spans[-1][1] is None:
                continue  # still failing: nothing new
            spans.append([stamp, None])
            entry.update(
                check=alert.alertname or alert.kind,
                kind=alert.kind,
                title=alert.title,
                server=alert.server,
                customer=alert.customer,
                source=alert.source,
                spans=spans,
                alert=alert_json(alert),
            )
            seen[alert.dedupe_key] = entry
            row.seen = seen
            session.add(row)
            assert row.id is not None
            news.append(row.id)
    return news


def note_recovered(engine: Engine, ids: Sequence[int], key: str, now: datetime) -> list[int]:
    """Record that ``key`` recovered, in the windows that saw it fail; returns those."""
    done: list[int] = []
    with write_session(engine) as session:
        for row in _locked(session, ids):
            seen = dict(row.seen or {})
            entry = dict(seen.get(key) or {})
            spans = [list(s) for s in entry.get("spans") or []]
            if not spans or spans[-1][1] is not None:
                continue
            spans[-1][1] = iso(now)
            entry["spans"] = spans
            seen[key] = entry
            row.seen = seen
            session.add(row)
            assert row.id is not None
            done.append(row.id)
    return done


def windows_overlapping(
    engine: Engine, start: datetime, end: datetime, server: str | None, customers: Sequence[str]
) -> list[Window]:
    """Windows (not cancelled) on ``server`` or any of ``customers`` that cover some of
    ``[start, end)``: for SLA downtime, which does not count inside them."""
    conds = []
    if server is not None:
        conds.append(
            and_(
                col(MaintenanceWindowRow.target_kind) == "server",
                col(MaintenanceWindowRow.target) == server,
            )
        )
    if customers:
        conds.append(
            and_(
                col(MaintenanceWindowRow.target_kind) == "customer",
                col(MaintenanceWindowRow.target).in_(list(customers)),
            )
        )
    if not conds:
        return []
    stmt = (
        select(MaintenanceWindowRow)
        .where(or_(*conds))
        .where(col(MaintenanceWindowRow.starts_at) < utc(end))
        .where(col(MaintenanceWindowRow.ends_at) > utc(start))
        .order_by(col(MaintenanceWindowRow.starts_at))
    )
    with Session(engine) as session:
        found = [Window.from_row(r) for r in session.exec(stmt)]
    return [w for w in found if not w.cancelled and w.end > utc(start)]
