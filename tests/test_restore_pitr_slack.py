"""`/db restore <customer> --to <time>` from Slack and the shell, on the session sandbox (whose
clusters archive their WAL with pgBackRest): point-in-time recovery's surface (issue 17).

Carol (an admin) asks for a customer's database as it was at a moment. Before anything happens
she sees the plan: the target, the recovery window, the nearest base backup, the WAL to replay,
the disk needed against the disk free; in Slack as a modal with a box for the customer's name,
in the shell as the same lines and the line to type. A target before the window, one in the
future, and a disk too small are each refused, saying what can be restored instead, and nothing
is changed: the database as it was, no scratch instance left, the refusal in the event log.
Alice (an operator) and Bob (a viewer) cannot restore. The end-to-end restore through the
modal (about a minute: a scratch instance recovered to T) is marked heavy (`make test-heavy`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine

import core.pitr
from bot.commands.roles import Denied
from bot.commands.router import Invocation, Router, UsageError
from bot.shell import render_blocks
from bot.views import render
from core import pitr
from core.customers import Customer, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet, Server
from core.remote import Runner, RunnerPool
from core.report import worst_rpo
from core.units import pretty_age, pretty_bytes
from tests.bot_kit import ALICE, BOB, CAROL, make_router, runtime
from tests.slack_app import SlackApp
from tests.slack_stub import Call, SlackStub, slash_body, view_submission_body
from tests.synthetic_fleet import fleet_report
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    Seeded,
    query,
    restore_server_logs,
    seeded_customer,
)
from tests.test_blocks_contract import check_contract
from tests.test_pitr import (  # noqa: F401  (pool, two_customers: fixtures)
    SERVER,
    _scratch_dirs,
    _scratch_processes,
    _server,
    pool,
    two_customers,
)
from tests.test_restore import database

OPS = "C0DBOPS"
NY = ZoneInfo("America/New_York")
FORM = "db_restore_to"


def utc(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture
def customer(sandbox: dict[str, Any]) -> Iterator[Seeded]:
    with seeded_customer(sandbox, SERVER, prefix="pitrs") as seeded:
        yield seeded


@pytest.fixture
def router(sandbox_fleet: Fleet, sqlite_engine: Engine, customer: Seeded) -> Iterator[Router]:
    """The bot (TIMEZONE America/New_York) with the customer on vps1."""
    c = customer
    upsert_customers(sqlite_engine, [Customer(c.name, SERVER, c.name, c.name, "small")])
    router = make_router(runtime(sqlite_engine, sandbox_fleet, timezone="America/New_York"))
    yield router
    router.rt.close()


def snapshot(c: Seeded) -> tuple[Any, ...]:
    """The customer's database as a restore would change it: which database, and its rows."""
    return (
        database(c),
        query(c.conninfo, "SELECT count(*), sum(id) FROM accounts")[0],
        query(c.conninfo, "SELECT count(*) FROM orders")[0][0],
    )


def restore_events(router: Router, name: str) -> list[Any]:
    return [e for e in router.events.about([name], limit=500) if e.kind.startswith("restore.")]


# --- parsing: nothing read ----------------------------------------------------------------------


def test_to_takes_one_iso_moment_and_no_backup_beside_it(router: Router, customer: Seeded) -> None:
    def run(text: str) -> Any:
        return router.run(Invocation(CAROL, "shell", text=text))

    with pytest.raises(UsageError, match="not a time"):
        run(f"restore {customer.name} --to yesterday")
    # The calendar's ends: a clear error, not a crash (in UTC when parsed, in TIMEZONE after).
    with pytest.raises(UsageError, match="out of range"):
        run(f"restore {customer.name} --to 0001-01-01T00:00+05:00")
    with pytest.raises(DbopsError, match="out of range"):
        run(f"restore {customer.name} --to 9999-12-31T23:59:59")
    # `--to 2026-11-22 09:30`: the words split at the space; said so, not "not a backup name".
    with pytest.raises(UsageError, match="time of day") as caught:
        run(f"restore {customer.name} --to 2026-11-22 09:30")
    assert "2026-11-22T09:30" in str(caught.value.hint)
    with pytest.raises(UsageError, match="not both"):
        run(f"restore {customer.name} 20261122T070000Z --to 2026-11-22T09:30Z")
    assert restore_events(router, customer.name) == []


# --- the plan: the shell's lines, the roles ------------------------------------------------------


