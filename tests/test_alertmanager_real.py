"""A real Alertmanager (Debian's prometheus-alertmanager) delivering to our webhook.

The test starts our routes under uvicorn and Alertmanager on loopback, its webhook receiver
pointed at us with the bearer token; alerts are fired through Alertmanager's own API.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from sqlalchemy import Engine
from starlette.applications import Starlette

from bot.web.alertmanager import AlertDesk, alertmanager_routes
from core.alerts import Alert
from core.customers import Customer, upsert_customers
from core.escalation import Escalator
from core.fleet import parse_fleet
from core.incidents import AlertOutcome, Incidents
from core.notify import RecordingNotifier
from core.settings import Settings
from storage.events import EventLog
from tests.pgserver import free_port, wait_until

ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
TOKEN = "am-test-token-4f1c"
ALICE, BOB = "U0ALICE", "U0BOB"


class CountingIncidents(Incidents):
    """The incident desk, counting webhook deliveries so a test can wait for one."""

    deliveries = 0

    def ingest(self, alerts: Any, *, now: datetime | None = None) -> list[AlertOutcome]:
        out = super().ingest(alerts, now=now)
        type(self).deliveries += 1
        return out


@dataclass
class App:
    url: str
    desk: AlertDesk
    notifier: RecordingNotifier


@pytest.fixture
def app(sqlite_engine: Engine) -> Iterator[App]:
    CountingIncidents.deliveries = 0
    events = EventLog(sqlite_engine)
    fleet = parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}],
            "oncall": {"primary": ALICE, "secondary": BOB, "escalation_channel": "#esc"},
        }
    )
    upsert_customers(sqlite_engine, [Customer("acme", "vps1", "acme", "acme")])
    notifier = RecordingNotifier()
    pager = Escalator(sqlite_engine, events, fleet, notifier)
    desk = AlertDesk(
        Settings(alerts_token=SecretStr(TOKEN), _env_file=None),  # type: ignore[call-arg]
        events,
        CountingIncidents(sqlite_engine, events, fleet, escalator=pager),
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=alertmanager_routes(lambda: desk)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout=10)
    try:
        yield App(f"http://127.0.0.1:{port}/alerts/alertmanager", desk, notifier)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def alertmanager(app: App, tmp_path: Path) -> Iterator[str]:
    if not Path(ALERTMANAGER).exists():
        pytest.fail("prometheus-alertmanager is missing: apt-get install prometheus-alertmanager")
    port = free_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        f"""
route:
  receiver: dbops
  group_by: [alertname, customer]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1s
receivers:
  - name: dbops
    webhook_configs:
      - url: {app.url}
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: {TOKEN}
"""
    )
    proc = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(ready, timeout=15), "alertmanager did not start"
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def alertmanager_now(base: str) -> datetime:
    """Alertmanager's own clock, from its HTTP Date header. It decides whether an alert has
    ended by that clock, which need not be ours (another machine; or `make test-later`, where
    libfaketime moves every clock but a Go program's)."""
    return parsedate_to_datetime(httpx.get(f"{base}/-/ready", timeout=5).headers["Date"])


def fire(base: str, *, ends: datetime | None = None) -> None:
    alert: dict[str, Any] = {
        "labels": {"alertname": "DatabaseDown", "customer": "acme", "severity": "critical"},
        "annotations": {"summary": "acme's database does not answer"},
        "generatorURL": "http://prometheus.example/graph",
    }
    if ends is not None:
        alert["endsAt"] = ends.isoformat()
    httpx.post(f"{base}/api/v2/alerts", json=[alert], timeout=5).raise_for_status()


def test_an_alert_through_alertmanager_opens_one_incident_and_pages(
    app: App, alertmanager: str
) -> None:
    incidents = app.desk.incidents
    fire(alertmanager)
    assert wait_until(lambda: app.notifier.dms(ALICE), timeout=10), "the primary was not paged"
    (inc,) = incidents.list_incidents()
    assert (inc.kind, inc.severity, inc.customers, inc.server) == (
        "db_down",
        "P0",
        ("acme",),
        "vps1",
    )

    # Fired again, and re-sent by Alertmanager every second: still one incident, one page.
    fire(alertmanager)
    seen = CountingIncidents.deliveries
    assert wait_until(lambda: CountingIncidents.deliveries >= seen + 2, timeout=10)
    assert [i.id for i in incidents.list_incidents(active=False)] == [inc.id]
    assert len(app.notifier.dms(ALICE)) == 1
    timeline = [e.kind for e in incidents.timeline(inc.id)]
    assert timeline[:2] == ["incident.opened", "alert.firing"] and "alert.repeat" in timeline

    # Resolved in Alertmanager: recovered in the timeline, still open for a human to resolve.
    fire(alertmanager, ends=alertmanager_now(alertmanager))
    assert wait_until(lambda: incidents.get(inc.id).recovered_at is not None, timeout=10)
    assert incidents.get(inc.id).status == "open"


def test_a_wrong_or_missing_token_is_401(app: App) -> None:
    body = {"version": "4", "alerts": []}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.post(app.url, json=body, headers=headers, timeout=5)
        assert response.status_code == 401, headers
    ok = httpx.post(app.url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert ok.status_code == 200 and ok.json()["alerts"] == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"version": "4", "password": "hunter2", "alerts": [', "invalid JSON"),
        (
            b'{"version": "4", "alerts": [{"status": "firing", "labels": {}, '
            b'"annotations": {"dsn": "postgresql://u:hunter2@db/x"}}]}',
            "no alertname",
        ),
        (b"\xff\xfe not json password=hunter2", "invalid JSON|not UTF-8"),
    ],
)
def test_malformed_json_is_400_and_kept_as_an_event(app: App, body: bytes, reason: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    response = httpx.post(app.url, content=body, headers=auth, timeout=5)
    assert response.status_code == 400
    assert any(r in response.json()["error"] for r in reason.split("|"))
    (event,) = app.desk.events.query(kind="alert.malformed")
    assert any(r in event.payload["reason"] for r in reason.split("|"))
    assert event.payload["body"][:10] == body[:10].decode("utf-8", "replace")
    assert "hunter2" not in event.payload["body"], "secrets in a kept body are scrubbed"
    assert app.desk.incidents.list_incidents() == []


def test_a_huge_body_is_refused(app: App) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = httpx.post(app.url, content=b"[" * (2 << 20), headers=auth, timeout=10)
    assert response.status_code == 413


def test_alerts_are_processed_after_the_answer(app: App) -> None:
    """The webhook answers before the incident work (a page may take Slack seconds)."""
    gate = threading.Event()
    real = app.desk.incidents.raise_alert

    def slow(alert: Alert, *, now: datetime | None = None) -> AlertOutcome:
        gate.wait(10)
        return real(alert, now=now)

    app.desk.incidents.raise_alert = slow  # type: ignore[method-assign]
    body = {
        "version": "4",
        "alerts": [{"status": "firing", "labels": {"alertname": "DatabaseDown", "customer": "acme"},
                    "startsAt": "2026-03-02T14:00:00Z", "fingerprint": "f1"}],
    }  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(app.url, json=body, headers=auth, timeout=5).status_code == 200
    assert app.desk.incidents.list_incidents() == []
    gate.set()
    assert wait_until(lambda: app.desk.incidents.list_incidents() != [], timeout=10)
