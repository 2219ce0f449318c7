"""`/db maintenance` in Slack and the shell: plan a window, see the list, end it; the modal.

alice (operator) plans work on vps1 (acme and globex live there) and on acme alone; bob (a
viewer) may read the list but not plan or end; carol is an admin. With Slack (our strict stub)
the window is announced in the ops channel and the announcement's place is kept on the window,
so that the scheduler's summary lands in its thread. No live server: the fleet is a file's
worth of names, and time is a clock the test moves (a fixed date: the windows are the test's
own data).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine

from bot.commands import maintenance as mc
from bot.commands.errors import reply_for
from bot.commands.roles import Denied
from bot.commands.router import Invocation, Router, UsageError, parse
from bot.runtime import Runtime
from bot.scheduler import Worker
from bot.shell import render_blocks
from bot.slack.rules import assert_view_ok
from bot.views.blocks import Reply
from core.customers import Customer, upsert_customers
from core.errors import DbopsError, NotFound
from core.fleet import Fleet, parse_fleet
from core.maintenance import Maintenance
from core.settings import load_settings
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.bot_kit import ALICE, BOB, CAROL, make_router
from tests.slack_app import SlackApp
from tests.slack_stub import BOT_TOKEN, SlackStub, slash_body, view_submission_body
from tests.test_blocks_contract import check_contract
from tests.test_email import BUSINESS, Inbox, smtp  # noqa: F401  (smtp: a fixture)

T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)  # a Monday, 09:00 in New York
NY = ZoneInfo("America/New_York")
OPS = "#db-ops"
TOMORROW_2AM = "2026-03-03T02:00"  # New York time: 07:00 UTC


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def make_fleet(**more: Any) -> Fleet:
    return parse_fleet(
        {
            "servers": [
                {"name": "vps1", "dsn": "host=127.0.0.1 port=1"},
                {"name": "vps2", "dsn": "host=127.0.0.1 port=1"},
            ],
            **more,
        }
    )


def seed(engine: Engine, extra: int = 0) -> None:
    upsert_customers(
        engine,
        [
            Customer("acme", "vps1", "acme", "acme", "small", "ops@acme.example"),
            Customer("globex", "vps1", "globex", "globex", "small"),
            Customer("hooli", "vps2", "hooli", "hooli", "small"),
            *(
                Customer(f"c{i:02d}", "vps1", f"c{i:02d}", f"c{i:02d}", "small")
                for i in range(extra)
            ),
        ],
    )


def make_runtime(
    engine: Engine, clock: Clock, fleet: Fleet | None = None, **settings: Any
) -> Runtime:
    base: dict[str, Any] = {
        "slack_bot_token": None,
        "smtp_url": None,
        "ops_channel": OPS,
        "timezone": str(NY),
    }
    return Runtime(
        load_settings(**{**base, **settings}),
        engine=engine,
        events=EventLog(engine),
        fleet=fleet or make_fleet(),
        clock=clock,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(sqlite_engine: Engine, clock: Clock) -> Iterator[Router]:
    seed(sqlite_engine)
    rt = make_runtime(sqlite_engine, clock)
    yield make_router(rt)
    rt.close()


def windows(router: Router) -> Maintenance:
    m = router.rt.maintenance  # type: ignore[attr-defined]
    assert isinstance(m, Maintenance)
    return m


def say(router: Router, user: str, text: str, surface: str = "shell") -> Reply:
    reply = router.run(Invocation(actor=user, surface=surface, text=text))
    assert reply is not None
    check_contract(text, reply)
    return reply


def shown(reply: Reply) -> str:
    text, _ = render_blocks(reply.blocks)
    return text


def kinds(router: Router) -> list[str]:
    return [e.kind for e in router.events.query(kind_prefix="maintenance.", limit=100)]


# --- the router (the shell and Slack share it) ----------------------------------------------------


def test_a_window_typed_is_scheduled_and_its_announcement_is_the_reply(router: Router) -> None:
    reply = say(router, ALICE, "maintenance vps1 2h kernel upgrade")
    text = shown(reply)
    assert "Maintenance mw-1 on server vps1" in text
    assert "from now until Mon 2026-03-02 11:00 EST (2h)" in text
    assert "Why: kernel upgrade" in text
    assert "Customers affected: acme, globex (2)" in text
    assert "Customer notices: none" in text
    assert "/db maintenance end mw-1" in text
    assert not reply.ephemeral  # what was planned is news for the channel
    w = windows(router).get(1)
    assert (w.target_kind, w.target, w.reason, w.created_by) == (
        "server",
        "vps1",
        "kernel upgrade",
        ALICE,
    )
    assert (w.starts_at, w.ends_at, w.notify) == (T0, T0 + timedelta(hours=2), False)
    assert w.announcement_ts is None  # no Slack: nothing to thread the summary under
    assert kinds(router) == ["maintenance.created"]
    (typed,) = router.events.query(kind="command", limit=10)
    assert typed.actor == ALICE and typed.subject == "vps1"

    # Ahead, on one customer, `--at` read in TIMEZONE; 90m kept as 1h30m.
    later = say(router, ALICE, f"maintenance acme 90m --at {TOMORROW_2AM} move acme's disk")
    text = shown(later)
    assert "Maintenance mw-2 on customer acme" in text
    assert "from Tue 2026-03-03 02:00 EST to Tue 2026-03-03 03:30 EST (1h30m" in text
    assert "Customers affected: acme (1)" in text
    w2 = windows(router).get("mw-2")
    assert w2.starts_at == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
    assert w2.ends_at - w2.starts_at == timedelta(minutes=90)
    # An offset is taken as written.
    say(router, CAROL, "maintenance vps2 30m --at 2026-03-04T10:00Z disk swap")
    assert windows(router).get(3).starts_at == datetime(2026, 3, 4, 10, 0, tzinfo=UTC)


def test_overlapping_windows_say_they_combine(router: Router) -> None:
    say(router, ALICE, "maintenance vps1 3h kernel upgrade")
    text = shown(say(router, ALICE, "maintenance acme 1h reindex"))
    assert "Overlaps mw-1: acme stays covered until Mon 2026-03-02 12:00 EST" in text
    # A window that outlasts the others says nothing of them.
    assert "Overlaps" not in shown(say(router, ALICE, "maintenance vps1 4h longer work"))


def test_notices_say_who_was_emailed_and_who_was_not(
    sqlite_engine: Engine,
    clock: Clock,
    smtp: tuple[Inbox, str],  # noqa: F811  (the fixture imported above)
) -> None:
    inbox, url = smtp
    seed(sqlite_engine)
    rt = make_runtime(sqlite_engine, clock, make_fleet(business=BUSINESS), smtp_url=url)
    router = make_router(rt)
    text = shown(say(router, ALICE, "maintenance vps1 2h --notify kernel upgrade"))
    assert "Customer notices: emailed acme; not sent to globex (no address on record)" in text
    assert [m["To"] for m in inbox.messages] == ["ops@acme.example"]
    assert windows(router).get(1).notify
    rt.close()


def test_roles_reading_is_for_anyone_planning_and_ending_for_operators(router: Router) -> None:
    say(router, ALICE, "maintenance vps1 1h kernel upgrade")
    for line in (
        "maintenance vps2 1h kernel",
        "maintenance",
        "maintenance schedule",
        "maintenance end mw-1",
        "maintenance end vps1",
    ):
        with pytest.raises(Denied) as err:
            router.run(Invocation(actor=BOB, surface="slack", text=line))
        assert "operator" in reply_for(err.value).text, line
    assert len(router.events.query(kind="auth.denied", limit=10)) == 5
    assert "mw-1" in shown(say(router, BOB, "maintenance list"))
    assert windows(router).get(1).status(T0) == "active", "bob ended nothing"
    assert kinds(router) == ["maintenance.created"]


@pytest.mark.parametrize(
    ("line", "error", "says"),
    [
        ("maintenance vps9 1h kernel", NotFound, ["vps9", "vps1"]),  # a suggestion
        ("maintenance vps1 an hour kernel", UsageError, ["not a duration", "2h"]),
        ("maintenance vps1 2h", UsageError, ["needs a reason", "/db maintenance vps1 2h kernel"]),
        ("maintenance vps1", UsageError, ["needs a duration", "/db maintenance` alone"]),
        ("maintenance vps1 8d move everything", DbopsError, ["at most 7d", "several windows"]),
        ("maintenance vps1 2h --at 2026-03-01T09:00 kernel", DbopsError, ["in the past"]),
        ("maintenance vps1 2h --at 2026-09-01T09:00 kernel", DbopsError, ["more than 90 days"]),
        ("maintenance vps1 2h --at tomorrow kernel", UsageError, ["not a time", "ISO 8601"]),
        ("maintenance vps1 2h --at 2026-03-03 02:00 kernel", UsageError, ["2026-03-03T02:00"]),
        ("maintenance vps1 2h --notify kernel", DbopsError, ["SMTP", "without notices"]),
        ("maintenance vps1 2h --at", UsageError, ["--at needs a value"]),
        ("maintenance end mw-99", NotFound, ["no maintenance window mw-99", "list"]),
        ("maintenance end vps2", NotFound, ["no maintenance window on vps2"]),
        ("maintenance end nope", NotFound, ["nope"]),
        ("maintenance list nope", NotFound, ["nope"]),
    ],
)
def test_errors_say_what_to_type(
    router: Router, line: str, error: type[DbopsError], says: list[str]
) -> None:
    with pytest.raises(error) as err:
        router.run(Invocation(actor=ALICE, surface="shell", text=line))
    reply = reply_for(err.value)
    check_contract(line, reply)
    for words in says:
        assert words in reply.text, (line, reply.text)
    assert windows(router).windows(T0) == [] and kinds(router) == [], "nothing was planned"


def test_list_then_end_and_cancel(router: Router, clock: Clock) -> None:
    m = windows(router)
    assert "No maintenance window is active or planned" in say(router, BOB, "maintenance list").text
    say(router, ALICE, "maintenance vps1 2h kernel upgrade")
    say(router, ALICE, f"maintenance acme 1h --at {TOMORROW_2AM} reindex")
    say(router, ALICE, "maintenance vps2 1h hooli's disk")

    listed = say(router, BOB, "maintenance list")
    text = shown(listed)
    assert "In maintenance now (2)" in text and "Planned (1)" in text
    assert text.index("mw-1") < text.index("mw-3") < text.index("mw-2")  # active, then planned
    assert [b.value for b in listed.buttons()] == [
        "maintenance end mw-1",
        "maintenance end mw-3",
        "maintenance end mw-2",
    ]
    assert "[1] End mw-1  [2] End mw-3  [3] Cancel mw-2" in text
    assert listed.ephemeral

    # One target's: acme is covered by vps1's window and its own; hooli's is not shown.
    about = shown(say(router, BOB, "maintenance list acme"))
    assert "mw-1" in about and "mw-2" in about and "mw-3" not in about
    assert "Maintenance windows on acme" in about
    assert "mw-1" in shown(say(router, BOB, "maintenance list globex"))  # vps1's covers it
    assert "mw-3" in shown(say(router, BOB, "maintenance list vps2"))

    # alice presses End under the list: the same command, the same role check.
    clock.advance(minutes=30)
    button = listed.buttons()[0]
    press = Invocation(actor=ALICE, surface="slack", action_id=button.action_id, value=button.value)
    ended = router.run(press)
    assert ended is not None
    check_contract("end", ended)
    assert "Ended mw-1 on server vps1 early" in shown(ended)
    assert "paging is back on" in shown(ended)
    assert m.get(1).status(clock.now) == "ended" and m.get(1).ended_by == ALICE

    # By name: every open window on it (acme's planned one is cancelled).
    cancelled = shown(say(router, ALICE, "maintenance end acme"))
    assert "Cancelled mw-2 on customer acme" in cancelled
    assert m.get(2).cancelled
    with pytest.raises(DbopsError) as again:
        router.run(Invocation(ALICE, "shell", "maintenance end 1"))
    assert "already ended" in again.value.message
    assert kinds(router) == [
        "maintenance.created",
        "maintenance.created",
        "maintenance.created",
        "maintenance.ended",
        "maintenance.cancelled",
    ]

    text = shown(say(router, BOB, "maintenance list"))
    assert "In maintenance now (1)" in text and "Ended in the last 24 h (2)" in text
    assert f"ended by {ALICE}" in text and "cancelled by" in text
    clock.advance(days=2)
    assert "mw-1" not in shown(say(router, BOB, "maintenance list"))


def test_a_list_of_sixty_windows_and_a_crowded_server_still_fit(
    sqlite_engine: Engine, clock: Clock
) -> None:
    seed(sqlite_engine, extra=45)
    rt = make_runtime(sqlite_engine, clock)
    router = make_router(rt)
    m = windows(router)
    long_reason = "rebuild the indexes after the upgrade <!channel> & " + "x" * 400
    for i in range(60):
        m.schedule(
            ["vps1", "vps2", "acme", "hooli"][i % 4],
            "1h30m",
            f"{i}: {long_reason}",
            actor=ALICE,
            starts_at=T0 + timedelta(hours=i % 3),
        )
    listed = say(router, BOB, "maintenance list")  # check_contract: the stub's own rules
    text = shown(listed)
    assert text.count("• mw-") == mc.LIST_MAX
    assert (
        f"and {60 - mc.LIST_MAX} more not shown here: `/db maintenance list <server|customer>`"
        in text
    )
    assert "In maintenance now (20)" in text and "Planned (40)" in text
    assert len(listed.buttons()) == mc.BUTTONS_MAX
    assert "<!channel>" not in json.dumps(listed.message())
    assert "…" in text  # each reason clipped, the whole one is in the announcement

    # The announcement of a window on a server with 47 customers names 20 and counts them all.
    said = shown(say(router, ALICE, "maintenance vps1 1h " + "y" * 400))
    assert "and 27 more (47)" in said
    rt.close()


def test_the_form_in_the_shell_says_what_to_type(router: Router) -> None:
    reply = say(router, ALICE, "maintenance")
    assert reply.view is not None and reply.view["callback_id"] == mc.FORM_ID
    assert_view_ok(reply.view, "the maintenance form")
    text = shown(reply)
    assert "/db maintenance <server|customer> <duration> [--at <time>] [--notify]" in text
    assert mc.EXAMPLE in text and "America/New_York" in text
    assert reply.ephemeral
    assert say(router, ALICE, "maintenance schedule").view == reply.view
    # Flags typed with nothing else fill the form in.
    view = say(router, ALICE, f"maintenance --at {TOMORROW_2AM} --notify").view
    assert view is not None
    (start,) = [b for b in view["blocks"] if b.get("block_id") == mc.START_BLOCK]
    assert start["element"]["initial_date_time"] == int(
        datetime(2026, 3, 3, 7, tzinfo=UTC).timestamp()
    )
    (notify,) = [b for b in view["blocks"] if b.get("block_id") == mc.NOTIFY_BLOCK]
    assert notify["element"]["initial_options"][0]["value"] == mc.NOTIFY_VALUE
    assert kinds(router) == []


# --- Slack: the announcement, its thread, the modal -----------------------------------------------


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture
def slack_router(sqlite_engine: Engine, clock: Clock, stub: SlackStub) -> Iterator[Router]:
    seed(sqlite_engine)
    rt = make_runtime(sqlite_engine, clock, slack_bot_token=BOT_TOKEN, slack_api_url=stub.base_url)
    yield make_router(rt)
    rt.close()


def test_the_announcement_goes_to_the_ops_channel_and_the_summary_in_its_thread(
    slack_router: Router, stub: SlackStub, clock: Clock
) -> None:
    router = slack_router
    reply = say(router, ALICE, "maintenance vps1 2h kernel upgrade", surface="slack")
    (posted,) = stub.messages(OPS)
    assert "Maintenance mw-1" in posted["text"] and "kernel upgrade" in posted["text"]
    body = json.dumps(posted["blocks"])
    assert f"<@{ALICE}>" in body and "acme, globex (2)" in body
    w = windows(router).get(1)
    assert (w.announcement_channel, w.announcement_ts) == (posted["channel"], posted["ts"])
    assert f"<#{posted['channel']}>" in reply.blocks[0].to_dict()["text"]["text"]
    assert "Scheduled mw-1 on vps1" in reply.text

    clock.advance(minutes=40)
    say(router, ALICE, "maintenance end mw-1", surface="slack")
    note = [x for x in stub.messages(OPS) if x.get("thread_ts") == posted["ts"]]
    assert len(note) == 1 and "ended early" in note[0]["text"]

    # The scheduler's sweep posts the summary under the announcement.
    worker = Worker(router.rt)
    try:
        assert worker.maintenance_close() == [1]
    finally:
        worker.checkpointer.close()
    thread = [x for x in stub.messages(OPS) if x.get("thread_ts") == posted["ts"]]
    assert len(thread) == 2 and "Maintenance mw-1 on server vps1 is over" in thread[1]["text"]
    assert windows(router).get(1).summary_posted_at is not None


def test_a_failed_announcement_keeps_the_window_and_says_so(
    slack_router: Router, stub: SlackStub
) -> None:
    stub.fail_next(1, "chat.postMessage", error="channel_not_found")
    reply = say(slack_router, ALICE, "maintenance vps1 2h kernel upgrade", surface="slack")
    assert "Could not post this in #db-ops" in shown(reply)
    assert "Maintenance mw-1 on server vps1" in shown(reply)
    assert windows(slack_router).get(1).announcement_ts is None


def form_of(stub: SlackStub, trigger: str) -> dict[str, Any]:
    """The form opened on ``trigger`` (directly, or in place of a placeholder)."""
    opened = stub.wait_for(lambda c: c.kind == "views.open" and c.body["trigger_id"] == trigger)
    assert opened.ok, opened.error
    call = opened
    if view_of(opened).get("callback_id") != mc.FORM_ID:
        call = stub.wait_for(
            lambda c: c.kind == "views.update" and view_of(c).get("callback_id") == mc.FORM_ID
        )
    return dict(view_of(call), id=call.body.get("view_id") or f"V{uuid.uuid4().hex[:10].upper()}")


def view_of(call: Any) -> dict[str, Any]:
    view = call.body["view"]
    return dict(json.loads(view) if isinstance(view, str) else view)


def state(
    target: str = "",
    duration: str = "",
    reason: str = "",
    start: int | None = None,
    notify: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        mc.TARGET_BLOCK: {mc.TARGET_ACTION: {"type": "plain_text_input", "value": target}},
        mc.START_BLOCK: {mc.START_ACTION: {"type": "datetimepicker", "selected_date_time": start}},
        mc.DURATION_BLOCK: {mc.DURATION_ACTION: {"type": "plain_text_input", "value": duration}},
        mc.REASON_BLOCK: {mc.REASON_ACTION: {"type": "plain_text_input", "value": reason}},
        mc.NOTIFY_BLOCK: {
            mc.NOTIFY_ACTION: {
                "type": "checkboxes",
                "selected_options": [{"value": mc.NOTIFY_VALUE}] if notify else [],
            }
        },
    }


def test_the_modal_schedules_and_announces_a_window(slack_router: Router, stub: SlackStub) -> None:
    router = slack_router
    slack = SlackApp(router, stub)
    trigger, token = stub.trigger(), uuid.uuid4().hex
    channel = "C0DBOPSCMD"
    tomorrow = int(datetime(2026, 3, 3, 7, 0, tzinfo=UTC).timestamp())
    acks: list[dict[str, Any]] = []

    async def scenario() -> None:
        try:
            # bob cannot even open it.
            bob = uuid.uuid4().hex
            await slack.send(
                slash_body("maintenance", user=BOB, response_url=stub.response_url(bob))
            )
            (denied,) = stub.replies_to(bob)
            assert "operator" in denied.text
            body = slash_body(
                "maintenance",
                user=ALICE,
                trigger_id=trigger,
                response_url=stub.response_url(token),
                channel=channel,
            )
            assert (await slack.send(body))[0] == 200
            view = form_of(stub, trigger)
            assert json.loads(view["private_metadata"])["channel"] == channel
            assert stub.replies_to(token) == []  # the form is the answer

            async def submit(values: dict[str, Any]) -> dict[str, Any]:
                status, ack = await slack.send(view_submission_body(view, values, user=ALICE))
                assert status == 200
                acks.append(ack)
                return ack

            # Every field wrong: the modal stays open, each error under its field.
            ack = await submit(state("vps9", "an hour", "  ", int(T0.timestamp()) - 3600))
            assert ack["response_action"] == "errors"
            errors = ack["errors"]
            assert set(errors) == {"target", "duration", "reason", "start"}
            assert "vps9" in errors["target"] and "vps1" in errors["target"]
            assert "not a duration" in errors["duration"]
            assert "in the past" in errors["start"]
            assert all(len(e) <= mc.ERROR_MAX for e in errors.values())
            ack = await submit(state("acme", "8d", "--force it", tomorrow))
            assert set(ack["errors"]) == {"duration", "reason"}
            ack = await submit(state("acme", "90m", "move acme's disk", tomorrow, notify=True))
            assert set(ack["errors"]) == {"notify"} and "SMTP" in ack["errors"]["notify"]
            assert windows(router).windows(T0) == []

            # Right: the modal says it is under way, the window is scheduled after the ack.
            ack = await submit(state("acme", "90m", "move acme's disk & <reindex>", tomorrow))
            assert ack["response_action"] == "update"
            assert "Scheduling the window on *acme*" in json.dumps(ack["view"])
        finally:
            await slack.close()

    asyncio.run(scenario())
    w = windows(router).get(1)
    assert (w.target, w.reason, w.created_by) == ("acme", "move acme's disk & <reindex>", ALICE)
    assert w.starts_at == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
    assert w.ends_at - w.starts_at == timedelta(minutes=90)
    (posted,) = stub.messages(OPS)
    assert (w.announcement_channel, w.announcement_ts) == (posted["channel"], posted["ts"])
    assert "&lt;reindex&gt;" in json.dumps(posted["blocks"])  # shown, never markup
    (said,) = stub.replies_to(token)
    assert said.body["response_type"] == "in_channel" and "Scheduled mw-1 on acme" in said.text
    (form,) = router.events.query(kind="form", limit=10)
    assert form.actor == ALICE and form.payload["form"] == mc.FORM_ID
    assert kinds(router) == ["maintenance.created"]


def test_the_form_line_parses_back_to_what_was_chosen(router: Router) -> None:
    form = mc.FormInput("ACME", "1h30m", "move acme's disk", int(T0.timestamp()) + 86400, False)
    line, errors = mc.check_form(router.rt, form)
    assert errors == {} and line is not None
    command = parse(line, router.registry)
    assert command.spec.name == "maintenance"
    assert dict(command.args) == {
        "target": "acme",
        "duration": "1h30m",
        "at": "2026-03-03T14:00:00Z",
        "reason": "move acme's disk",
    }
    # A reason that would make the line too long for the router is refused in the form.
    line, errors = mc.check_form(router.rt, mc.FormInput("vps1", "2h", "z" * 495, None, False))
    assert line is None and "under" in errors[mc.REASON_BLOCK]


# --- the shell: `dbops shell`, piped --------------------------------------------------------------


def test_the_shell_plans_lists_and_cancels(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dbops.db'}"
    engine = make_engine(url)
    upgrade(engine)
    seed(engine)
    engine.dispose()
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[servers]]\nname = "vps1"\ndsn = "host=127.0.0.1 port=1"\n\n'
        '[[servers]]\nname = "vps2"\ndsn = "host=127.0.0.1 port=1"\n'
    )
    at = (datetime.now(NY) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    script = "\n".join(
        [
            f"/db maintenance vps1 2h --at {at} kernel upgrade",
            "/db maintenance list",
            "press 1",
            "/db maintenance",
            "/db maintenance vps1 2h --notify kernel upgrade",
            "",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "DBOPS_", "SMTP"))}
    env.update(
        DATABASE_URL=url,
        DBOPS_FLEET=str(fleet),
        DBOPS_OPERATORS="U_ALICE",
        TIMEZONE=str(NY),
        OPS_CHANNEL=OPS,
    )
    done = subprocess.run(
        [str(Path(sys.executable).with_name("dbops")), "shell", "--as", "U_ALICE"],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Maintenance mw-1 on server vps1, planned by U_ALICE" in out
    assert f"{at[:10]}" in out and "Customers affected: acme, globex (2)" in out
    assert "Planned (1)" in out and "[1] Cancel mw-1" in out
    assert "Cancelled mw-1 on customer" not in out and "Cancelled mw-1 on server vps1" in out
    assert "Schedule a maintenance window" in out and mc.EXAMPLE in out
    assert "SMTP" in out and "Maintenance mw-2" not in out
