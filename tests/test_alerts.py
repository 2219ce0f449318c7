"""Alerts in: Alertmanager's webhook JSON and the health sweep, mapped to our keys and levels."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from core.alerts import (
    MalformedAlert,
    alerts_from_report,
    parse_alertmanager,
    severity_from_label,
)

# What Alertmanager 0.25 posts (trimmed of group fields we do not read).
WEBHOOK: dict[str, Any] = {
    "receiver": "dbops",
    "status": "firing",
    "version": "4",
    "groupKey": '{}:{alertname="DatabaseDown"}',
    "truncatedAlerts": 0,
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "DatabaseDown",
                "customer": "acme",
                "server": "vps1",
                "severity": "critical",
            },
            "annotations": {"summary": "acme's database does not answer"},
            "startsAt": "2026-03-02T14:00:00.123456789Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus/graph",
            "fingerprint": "8d3f6a2b91c0e4a7",
        }
    ],
}


def with_alert(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(WEBHOOK)
    alert = body["alerts"][0]
    for key, value in changes.items():
        if key in ("labels", "annotations"):
            alert[key] = {**alert[key], **value}
        else:
            alert[key] = value
    return body


def test_a_database_down_alert() -> None:
    (alert,) = parse_alertmanager(WEBHOOK)
    assert (alert.status, alert.kind, alert.severity) == ("firing", "db_down", "P0")
    assert (alert.customer, alert.server, alert.dedupe_key) == ("acme", "vps1", "db-down:acme")
    assert alert.title == "acme's database down"
    assert alert.starts_at == datetime(2026, 3, 2, 14, 0, 0, 123456, tzinfo=UTC)
    assert alert.ends_at is None, "Alertmanager's zero time is no time"
    assert alert.natural_key == "8d3f6a2b91c0e4a7:20260302T140000.123456Z:firing"
    assert alert.detail == "acme's database does not answer"


def test_a_server_down_alert_shares_the_health_sweeps_key() -> None:
    (alert,) = parse_alertmanager(
        with_alert(labels={"alertname": "PostgresDown", "customer": "", "severity": "page"})
    )
    assert (alert.kind, alert.dedupe_key, alert.severity) == (
        "server_down",
        "server-down:vps1",
        "P0",
    )
    declared = parse_alertmanager(
        with_alert(labels={"alertname": "pg_up == 0", "customer": "", "dbops_kind": "server_down"})
    )
    assert declared[0].dedupe_key == "server-down:vps1"


def test_other_alerts_key_on_name_and_place() -> None:
    (alert,) = parse_alertmanager(
        with_alert(labels={"alertname": "ReplicationLag", "severity": "warning"})
    )
    assert (alert.kind, alert.severity) == ("other", "P2")
    assert alert.dedupe_key == "am:ReplicationLag:vps1:acme"
    assert alert.title == "ReplicationLag on acme"


@pytest.mark.parametrize(
    ("label", "outage", "expected"),
    [
        ("critical", False, "P1"),
        ("critical", True, "P0"),
        ("page", False, "P1"),
        ("warning", False, "P2"),
        ("info", False, "P3"),
        ("P3", True, "P3"),
        ("p2", False, "P2"),
        ("", False, "P2"),
        (None, True, "P0"),
        ("whatever", False, "P2"),
    ],
)
def test_severity_labels(label: str | None, outage: bool, expected: str) -> None:
    assert severity_from_label(label, outage=outage) == expected


def test_a_label_that_is_not_a_name_is_ignored_not_trusted() -> None:
    (alert,) = parse_alertmanager(
        with_alert(labels={"customer": "acme'; DROP TABLE x", "server": "vps1 && reboot"})
    )
    assert alert.customer is None and alert.server is None
    assert alert.kind == "other", "a database down for no valid customer is no customer's outage"
    assert alert.labels["customer"] == "acme'; DROP TABLE x"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "not a JSON object"),
        ({"version": "3", "alerts": []}, "version '3'"),
        ({"version": "4"}, "no alerts list"),
        ({"version": "4", "alerts": ["x"]}, r"alerts\[0\] is not an object"),
        (with_alert(status="maybe"), "status must be firing or resolved"),
        (with_alert(labels={"alertname": ""}), "no alertname"),
        (with_alert(startsAt="yesterday"), "startsAt is not an RFC 3339 time"),
        (with_alert(), None),
    ],
)
def test_malformed_bodies_say_what_is_wrong(body: Any, reason: str | None) -> None:
    if reason is None:
        body["alerts"][0]["labels"] = "alertname=x"
        reason = "labels is not an object"
    with pytest.raises(MalformedAlert, match=reason):
        parse_alertmanager(body)


def _report(postgres: str = "up", online: bool = True, disk: str = "ok") -> dict[str, Any]:
    return {
        "servers": [
            {
                "name": "vps1",
                "reachable": True,
                "postgres": postgres,
                "checks": [
                    {"name": "connection", "verdict": "ok" if postgres == "up" else "crit",
                     "detail": "" if postgres == "up" else "connection refused"},
                    {"name": "disk_space", "verdict": disk, "value": 97, "detail": "/ 97% used"},
                    {"name": "logfile", "verdict": "warn", "value": 3},
                ],
            }
        ],
        "databases": [
            {
                "customer": "acme",
                "server": "vps1",
                "online": online,
                "checks": [
                    {"name": "connection", "verdict": "ok" if online else "crit"},
                    {"name": "backup_age", "verdict": "unknown" if postgres == "down" else "ok"},
                ],
            }
        ],
    }  # fmt: skip


def test_a_sweep_raises_and_clears_alerts() -> None:
    healthy = {(a.dedupe_key, a.status) for a in alerts_from_report(_report())}
    assert healthy == {
        ("server-down:vps1", "resolved"),
        ("check:disk_space:vps1", "resolved"),
        ("db-down:acme", "resolved"),
        ("check:backup_age:acme", "resolved"),
    }, "warn and unknown neither raise nor clear"
    down = alerts_from_report(_report(postgres="down", online=False, disk="crit"))
    firing = [(a.dedupe_key, a.severity) for a in down if a.status == "firing"]
    assert firing == [
        ("server-down:vps1", "P0"),
        ("check:disk_space:vps1", "P1"),
        ("db-down:acme", "P0"),
    ], "the server first, so its customers join its incident"
    assert down[0].detail == "connection refused"
    assert down[1].title == "disk_space critical on vps1: / 97% used"
