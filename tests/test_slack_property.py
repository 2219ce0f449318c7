"""Whatever the fleet, Slack takes every message and view dbops makes.

Hypothesis draws fleets from one server with no databases to 50 servers with 40 databases each,
with any mix of failures (servers unreachable, PostgreSQL down, databases offline, backups
failed or stale, warnings, log errors, full disks, open incidents) and any words in the details
(long, hostile, not ASCII). From each it renders every kind of message and view: the report (the
`/db report` reply, and the morning report's summary and every part of its thread), status,
servers, log, backups, the incident list, card and resolve note with many customers,
checklists, the restore form with many backups, the onboarding card, pages and the on-call
reply; and asserts Slack's rules hold for each (bot/slack/rules.py, the checker the strict
stub refuses with). Pages go through the strict stub itself. The fleets are made on paper
(tests/synthetic_fleet.py), so this runs in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from slack_sdk import WebClient
from sqlalchemy import Engine

from bot.commands.backups import backups_reply
from bot.commands.cards import (
    card_reply,
    credit_buttons,
    list_reply,
    oncall_reply,
    resolution_reply,
)
from bot.commands.catalog import build_registry
from bot.commands.provision import onboarding_reply
from bot.commands.restore import _preview_reply, restore_view
from bot.notifiers import SlackNotifier
from bot.scheduler import checklist_message
from bot.slack.forms import with_destination
from bot.slack.listeners.delivery import Destination
from bot.slack.rules import assert_message_ok, assert_view_ok, check_message
from bot.views import render
from bot.views.blocks import Reply
from core import checklists as cl
from core import oncall
from core.backups import BackupInfo, RestorePreview, Verification
from core.billing import OnboardingProposal
from core.escalation import Timer, page_text
from core.fleet import parse_fleet
from core.incidents import CreditProposal, Incident, Resolution
from core.notify import Message, inert_payload
from core.oncall import OnCallNow
from core.provisioning import ServerCapacity, ServerProposal
from storage.events import EventLog, StoredEvent
from tests.slack_stub import BOT_TOKEN, SlackStub
from tests.synthetic_fleet import EVIL, NOW, Weather, customer_status, fleet_report, servers_view

TZ = ZoneInfo("America/New_York")
ALICE = "U_ALICE"
REGISTRY = build_registry()  # every command, as the app has them
EXAMPLES = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

rates = st.sampled_from([0.0, 0.02, 0.3, 1.0])
details = st.sampled_from(
    ["", EVIL, "é ü 漢字 🙂" * 10, "long detail " * 40, EVIL * 6, "&&&<<<>>>" * 30]
)


@st.composite
def weathers(draw: st.DrawFn) -> Weather:
    return Weather(
        unreachable=draw(rates),
        postgres_down=draw(rates),
        offline=draw(rates),
        backups_failed=draw(rates),
        backups_stale=draw(rates),
        warnings=draw(rates),
        log_errors=draw(rates),
        disk_full=draw(rates),
        detail=draw(details),
        incidents=draw(st.sampled_from([0, 1, 7, 60])),
    )


fleets = st.builds(
    fleet_report,
    servers=st.integers(1, 50),
    databases=st.sampled_from([0, 1, 15, 40]),
    weather=weathers(),
    seed=st.integers(0, 2**16),
)


def sent(reply: Reply, what: str) -> dict[str, Any]:
    """The reply as a transport sends it (inert markup applied), checked against Slack's
    rules; the JSON."""
    message = inert_payload(reply.message())
    assert_message_ok(message, what)
    return message


def shown(messages: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(m, ensure_ascii=False) for m in messages)


# --- the report ---------------------------------------------------------------------------------


WORST = Weather(  # everything at once, in the longest words
    unreachable=0.3,
    postgres_down=0.3,
    offline=1.0,
    backups_failed=1.0,
    backups_stale=1.0,
    warnings=1.0,
    log_errors=1.0,
    disk_full=1.0,
    detail=EVIL * 6,
    incidents=60,
)


@EXAMPLES
@given(report=fleets, late_s=st.sampled_from([0, 1200]))
@example(report=fleet_report(50, 40, WORST), late_s=1200)
@example(report=fleet_report(50, 40, Weather(backups_failed=1.0, detail=EVIL)), late_s=0)
@example(report=fleet_report(50, 40, Weather(warnings=1.0, backups_stale=0.5)), late_s=0)
def test_the_report_fits_whatever_the_morning(report: dict[str, Any], late_s: int) -> None:
    button = REGISTRY.button("servers")
    sent(render.report_reply(report, TZ, [button]), "/db report")
    parts = render.report_parts(report, TZ)
    sent(render.report_summary(report, parts=len(parts), late_s=late_s), "the summary")
    thread = [sent(part, f"report part {i}") for i, part in enumerate(parts, 1)]
    # Every bad backup and offline database is in the thread: nothing is dropped.
    text = shown(thread)
    for db in report["databases"]:
        if not db["online"] or db["checks"][1]["verdict"] != "ok":
            assert f"*{db['customer']}*" in text, db["customer"]


@EXAMPLES
@given(report=fleets, pick=st.integers(0, 10**6))
def test_status_servers_and_backups_fit(report: dict[str, Any], pick: int) -> None:
    registry = REGISTRY
    if report["databases"]:
        status = customer_status(report, pick % len(report["databases"]))
        name = status["customer"]
        buttons = [registry.button("report"), registry.button(f"log {name}")]
        sent(render.status_reply(status, TZ, buttons), "status")
    sent(render.servers_reply(servers_view(report), TZ, [registry.button("report")]), "servers")
    now = NOW
    many = [
        BackupInfo(
            "c000x00",
            "vps000",
            (now - timedelta(days=i)).strftime("%Y%m%dT%H%M%SZ"),
            f"/var/backups/c000x00/{i}",
            "ok" if i % 7 else "failed",
            size_bytes=10**6 * (i + 1),
            verification=Verification(i % 5 != 0, "ok", now, "restore test ok") if i % 2 else None,
        )
        for i in range(pick % 120)
    ]
    sent(backups_reply("c000x00", many, now, registry.button("backup c000x00")), "backups")


@EXAMPLES
@given(n=st.integers(0, 60), words=details)
def test_the_log_fits(n: int, words: str) -> None:
    events = [
        StoredEvent(
            i,
            NOW,
            "command",
            ALICE,
            "acme",
            {"text": f"status acme {words}"},
            "slack",
            None,
            "",
            "",
        )
        for i in range(n)
    ]
    sent(render.log_reply("acme", events, TZ), "log")


# --- incidents ----------------------------------------------------------------------------------


def incident(i: int, customers: tuple[str, ...], title: str, status: str = "open") -> Incident:
    opened = NOW - timedelta(hours=2, minutes=i)
    resolved = NOW if status == "resolved" else None
    return Incident(
        i, title[:200], "P0" if i % 2 else "P2", status, "manual", "vps001", customers, (), None,
        None, None if status == "open" else ALICE, ALICE, "manual", opened, None, None,
        resolved, None, None, 0, "disk filled by WAL" if resolved else None, None,
    )  # fmt: skip


@EXAMPLES
@given(
    count=st.integers(1, 40),
    customers=st.integers(0, 40),
    title=details.map(lambda d: f"checkout is slow {d}".strip()),
)
def test_incident_list_card_and_resolve_note_fit(count: int, customers: int, title: str) -> None:
    names = tuple(f"c001x{d:02d}" for d in range(customers))
    found = [
        incident(i + 1, names, title, "open" if i % 3 else "acknowledged") for i in range(count)
    ]
    buttons = [
        REGISTRY.button(f"incident ack {i.id}", label=f"Ack {i.ref}")
        for i in found
        if i.status == "open"
    ][:5]
    listed = sent(list_reply(found, NOW, buttons), "incident list")
    acks = [
        el["action_id"] for b in listed["blocks"] if b["type"] == "actions" for el in b["elements"]
    ]
    assert len(acks) == len(set(acks)) == len(buttons)

    inc = found[0]
    card = {
        **inc.as_json(),
        "age": "2h00m",
        "since_local": "2026-11-23 06:00 EST",
        "overdue": True,
        "buttons": [
            {"action": "ack", "label": "Ack", "enabled": True, "reason": ""},
            {
                "action": "restart",
                "label": "Restart PostgreSQL",
                "enabled": False,
                "reason": f"PostgreSQL answers {title}",
            },
        ],
    }
    card_buttons = [
        REGISTRY.button(f"incident ack {inc.id}"),
        REGISTRY.button(f"incident restart {inc.id}"),
    ]
    sent(card_reply(card, card_buttons, note=title), "incident card")

    done = incident(inc.id, names, title, "resolved")
    credits = [
        CreditProposal(n, "pro", 300, 7200, 833 if k % 4 else None, f"down 2h00m {title}")
        for k, n in enumerate(names)
    ]
    resolution = Resolution(done, {n: 7200 for n in names}, credits, list(range(2, 9)))
    note = sent(
        resolution_reply(resolution, ALICE, credit_buttons(resolution, REGISTRY)), "resolve note"
    )
    applies = [el for b in note["blocks"] if b["type"] == "actions" for el in b["elements"]]
    assert len(applies) == sum(1 for c in credits if c.credit_cents is not None)
    assert len({el["action_id"] for el in applies}) == len(applies)
    assert all(
        REGISTRY.by_action(el["action_id"]) is REGISTRY.get("credit apply") for el in applies
    )


# --- checklists, forms, onboarding, on call ------------------------------------------------------


def checklist(n: int, words: str) -> cl.RunState:
    items = tuple(
        cl.Item(i, f"Check item {i} of the runbook {words}"[:300], i % 3 == 0, ALICE, NOW)
        for i in range(n)
    )
    return cl.RunState(
        7, "weekly-maintenance", f"Weekly maintenance {words}", items, NOW, "scheduler",
        "C0DBOPS", "1.000001", None, None,
    )  # fmt: skip


def posted(message: Message, what: str) -> None:
    assert_message_ok(inert_payload({"text": message.text, "blocks": message.blocks}), what)


@EXAMPLES
@given(n=st.integers(1, 10), words=details)
def test_checklists_fit(n: int, words: str) -> None:
    posted(checklist_message(checklist(n, words), TZ), "checklist")


def test_a_checklist_of_more_than_ten_items_fits() -> None:
    posted(checklist_message(checklist(25, ""), TZ), "checklist of 25")


@EXAMPLES
@given(count=st.integers(1, 150), warnings=st.lists(details, max_size=5))
def test_the_restore_form_fits_with_many_backups(count: int, warnings: list[str]) -> None:
    backups = [
        BackupInfo(
            "acme",
            "vps1",
            (NOW - timedelta(hours=6 * i)).strftime("%Y%m%dT%H%M%SZ"),
            f"/var/backups/acme/{i}",
            "ok",
            size_bytes=123456789 * (i + 1),
            verification=Verification(True, "ok", NOW, "restore test ok"),
        )
        for i in range(count)
    ]
    preview = RestorePreview("acme", "vps1", "acme", backups[0], 6 * 3600, backups, warnings)
    view = restore_view(preview, NOW)
    to = Destination("https://hooks.slack.com/commands/T0/1/" + "x" * 60, "C0DBOPS", ALICE)
    assert_view_ok(inert_payload(with_destination(view, to)), "restore form")
    sent(_preview_reply(preview), "restore preview")


@EXAMPLES
@given(servers=st.integers(0, 50), words=details, ready=st.booleans())
def test_the_onboarding_card_fits(servers: int, words: str, ready: bool) -> None:
    candidates = [
        ServerCapacity(
            f"vps{i:03d}",
            i % 4 != 0,
            30,
            16384,
            10**12,
            4 * 10**11,
            9000,
            400,
            900,
            i % 2 == 0,
            0.7,
            (f"disk {words}",) if i % 3 else (),
        )
        for i in range(servers)
    ]
    chosen = candidates[1].server if len(candidates) > 1 and ready else None
    proposal = OnboardingProposal(
        "evt_1", "checkout.session.completed", "cs_test_" + "a" * 60, "cus_1", "sub_1",
        "newco" if ready else None, "checkout", "dba@newco.example", "small", "price_1",
        2900, "usd", ServerProposal("small", chosen, candidates, f"most room {words}"),
        [f"check the name {words}"] if words else [],
    )  # fmt: skip
    sent(onboarding_reply(proposal, REGISTRY), "onboarding card")


def test_oncall_replies_fit() -> None:
    for now in (
        OnCallNow(ALICE, "U_DAVE", "rotation", "override", "#db-escalation", NOW),
        OnCallNow(None, None, "nobody", "nobody", None, None),
    ):
        sent(oncall_reply(now, TZ), "oncall")


def test_the_handoff_post_fits(sqlite_engine: Engine) -> None:
    fleet = parse_fleet(
        {
            "servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}],
            "oncall": {"primary": ALICE, "rotation": [ALICE, "U_BOB", "U_CAROL"]},
        }
    )
    events = EventLog(sqlite_engine)
    said = [
        oncall.handoff(sqlite_engine, events, fleet, now=NOW + timedelta(weeks=w), tz=TZ)
        for w in range(3)
    ]
    assert said[0]
    for text in said:
        if text:
            posted(Message(text), "handoff")


# --- pages, through the strict stub --------------------------------------------------------------


@pytest.fixture(scope="module")
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@EXAMPLES
@given(
    target=st.sampled_from(["primary", "secondary", "channel"]),
    kind=st.sampled_from(["page", "reminder"]),
    customers=st.integers(0, 40),
    title=details.map(lambda d: f"vps1 down {d}".strip()),
)
def test_pages_reach_the_dm_and_are_settled(
    stub: SlackStub, target: str, kind: str, customers: int, title: str
) -> None:
    names = tuple(f"c001x{d:02d}" for d in range(customers))
    inc = incident(12, names, title)
    timer = Timer(1, 12, kind, 1, 0, target, NOW, "token", 0)
    now_on = OnCallNow(ALICE, "U_DAVE", "fleet", "fleet", "#db-escalation", None)
    text = page_text(inc, timer, NOW + timedelta(minutes=20), now_on)
    notifier = SlackNotifier(WebClient(token=BOT_TOKEN, base_url=stub.base_url), registry=REGISTRY)
    message = Message(text, meta={"incident": 12, "actions": ["ack"] if kind == "page" else []})
    if target == "channel":
        ref = notifier.post("#db-escalation", message)
    else:
        ref = notifier.dm("U_DAVE" if target == "secondary" else ALICE, message)
    notifier.update(ref, Message(f":white_check_mark: {title} was acknowledged", meta={}))
    assert stub.refused() == []


def test_the_checker_refuses_what_slack_refuses() -> None:
    """The rules the property tests lean on say no where Slack does (a sample per rule)."""
    ok = {"type": "section", "text": {"type": "mrkdwn", "text": "x"}}
    button = {"type": "button", "text": {"type": "plain_text", "text": "Ack"}, "action_id": "a"}
    cases = {
        "invalid_blocks": [
            {"text": "t", "blocks": [ok] * 51},
            {"text": "t", "blocks": [{**ok, "text": {"type": "mrkdwn", "text": "x" * 3001}}]},
            {"text": "t", "blocks": [{"type": "actions", "elements": [button, button]}]},
            {"text": "t", "blocks": [{**ok, "block_id": "b"}, {**ok, "block_id": "b"}]},
            {"text": "t", "blocks": [{"type": "header", "text": {"type": "mrkdwn", "text": "h"}}]},
            {"text": "t", "blocks": [{"type": "actions", "elements": [button] * 26}]},
        ],
        "msg_blocks_too_long": [
            {"text": "t", "blocks": [{**ok, "text": {"type": "mrkdwn", "text": "x" * 3000}}] * 5}
        ],
        "msg_too_long": [{"text": "x" * 40_001}],
        "no_text": [{"text": " "}],
    }
    for error, messages in cases.items():
        for message in messages:
            refusal = check_message(message)
            assert refusal is not None and refusal.error == error, (error, refusal)
    assert check_message({"text": "t", "blocks": [ok] * 50}) is None
