"""Incidents: one per problem, a server down is one incident, ack/resolve, timeline, SLA, card.

acme, globex and initech live on vps1; hooli on vps2. alice is the operator on call, bob the
secondary, carol the admin.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine
from sqlmodel import SQLModel

import storage.models_incidents  # noqa: F401  (the tables compared with the migration)
from core.alerts import Alert, alerts_from_report, parse_alertmanager
from core.customers import Customer, customer_from_mapping, upsert_customers
from core.errors import DbopsError, NotFound
from core.escalation import Escalator
from core.fleet import Fleet, load_fleet, parse_fleet
from core.incidents import Incidents, credit_cents, parse_incident_id
from core.notify import MessageRef, RecordingNotifier
from core.remote import RunnerPool
from core.report import customer_status
from core.restarts import restart_on_incident, restart_precondition
from storage.events import EventLog

ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"
T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
MY_TABLES = {"incidents", "escalation_timers", "oncall_overrides", "oncall_state"}


def make_fleet() -> Fleet:
    plan = {"ram_mb": 1024, "storage_gb": 10, "connection_limit": 20}
    return parse_fleet(
        {
            "servers": [
                {"name": "vps1", "dsn": "host=127.0.0.1"},
                {"name": "vps2", "dsn": "host=127.0.0.2"},
            ],
            "plans": {
                "small": {**plan, "price_usd_month": 15},
                "big": {**plan, "price_usd_month": 720},
            },
            "oncall": {"primary": ALICE, "secondary": BOB, "escalation_channel": "#esc"},
        }
    )  # fmt: skip


@pytest.fixture
def desk(engine: Engine) -> Incidents:
    upsert_customers(
        engine,
        [
            Customer("acme", "vps1", "acme", "acme", "big", "ops@acme.example"),
            Customer("globex", "vps1", "globex", "globex", "small"),
            Customer("initech", "vps1", "initech", "initech", "small"),
            Customer("hooli", "vps2", "hooli", "hooli", "small"),
        ],
    )
    return Incidents(engine, EventLog(engine), make_fleet())


def db_down(customer: str, status: str = "firing", source: str = "health") -> Alert:
    return Alert(
        status=status,  # type: ignore[arg-type]
        kind="db_down",
        dedupe_key=f"db-down:{customer}",
        severity="P0",
        title=f"{customer}'s database down",
        source=source,  # type: ignore[arg-type]
        customer=customer,
    )


def server_down(server: str, status: str = "firing") -> Alert:
    return Alert(
        status=status,  # type: ignore[arg-type]
        kind="server_down",
        dedupe_key=f"server-down:{server}",
        severity="P0",
        title=f"PostgreSQL down on {server}",
        source="health",
        server=server,
    )


def am_payload(status: str = "firing", starts: str = "2026-03-02T14:00:00.123456789Z") -> Any:
    return {
        "version": "4",
        "status": status,
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "DatabaseDown", "customer": "acme", "severity": "critical"},
                "annotations": {"summary": "acme does not answer"},
                "startsAt": starts,
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "c0ffee",
            }
        ],
    }


def kinds(desk: Incidents, incident: int) -> list[str]:
    return [e.kind for e in desk.timeline(incident)]


def test_the_migration_matches_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    mine = [d for d in diffs if any(t in repr(d) for t in MY_TABLES)]
    assert mine == []


def test_a_server_down_is_one_incident_listing_its_customers(desk: Incidents) -> None:
    opened = desk.raise_alert(server_down("vps1"), now=T0)
    assert opened.action == "opened" and opened.incident is not None
    assert opened.incident.customers == ("acme", "globex", "initech")
    # Every customer's database then fails its own check: the same incident, not three more.
    later = T0 + timedelta(minutes=1)
    outcomes = desk.ingest([db_down(c) for c in ("acme", "globex", "initech")], now=later)
    assert {o.incident.id for o in outcomes if o.incident} == {opened.incident.id}
    assert len(desk.list_incidents()) == 1
    # A customer provisioned onto vps1 after the outage began joins it, in the timeline too.
    upsert_customers(desk.engine, [Customer("stark", "vps1", "stark", "stark", "small")])
    joined = desk.raise_alert(db_down("stark"), now=later)
    assert joined.action == "joined"
    assert joined.incident is not None and "stark" in joined.incident.customers
    assert "incident.customer_added" in kinds(desk, opened.incident.id)


def test_customers_already_down_merge_into_their_servers_incident(desk: Incidents) -> None:
    acme = desk.raise_alert(db_down("acme"), now=T0).incident
    hooli = desk.raise_alert(db_down("hooli"), now=T0).incident
    server = desk.raise_alert(server_down("vps1"), now=T0 + timedelta(minutes=2)).incident
    assert acme and hooli and server
    assert desk.get(acme.id).parent_id == server.id
    assert desk.get(hooli.id).parent_id is None, "another server's customer stays apart"
    assert "incident.merged" in kinds(desk, acme.id)
    resolved = desk.resolve(server.id, "OOM killer", actor=ALICE, now=T0 + timedelta(minutes=30))
    assert resolved.children == [acme.id]
    assert desk.get(acme.id).status == "resolved"
    assert desk.get(hooli.id).status == "open"


def test_a_repeat_firing_adds_to_the_incident(desk: Incidents) -> None:
    (alert,) = parse_alertmanager(am_payload())
    first = desk.raise_alert(alert, now=T0)
    again = desk.raise_alert(alert, now=T0 + timedelta(hours=4))
    assert (first.action, again.action) == ("opened", "repeat")
    assert first.incident and again.incident and first.incident.id == again.incident.id
    assert again.incident.alert_count == 2
    assert kinds(desk, first.incident.id).count("alert.repeat") == 1


def test_a_resolved_alert_marks_recovered_and_leaves_resolving_to_a_human(
    desk: Incidents,
) -> None:
    (firing,) = parse_alertmanager(am_payload())
    (resolved,) = parse_alertmanager(am_payload("resolved"))
    inc = desk.raise_alert(firing, now=T0).incident
    assert inc is not None
    assert desk.raise_alert(resolved, now=T0 + timedelta(minutes=20)).action == "recovered"
    assert desk.raise_alert(resolved, now=T0 + timedelta(minutes=21)).action == "ignored"
    now = desk.get(inc.id)
    assert now.status == "open" and now.recovered_at == T0 + timedelta(minutes=20)
    assert kinds(desk, inc.id).count("alert.recovered") == 1
    # It fires again before anyone resolved it: same incident, downtime counts again.
    (again,) = parse_alertmanager(am_payload(starts="2026-03-02T14:30:00Z"))
    assert desk.raise_alert(again, now=T0 + timedelta(minutes=30)).action == "refired"
    assert desk.downtime(inc.id, until=T0 + timedelta(minutes=40)) == {"acme": 30 * 60}


def test_two_raisers_racing_open_one_incident(desk: Incidents) -> None:
    barrier = threading.Barrier(6)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def raise_it() -> None:
        try:
            barrier.wait()
            outcomes.append(desk.raise_alert(db_down("hooli"), now=T0).action)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=raise_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert Counter(outcomes) == {"opened": 1, "repeat": 5}
    assert len(desk.list_incidents()) == 1


def test_a_resolved_incident_frees_its_key(desk: Incidents) -> None:
    first = desk.raise_alert(db_down("hooli"), now=T0).incident
    assert first is not None
    desk.resolve(first.id, "pgbouncer pool exhausted", actor=ALICE, now=T0 + timedelta(hours=1))
    second = desk.raise_alert(db_down("hooli"), now=T0 + timedelta(hours=2))
    assert second.action == "opened" and second.incident and second.incident.id != first.id


def test_open_ack_resolve_and_what_is_refused(desk: Incidents) -> None:
    inc = desk.open_for("acme", "p1", "replication lag", actor=ALICE, now=T0)
    assert (inc.severity, inc.server, inc.customers) == ("P1", "vps1", ("acme",))
    assert inc.response_due == T0 + timedelta(hours=1)
    assert desk.open_for("vps2", "P3", "noisy logs", actor=BOB).server == "vps2"
    with pytest.raises(NotFound, match="Did you mean 'acme'"):
        desk.open_for("acmee", "P1", "x", actor=ALICE)
    with pytest.raises(DbopsError, match="not a severity"):
        desk.open_for("acme", "P5", "x", actor=ALICE)
    acked = desk.ack(inc.ref, actor=BOB, now=T0 + timedelta(minutes=3))
    assert (acked.status, acked.owner) == ("acknowledged", BOB)
    with pytest.raises(DbopsError, match="already acknowledged by <@U0BOB>"):
        desk.ack(inc.id, actor=ALICE)
    with pytest.raises(DbopsError, match="root cause"):
        desk.resolve(inc.id, "  ", actor=BOB)
    done = desk.resolve(inc.id, "a long vacuum", actor=BOB, now=T0 + timedelta(minutes=40))
    assert done.incident.status == "resolved" and done.credits == []
    assert done.downtime_s == {}, "a P1 by hand is not an outage"
    with pytest.raises(DbopsError, match="already resolved"):
        desk.resolve(inc.id, "again", actor=BOB)
    assert kinds(desk, inc.id) == ["incident.opened", "incident.acknowledged", "incident.resolved"]
    assert [i.id for i in desk.list_incidents(active=False, customer="acme")] == [inc.id]
    with pytest.raises(NotFound):
        desk.get(999)


@pytest.mark.parametrize("text", ["12", "inc-12", "INC-12", "#12"])
def test_incident_ids(text: str) -> None:
    assert parse_incident_id(text) == 12


@pytest.mark.parametrize("text", ["", "inc-", "12; drop", "0", "9" * 12])
def test_bad_incident_ids(text: str) -> None:
    with pytest.raises(DbopsError):
        parse_incident_id(text)


def test_an_outage_over_an_hour_proposes_a_pro_rated_credit(desk: Incidents) -> None:
    inc = desk.raise_alert(server_down("vps1"), now=T0).incident
    assert inc is not None
    # globex's database comes back on its own after 50 minutes; the rest after 90.
    desk.raise_alert(db_down("globex"), now=T0 + timedelta(minutes=1))
    desk.raise_alert(db_down("globex", "resolved"), now=T0 + timedelta(minutes=50))
    desk.raise_alert(server_down("vps1", "resolved"), now=T0 + timedelta(minutes=90))
    done = desk.resolve(inc.id, "disk full", actor=ALICE, now=T0 + timedelta(hours=3))
    assert done.downtime_s == {"acme": 5400, "globex": 3000, "initech": 5400}
    credits = {c.customer: c for c in done.credits}
    assert set(credits) == {"acme", "initech"}, "globex was down for less than an hour"
    assert credits["acme"].credit_cents == 150  # $720/month: $1 an hour
    assert credits["initech"].credit_cents == credit_cents(15, timedelta(minutes=90)) == 3
    proposed = [e for e in desk.timeline(inc.id) if e.kind == "sla.credit_proposed"]
    assert {e.payload["customer"] for e in proposed} == {"acme", "initech"}


def test_credit_rounds_to_the_nearest_cent() -> None:
    assert credit_cents(15, timedelta(days=30)) == 1500
    assert credit_cents(29, timedelta(hours=2)) == 8  # 2900 * 7200 / 2592000 = 8.06
    assert credit_cents(100, timedelta(hours=1, minutes=30)) == 21  # 20.83
    assert credit_cents(0, timedelta(days=3)) == 0


def test_the_card_offers_what_makes_sense(engine: Engine, desk: Incidents) -> None:
    notifier = RecordingNotifier()
    desk.escalator = Escalator(engine, desk.events, make_fleet(), notifier)
    inc = desk.raise_alert(db_down("acme"), now=T0).incident
    assert inc is not None
    assert [(s.how, s.to) for s in notifier.sent] == [("dm", ALICE)]
    card = desk.card(inc.id, now=T0 + timedelta(minutes=2))
    buttons = {b["action"]: b for b in card["buttons"]}
    assert buttons["ack"]["enabled"] and buttons["restart"]["enabled"]
    assert buttons["restart"]["confirm"] and buttons["restart"]["role"] == "operator"
    assert "restore" not in buttons, "no restores until the backups work lands"
    assert card["overdue"] and card["age"] == "2m"

    desk.ack(inc.id, actor=ALICE, now=T0 + timedelta(minutes=3))
    desk.raise_alert(db_down("acme", "resolved"), now=T0 + timedelta(minutes=4))
    card = desk.card(inc.id, restore={"name": "acme-2026-03-02.dump", "age_s": 7200})
    buttons = {b["action"]: b for b in card["buttons"]}
    assert (
        not buttons["ack"]["enabled"] and buttons["ack"]["reason"] == f"acknowledged by <@{ALICE}>"
    )
    assert not buttons["restart"]["enabled"] and "recovered" in buttons["restart"]["reason"]
    assert buttons["restore"]["label"] == "Restore acme-2026-03-02.dump (2h00m old)"


def test_restart_precondition_from_a_status() -> None:
    def status(postgres: str, online: bool, reachable: bool = True, disk: int = 40) -> Any:
        return {
            "server": {
                "name": "vps1",
                "reachable": reachable,
                "postgres": postgres,
                "checks": [
                    {"name": "connection", "verdict": "crit", "detail": "connection refused"},
                    {"name": "disk_space", "verdict": "ok", "value": disk},
                ],
            },
            "database": {"customer": "acme", "online": online},
        }

    assert restart_precondition(status("down", False)).ok
    assert "connection refused" in restart_precondition(status("down", False)).reason
    # The cluster answers and only acme's database does not: a restart would not bring it back.
    assert not restart_precondition(status("up", False)).ok
    up = restart_precondition(status("up", True))
    assert not up.ok and "nothing to restart" in up.reason
    full = restart_precondition(status("down", False, disk=100))
    assert not full.ok and "full" in full.reason
    gone = restart_precondition(status("down", False, reachable=False))
    assert not gone.ok and "SSH" in gone.reason


def test_restart_from_the_card_brings_a_stopped_server_back(
    sqlite_engine: Engine, sandbox: dict[str, Any], sandbox_break: Any
) -> None:
    fleet = load_fleet(sandbox["fleet"])
    customers = [customer_from_mapping(c) for c in sandbox["customers"]]
    upsert_customers(sqlite_engine, customers)
    acme = next(c for c in customers if c.name == "acme")
    events = EventLog(sqlite_engine)
    desk = Incidents(sqlite_engine, events, fleet)
    with RunnerPool(fleet) as pool:
        sandbox_break("server-down", acme.server)
        status = customer_status(fleet, acme, pool.get(acme.server), deadline_s=5)
        inc = desk.raise_alert(server_down(acme.server)).incident
        assert inc is not None and "acme" in inc.customers
        card = desk.card(inc.id, restart=restart_precondition(status))
        restart = next(b for b in card["buttons"] if b["action"] == "restart")
        assert restart["enabled"], restart["reason"]

        result = restart_on_incident(desk, inc.id, pool, actor=ALICE, recheck_s=20)
        assert result["answering"], result
        assert result["message"].startswith(f"PostgreSQL on {acme.server} answers again")
        after = desk.get(inc.id)
        assert after.status == "acknowledged" and after.recovered_at is not None
        status = customer_status(fleet, acme, pool.get(acme.server), deadline_s=5)
        assert status["database"]["online"]
        restart = next(
            b
            for b in desk.card(inc.id, restart=restart_precondition(status))["buttons"]
            if b["action"] == "restart"
        )
        assert not restart["enabled"] and "answers" in restart["reason"]
    timeline = kinds(desk, inc.id)
    assert "incident.restart" in timeline and "incident.recovered" in timeline
    (restart_event,) = events.query(kind="server.restart")
    assert restart_event.actor == ALICE and restart_event.payload["answering"]


def test_timeline_and_list_for_the_slack_surface(desk: Incidents) -> None:
    a = desk.open_for("acme", "P2", "slow checkpoints", actor=ALICE, now=T0)
    b = desk.open_for("hooli", "P0", "hooli down", actor=BOB, now=T0 + timedelta(minutes=1))
    desk.note(a.id, "checkpoint_timeout raised to 15min", actor=ALICE)
    assert [i.id for i in desk.list_incidents()] == [b.id, a.id], "most severe first"
    assert [i.id for i in desk.list_incidents(server="vps2")] == [b.id]
    timeline = desk.timeline(a.ref)
    assert [e.kind for e in timeline] == ["incident.opened", "incident.note"]
    assert timeline[1].actor == ALICE
    assert desk.get(a.id).as_json()["ref"] == f"inc-{a.id}"


def _sweep(postgres: str) -> dict[str, Any]:
    down = postgres == "down"
    return {
        "servers": [{"name": "vps1", "reachable": True, "postgres": postgres,
                     "checks": [{"name": "connection", "verdict": "crit" if down else "ok"}]}],
        "databases": [{"customer": c, "server": "vps1", "online": not down,
                       "checks": [{"name": "connection", "verdict": "crit" if down else "ok"}]}
                      for c in ("acme", "globex", "initech")],
    }  # fmt: skip


def test_health_sweeps_open_one_incident_then_mark_it_recovered(desk: Incidents) -> None:
    for minute in range(3):  # three sweeps a minute apart see vps1 down
        desk.ingest(alerts_from_report(_sweep("down")), now=T0 + timedelta(minutes=minute))
    (inc,) = desk.list_incidents()
    assert inc.kind == "server_down" and inc.alert_count == 12  # 3 sweeps x (server + 3 dbs)
    quiet = kinds(desk, inc.id)
    assert quiet.count("alert.repeat") == 0, "a sweep's repeats are counted, not logged"
    for minute in (3, 4):
        desk.ingest(alerts_from_report(_sweep("up")), now=T0 + timedelta(minutes=minute))
    after = desk.get(inc.id)
    assert after.status == "open" and after.recovered_at == T0 + timedelta(minutes=3)
    assert set(after.recovered_customers) == {"acme", "globex", "initech"}
    assert kinds(desk, inc.id).count("alert.recovered") == 4, "once each, not once per sweep"
    assert desk.downtime(inc.id) == {"acme": 180, "globex": 180, "initech": 180}


def test_mitigate_stops_paging_and_severity_changes_follow(engine: Engine, desk: Incidents) -> None:
    notifier = RecordingNotifier()
    pager = Escalator(engine, desk.events, make_fleet(), notifier)
    desk.escalator = pager
    inc = desk.open_for("hooli", "P1", "replica lagging", actor=ALICE, now=T0)
    desk.set_severity(inc.id, "P0", actor=CAROL, now=T0 + timedelta(minutes=1))
    desk.mitigate(inc.id, actor=BOB, note="failed over", now=T0 + timedelta(minutes=2))
    steps = pager.tick(T0 + timedelta(hours=1))
    assert [(s.kind, s.to) for s in steps] == [("reminder", BOB)], "no pages, one reminder"
    assert desk.get(inc.id).owner == BOB
    desk.set_severity(inc.id, "P2", actor=CAROL)
    assert pager.pending(inc.id) == []
    card = desk.set_card(inc.id, MessageRef("C0OPS", "1700000000.000100"))
    assert card.card_ref == MessageRef("C0OPS", "1700000000.000100")
    assert desk.card(inc.id)["card_ref"] == {"channel": "C0OPS", "ts": "1700000000.000100"}
    assert kinds(desk, inc.id)[-1] == "incident.severity"
