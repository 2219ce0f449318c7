"""Alerts in: Alertmanager's webhook JSON (version 4) and the health sweep, as one ``Alert`` type.

Every alert carries a dedupe key naming its problem; core.incidents keeps one open incident per
key. The keys are shared by both sources, so Alertmanager and our own sweep seeing the same
outage land on the same incident:

=====================  =====================================  ============================
problem                key                                    severity
=====================  =====================================  ============================
PostgreSQL down        ``server-down:<server>``               P0 (SOP-201)
a customer DB down     ``db-down:<customer>``                 P0 (SOP-201)
a health check crit    ``check:<check>:<server or customer>`` ``HEALTH_SEVERITY``, else P2
a fleet check crit     ``check:<check>:fleet``                ``HEALTH_SEVERITY``, else P2
other Alertmanager     ``am:<alertname>:<server>:<customer>`` from its ``severity`` label
=====================  =====================================  ============================

Alertmanager labels: ``server`` and ``customer`` name our server and customer (a value that is
not a valid name is ignored, kept only in ``labels``); ``alertname``; ``severity``. An alert is
a server or database outage when its ``dbops_kind`` label says ``server_down`` / ``db_down``, or
its alertname is one of ``SERVER_DOWN_ALERTS`` / ``DB_DOWN_ALERTS``.

Severity label -> ours: ``P0``-``P3`` are taken as they are; ``critical``/``page``/``emergency``
-> P1 (P0 for an outage); ``high``/``error`` -> P1; ``warning``/``warn``/``medium`` -> P2;
``info``/``low``/``none`` -> P3; no label -> P2 (P0 for an outage). An outage is P0 whatever
its label says, unless the label is an explicit P level: SOP-201 makes a database down a P0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from core.names import NAME_RE, SERVER_RE

Severity = Literal["P0", "P1", "P2", "P3"]
SEVERITIES: tuple[Severity, ...] = ("P0", "P1", "P2", "P3")
Kind = Literal["server_down", "db_down", "check", "other"]

SERVER_DOWN_ALERTS = frozenset(
    {"postgresdown", "postgresqldown", "pgdown", "instancedown", "hostdown", "serverdown"}
)
DB_DOWN_ALERTS = frozenset({"databasedown", "customerdatabasedown", "dbdown"})

_LABEL_SEVERITY: dict[str, Severity] = {
    "critical": "P1",
    "page": "P1",
    "emergency": "P1",
    "high": "P1",
    "error": "P1",
    "warning": "P2",
    "warn": "P2",
    "medium": "P2",
    "info": "P3",
    "low": "P3",
    "none": "P3",
}

# A health check going crit: how urgent that is. Unlisted checks are P2.
HEALTH_SEVERITY: dict[str, Severity] = {
    "disk_space": "P1",
    "pgbouncer": "P1",  # down, it cuts every customer on the server off
    "txn_wraparound": "P1",
    "backends": "P1",
    "locks": "P1",
    "prepared_txns": "P1",
    "replication_slots": "P1",  # a lost slot breaks its replica; a growing one fills the disk
    "version": "P3",  # past its end of life: an upgrade to plan, not a page
    "backup_age": "P2",
    # WAL not archived: every minute of it is work a lost server would take with it.
    "archiving": "P1",
    # The nightly run has not reported success by its deadline (the dead-man's switch).
    "backup_run": "P1",
    "logfile": "P2",
    "last_vacuum": "P3",  # worth a look in working hours, not a page
}

# Alertmanager's body is at most this big; more is refused before it is parsed.
MAX_BODY_BYTES = 1 << 20


class MalformedAlert(ValueError):
    """The webhook body is not Alertmanager's JSON; the message says what is wrong."""


@dataclass(frozen=True)
class Alert:
    status: Literal["firing", "resolved"]
    kind: Kind
    dedupe_key: str
    severity: Severity
    title: str
    source: Literal["alertmanager", "health", "manual"]
    alertname: str = ""
    server: str | None = None
    customer: str | None = None
    fingerprint: str | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    detail: str = ""

    @property
    def natural_key(self) -> str | None:
        """What makes one delivery of this alert the same as another (for idempotent events):
        Alertmanager's fingerprint and the start of this firing, plus the status."""
        if self.fingerprint is None or self.starts_at is None:
            return None
        return f"{self.fingerprint}:{self.starts_at.strftime('%Y%m%dT%H%M%S.%fZ')}:{self.status}"

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "kind": self.kind,
            "dedupe_key": self.dedupe_key,
            "severity": self.severity,
            "title": self.title,
            "source": self.source,
            "alertname": self.alertname,
            "server": self.server,
            "customer": self.customer,
            "fingerprint": self.fingerprint,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "labels": dict(self.labels),
            "detail": self.detail,
        }