def test_the_shell_shows_the_plan_and_the_line_to_type(router: Router, customer: Seeded) -> None:
    before = snapshot(customer)
    # A moment without an offset is read in TIMEZONE (America/New_York here), not in UTC:
    # read as UTC it would be hours away, in the future or the past.
    # (Now, to the second: the window starts at a whole second, at the latest now.)
    local = datetime.now(NY).replace(tzinfo=None, microsecond=0)
    target = local.replace(tzinfo=NY)
    typed = f"restore {customer.name} --to {local.isoformat()}"
    for user in (ALICE, BOB):  # the operator and the viewer: no plan, nothing read
        with pytest.raises(Denied, match="admin"):
            router.run(Invocation(user, "shell", text=typed))

    reply = router.run(Invocation(CAROL, "shell", text=typed))

    assert reply is not None and reply.ephemeral
    check_contract(typed, reply)
    line = f"/db restore {customer.name} --to {utc(target)} --confirm {customer.name}"
    assert line in reply.text
    # The same reply carries the modal (Slack opens it; the shell prints the blocks).
    assert reply.view is not None and reply.view["callback_id"] == FORM
    assert json.loads(reply.view["private_metadata"]) == {
        "customer": customer.name,
        "to": utc(target),
    }
    printed, _ = render_blocks(reply.blocks)  # as `dbops shell` prints it
    facts = {ln.split(":")[0].lstrip("• "): ln for ln in printed.splitlines() if ": " in ln}
    assert f"Target: {utc(target)} ({customer.name} on {SERVER})" in facts["Target"]
    assert facts["Recoverable"].count("Z") == 2  # the window: from .. to, in UTC
    assert "Base backup: " in facts["Base backup"] and "ended" in facts["Base backup"]
    assert "segment(s)" in facts["WAL to replay"]
    assert "needs ~" in facts["Disk"] and " free" in facts["Disk"]
    assert line in printed
    # Local time too, for the person reading it.
    assert local.strftime("%Y-%m-%d %H:%M:%S") in printed and ("EST" in printed or "EDT" in printed)
    # A look changes nothing.
    assert snapshot(customer) == before
    assert restore_events(router, customer.name) == []
    denied = router.events.query(kind="auth.denied", limit=10)
    assert sorted(str(e.actor) for e in denied) == sorted([ALICE, BOB])


# --- refusals: each says why and what instead; nothing changes ------------------------------------


def test_refusals_say_what_can_be_restored_and_change_nothing(
    router: Router,
    customer: Seeded,
    sandbox_fleet: Fleet,
    pool: RunnerPool,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _server(sandbox_fleet)
    window = pitr.recovery_window(pool.get(SERVER), server)
    assert window is not None
    before = snapshot(customer)
    name = customer.name

    def refused(target: datetime, said: str, *, confirmed: bool = False) -> str:
        """The refusal of the plan (what `/db restore <customer> --to T` answers, in the shell
        and in place of the modal), or of the restore typed with its confirmation (which plans
        again: the disk may have filled since the look)."""
        text = f"restore {name} --to {utc(target)}" + (f" --confirm {name}" if confirmed else "")
        with pytest.raises(DbopsError, match=said) as caught:
            router.run(Invocation(CAROL, "shell", text=text))
        error = caught.value
        assert "nothing was changed" in error.message
        # What to do instead: the window, from its earliest to now.
        assert error.hint is not None
        assert utc(window.earliest) in error.hint and "to now" in error.hint
        return str(error)

    said = refused(window.earliest - timedelta(hours=1), "before the recovery window")
    assert "/db backups" in said  # the nightly dumps may reach further back
    refused(datetime.now(UTC) + timedelta(hours=1), "in the future")

    # A disk too small for the scratch instance: df says 1 MB free where it would go.
    def small_disk(runner: Runner, srv: Server, path: str) -> tuple[int, int]:
        assert path == pitr.scratch_root(srv)
        return 100 << 30, 1 << 20

    monkeypatch.setattr(core.pitr, "read_free_space", small_disk)
    for confirmed in (False, True):
        said = refused(datetime.now(UTC), "not enough disk", confirmed=confirmed)
        assert f"{pretty_bytes(1 << 20)} free" in said and "Free space there first" in said
    monkeypatch.undo()

    # Nothing changed: the same database with the same rows, no scratch instance, and the log
    # has each refusal (three of the plan, one of the confirmed restore) and no restore begun.
    assert snapshot(customer) == before
    assert _scratch_dirs(server) == [] and _scratch_processes(server) == []
    found = restore_events(router, name)
    assert [e.kind for e in found] == ["restore.refused"] * 4, found
    for said_, times in (("before the recovery window", 1), ("in the future", 1), ("disk", 2)):
        assert sum(said_ in e.payload["reason"] for e in found) == times, found


# --- the modal --------------------------------------------------------------------------------


def _view(call: Call) -> dict[str, Any]:
    view = call.body["view"]
    return dict(json.loads(view) if isinstance(view, str) else view)


def form_of(stub: SlackStub, trigger: str) -> dict[str, Any]:
    """The form opened on ``trigger``: directly, or in place of the placeholder opened first
    while the plan was read (the trigger lasts 3 seconds)."""
    opened = stub.wait_for(lambda c: c.kind == "views.open" and c.body["trigger_id"] == trigger)
    if _view(opened).get("callback_id") != FORM:
        opened = stub.wait_for(
            lambda c: c.kind == "views.update" and _view(c).get("callback_id") == FORM
        )
    return dict(_view(opened), id=opened.body.get("view_id") or f"V{uuid.uuid4().hex[:10]}")


def typed_name(name: str) -> dict[str, dict[str, dict[str, Any]]]:
    return {"confirm": {"typed": {"type": "plain_text_input", "value": name}}}


async def open_form(slack: SlackApp, stub: SlackStub, text: str, token: str) -> dict[str, Any]:
    trigger = stub.trigger()
    body = slash_body(
        text, user=CAROL, trigger_id=trigger, response_url=stub.response_url(token), channel=OPS
    )
    assert (await slack.send(body))[0] == 200
    return form_of(stub, trigger)


def test_the_modal_shows_the_plan_and_wants_the_name_typed(
    router: Router, stub: SlackStub, customer: Seeded
) -> None:
    before = snapshot(customer)
    target = datetime.now(UTC)  # inside the window, whenever the sandbox started
    asyncio.run(_modal_scenario(router, stub, customer, target))
    assert snapshot(customer) == before
    assert [e.kind for e in restore_events(router, customer.name)] == ["restore.refused"]


async def _modal_scenario(
    router: Router, stub: SlackStub, customer: Seeded, target: datetime
) -> None:
    slack = SlackApp(router, stub)
    token = uuid.uuid4().hex
    try:
        view = await open_form(slack, stub, f"restore {customer.name} --to {utc(target)}", token)
        text = json.dumps(view["blocks"])
        for said in ("Target: ", "Recoverable: ", "Base backup: ", "WAL to replay: ", "Disk: "):
            assert said in text, said
        assert utc(target) in text and "needs ~" in text
        (box,) = [b for b in view["blocks"] if b.get("type") == "input"]
        assert box["block_id"] == "confirm" and customer.name in box["label"]["text"]
        meta = json.loads(view["private_metadata"])
        assert (meta["customer"], meta["to"], meta["channel"]) == (customer.name, utc(target), OPS)
        assert stub.replies_to(token) == []  # the form is the answer
        assert not stub.refused()

        # A slip of the keyboard: the modal stays open with the error; nothing is restored.
        submit = view_submission_body(view, typed_name(customer.name + "x"), user=CAROL)
        status, ack = await slack.send(submit)
        assert status == 200 and ack["response_action"] == "errors"
        assert customer.name in ack["errors"]["confirm"]
        (refusal,) = router.events.query(kind="restore.refused", limit=10)
        assert refusal.payload["form"] == FORM and refusal.actor == CAROL

        # The name typed right by an operator (a form passed on): the modal says it is under
        # way, and the router's role check refuses it after the ack; nothing is restored.
        token = uuid.uuid4().hex
        view["private_metadata"] = json.dumps({**meta, "response_url": stub.response_url(token)})
        submit = view_submission_body(view, typed_name(customer.name), user=ALICE)
        status, ack = await slack.send(submit)
        assert status == 200 and ack["response_action"] == "update"
        assert utc(target) in json.dumps(ack["view"])
        (denied,) = stub.replies_to(token)
        assert "admin" in denied.body["text"].lower()
        (form,) = router.events.query(kind="form", limit=10)
        line = f"restore {customer.name} --to {utc(target)} --confirm {customer.name}"
        assert (form.actor, form.payload["form"], form.payload["text"]) == (ALICE, FORM, line)
    finally:
        await slack.close()


# --- the morning report's worst RPO -------------------------------------------------------------


def test_the_slack_morning_report_has_the_worst_rpo_on_its_own_line() -> None:
    report = fleet_report(4, 3, seed=7)
    databases = report["databases"]
    for i, d in enumerate(databases):
        if d["server"] != "vps002":  # one server without archiving
            d["recovery"] = {"earliest": "x", "latest": "y", "rpo_seconds": 40 + i}
    report["worst_rpo"] = worst_rpo(databases)
    worst, without = report["worst_rpo"]["rpo_seconds"], report["worst_rpo"]["without_recovery"]
    assert worst is not None and without > 0
    (line,) = [ln for ln in _report_lines(report) if "Worst RPO" in ln]
    server = next(
        d["server"] for d in databases if (d["recovery"] or {}).get("rpo_seconds") == worst
    )
    assert line.startswith(f":warning: Worst RPO: {pretty_age(worst)} ({server})"), line
    assert f"{without} databases without point-in-time recovery" in line
    # Every database covered: no warning, no count.
    for d in databases:
        d["recovery"] = {"earliest": "x", "latest": "y", "rpo_seconds": 30}
    report["worst_rpo"] = worst_rpo(databases)
    (line,) = [ln for ln in _report_lines(report) if "Worst RPO" in ln]
    assert line.startswith(":white_check_mark: Worst RPO: ") and "without" not in line
    # None covered: said as such.
    for d in databases:
        d["recovery"] = None
    report["worst_rpo"] = worst_rpo(databases)
    (line,) = [ln for ln in _report_lines(report) if "Worst RPO" in ln]
    assert "no point-in-time recovery" in line and f"{len(databases)} databases" in line
    # A report made before recovery was measured: no line.
    del report["worst_rpo"]
    assert not [ln for ln in _report_lines(report) if "RPO" in ln]


def _report_lines(report: dict[str, Any]) -> list[str]:
    reply = render.report_reply(report, NY)
    check_contract("report", reply)
    sections = [b for b in reply.message()["blocks"] if b["type"] == "section"]
    return "\n".join(b["text"]["text"] for b in sections).splitlines()


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.heavy
def test_restore_to_a_moment_through_the_modal(
    sandbox_fleet: Fleet,
    sqlite_engine: Engine,
    stub: SlackStub,
    two_customers: tuple[Seeded, Seeded],  # noqa: F811
) -> None:
    one, other = two_customers
    router = make_router(runtime(sqlite_engine, sandbox_fleet, timezone="America/New_York"))
    server = _server(sandbox_fleet)
    ledger = "SELECT count(*), sum(id) FROM ledger"
    query(one.conninfo, "CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    query(one.conninfo, "INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 50) g")
    at_t = (snapshot(one)[1:], query(one.conninfo, ledger)[0])
    target = datetime.now(UTC)
    time.sleep(0.01)  # the work below commits strictly after T
    query(one.conninfo, "DROP TABLE ledger")
    query(one.conninfo, "INSERT INTO accounts (email) VALUES ('after-t@example.com')")
    query(other.conninfo, "INSERT INTO accounts (email) VALUES ('other-after-t@example.com')")
    other_after = query(other.conninfo, "SELECT count(*) FROM accounts")[0][0]
    replaced = database(one)
    token = uuid.uuid4().hex

    async def scenario() -> None:
        slack = SlackApp(router, stub)
        try:
            view = await open_form(slack, stub, f"restore {one.name} --to {utc(target)}", token)
            submit = view_submission_body(view, typed_name(one.name), user=CAROL)
            status, ack = await slack.send(submit)  # the restore is done when send returns
            assert status == 200 and ack["response_action"] == "update"
        finally:
            await slack.close()

    try:
        asyncio.run(scenario())
        (said,) = stub.replies_to(token)
        assert said.body["response_type"] == "in_channel"
        assert f"Restored {one.name} to {utc(target)}" in said.body["text"], said.body["text"]
        assert "kept as" in said.text
        # The database as it was at T: the ledger back, the work after T gone.
        assert (snapshot(one)[1:], query(one.conninfo, ledger)[0]) == at_t
        gone = "SELECT count(*) FROM accounts WHERE email = 'after-t@example.com'"
        assert query(one.conninfo, gone)[0][0] == 0
        now = database(one)
        assert now is not None and replaced is not None and now["oid"] != replaced["oid"]
        # The other customer on the same server: its work after T still there.
        assert query(other.conninfo, "SELECT count(*) FROM accounts")[0][0] == other_after
        # No scratch instance left; the log has the dump taken from it, then the swap.
        assert _scratch_dirs(server) == [] and _scratch_processes(server) == []
        kinds = [e.kind for e in restore_events(router, one.name)]
        assert "restore.pitr_dumped" in kinds and kinds[-1] == "restore.done", kinds
        (done,) = router.events.query(kind="restore.done", limit=10)
        assert done.actor == CAROL
        (dumped,) = router.events.query(kind="restore.pitr_dumped", limit=10)
        status = json.loads((Path(dumped.payload["path"]) / "status").read_text())
        assert status["source"] == "pitr" and status["target"] == utc(target)
    finally:
        router.rt.close()