def dedupe_key(
    kind: Kind, *, server: str | None, customer: str | None, check: str = "", alertname: str = ""
) -> str:
    if kind == "server_down":
        return f"server-down:{server}"
    if kind == "db_down":
        return f"db-down:{customer}"
    if kind == "check":
        return f"check:{check}:{customer or server}"
    return f"am:{alertname}:{server or '-'}:{customer or '-'}"[:200]


def severity_from_label(value: str | None, *, outage: bool) -> Severity:
    """Our severity from an Alertmanager ``severity`` label (see the module docstring)."""
    raw = (value or "").strip()
    if raw.upper() in SEVERITIES:
        return raw.upper()  # type: ignore[return-value]  # checked just above
    if outage:
        return "P0"
    return _LABEL_SEVERITY.get(raw.lower(), "P2")


# --- Alertmanager ---------------------------------------------------------------------------

_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def _time(value: Any, where: str) -> datetime | None:
    """Alertmanager's RFC 3339 times (nanoseconds allowed); its zero time means unset."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise MalformedAlert(f"{where} is not a time string")
    match = _TS.match(value.strip())
    if not match:
        raise MalformedAlert(f"{where} is not an RFC 3339 time: {value[:40]!r}")
    whole, frac, zone = match.groups()
    micro = (frac or ".0")[1:7].ljust(6, "0")
    when = datetime.fromisoformat(f"{whole}.{micro}{'+00:00' if zone == 'Z' else zone}")
    if when.year <= 1:
        return None
    return when.astimezone(UTC)


def _strings(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedAlert(f"{where} is not an object")
    return {str(k): str(v) for k, v in value.items()}


def _server(value: str | None) -> str | None:
    return value if value and SERVER_RE.fullmatch(value) else None


def _customer(value: str | None) -> str | None:
    return value if value and NAME_RE.fullmatch(value) else None


def _alert_kind(labels: Mapping[str, str], server: str | None, customer: str | None) -> Kind:
    declared = labels.get("dbops_kind", "").strip().lower()
    name = re.sub(r"[^a-z]", "", labels.get("alertname", "").lower())
    if (declared == "db_down" or (not declared and name in DB_DOWN_ALERTS)) and customer:
        return "db_down"
    if (declared == "server_down" or (not declared and name in SERVER_DOWN_ALERTS)) and server:
        return "server_down"
    return "other"


def alert_from_alertmanager(item: Any, where: str = "alert") -> Alert:
    if not isinstance(item, dict):
        raise MalformedAlert(f"{where} is not an object")
    status = item.get("status")
    if status not in ("firing", "resolved"):
        raise MalformedAlert(f"{where}.status must be firing or resolved, not {status!r}")
    labels = _strings(item.get("labels"), f"{where}.labels")
    annotations = _strings(item.get("annotations"), f"{where}.annotations")
    alertname = labels.get("alertname", "")
    if not alertname:
        raise MalformedAlert(f"{where}.labels has no alertname")
    server = _server(labels.get("server"))
    customer = _customer(labels.get("customer"))
    kind = _alert_kind(labels, server, customer)
    severity = severity_from_label(
        labels.get("severity"), outage=kind in ("server_down", "db_down")
    )
    summary = annotations.get("summary") or annotations.get("description") or ""
    where_text = customer or server or labels.get("instance", "")
    title = {
        "server_down": f"PostgreSQL down on {server}",
        "db_down": f"{customer}'s database down",
    }.get(kind) or (f"{alertname} on {where_text}" if where_text else alertname)
    fingerprint = item.get("fingerprint")
    return Alert(
        status=status,
        kind=kind,
        dedupe_key=dedupe_key(kind, server=server, customer=customer, alertname=alertname),
        severity=severity,
        title=title[:200],
        source="alertmanager",
        alertname=alertname,
        server=server,
        customer=customer,
        fingerprint=str(fingerprint)[:64] if fingerprint else None,
        starts_at=_time(item.get("startsAt"), f"{where}.startsAt"),
        ends_at=_time(item.get("endsAt"), f"{where}.endsAt"),
        labels=labels,
        annotations=annotations,
        detail=summary[:500],
    )


def parse_alertmanager(payload: Any) -> list[Alert]:
    """The alerts of one Alertmanager webhook delivery (JSON already decoded).

    Raises MalformedAlert naming the first thing that is not as Alertmanager sends it.
    """
    if not isinstance(payload, dict):
        raise MalformedAlert("the body is not a JSON object")
    version = payload.get("version")
    if version is not None and str(version) != "4":
        raise MalformedAlert(f"webhook version {version!r} is not supported (expected 4)")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise MalformedAlert("the body has no alerts list")
    return [alert_from_alertmanager(a, f"alerts[{i}]") for i, a in enumerate(alerts)]


# --- the health sweep -----------------------------------------------------------------------


def _crit(checks: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(c["name"]): c for c in checks}


def alerts_from_report(report: Mapping[str, Any]) -> list[Alert]:
    """Alerts from a health sweep (DESIGN.md's Report JSON): one firing alert per problem that
    is crit, and one resolved alert per problem the sweep saw healthy (incidents ignore a
    resolved alert that matches nothing open). Server outages come first, so the customers'
    alerts that follow join the server's incident."""
    out: list[Alert] = []
    down_servers: set[str] = set()
    for c in report.get("checks", []):  # the fleet's own (backup_run): one incident each
        if c.get("verdict") in ("crit", "ok"):
            out.append(_fleet_alert(str(c["name"]), c))
    for s in report.get("servers", []):
        name = str(s["name"])
        checks = _crit(s.get("checks", []))
        conn = checks.get("connection", {})
        is_down = s.get("postgres") == "down"
        if is_down:
            down_servers.add(name)
        out.append(
            Alert(
                status="firing" if is_down else "resolved",
                kind="server_down",
                dedupe_key=dedupe_key("server_down", server=name, customer=None),
                severity="P0",
                title=f"PostgreSQL down on {name}",
                source="health",
                alertname="connection",
                server=name,
                detail=str(conn.get("detail", ""))[:500],
            )
        )
        for check, c in checks.items():
            if check == "connection":
                continue
            verdict = c.get("verdict")
            if verdict not in ("crit", "ok"):
                continue  # warn and unknown neither raise nor clear an alert
            out.append(_check_alert(check, c, server=name, customer=None))
    for d in report.get("databases", []):
        customer, server = str(d["customer"]), str(d["server"])
        checks = _crit(d.get("checks", []))
        conn = checks.get("connection", {})
        online = bool(d.get("online"))
        out.append(
            Alert(
                status="resolved" if online else "firing",
                kind="db_down",
                dedupe_key=dedupe_key("db_down", server=server, customer=customer),
                severity="P0",
                title=f"{customer}'s database down",
                source="health",
                alertname="connection",
                server=server,
                customer=customer,
                detail=str(conn.get("detail", ""))[:500],
            )
        )
        if server in down_servers:
            continue  # its other checks are unknown while the cluster is down
        for check, c in checks.items():
            if check == "connection" or c.get("verdict") not in ("crit", "ok"):
                continue
            out.append(_check_alert(check, c, server=server, customer=customer))
    return out


# Checks whose detail quotes someone else's words (log lines, a customer's query text): an
# incident title is pushed to pages, cards and emails, so it never carries them; the detail
# stays in the incident, shown escaped.
FOREIGN_DETAIL = frozenset({"logfile", "query_time", "txn_time", "txn_idle", "locks"})


def _fleet_alert(check: str, c: Mapping[str, Any]) -> Alert:
    """A fleet-wide check's alert: about no server or customer; its key ``check:<check>:fleet``."""
    detail = str(c.get("detail", ""))
    return Alert(
        status="firing" if c.get("verdict") == "crit" else "resolved",
        kind="check",
        dedupe_key=f"check:{check}:fleet",
        severity=HEALTH_SEVERITY.get(check, "P2"),
        title=f"{check} critical: {detail}"[:200],
        source="health",
        alertname=check,
        detail=detail[:500],
    )


def _check_alert(check: str, c: Mapping[str, Any], *, server: str, customer: str | None) -> Alert:
    where = customer or server
    detail = str(c.get("detail", ""))
    title = f"{check} critical on {where}"
    if detail and check not in FOREIGN_DETAIL:
        title += f": {detail}"
    return Alert(
        status="firing" if c.get("verdict") == "crit" else "resolved",
        kind="check",
        dedupe_key=dedupe_key("check", server=server, customer=customer, check=check),
        severity=HEALTH_SEVERITY.get(check, "P2"),
        title=title[:200],
        source="health",
        alertname=check,
        server=server,
        customer=customer,
        detail=detail[:500],
    )
