"""Restore from Slack, end to end on the sandbox: `/db restore`, the modal, the typed name.

Carol (an admin) types `/db restore <customer>` after a bad deploy; Slack (our stub) gets a
placeholder modal on the command's trigger and then the form: the newest restore-tested backup
chosen, a box for the name. A wrong name keeps the modal open and restores nothing; the right
one restores over SSH into a new database, swaps it in, and posts the result in the channel. The
same submit delivered twice restores once. On an incident card the Restore button names the
backup and opens the same form. Bob (a viewer) and Alice (an operator) cannot restore.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.commands.roles import Denied
from bot.commands.router import Invocation, Router, UsageError
from core.customers import Customer, customer_from_mapping, upsert_customers
from core.fleet import Fleet
from storage.db import make_engine
from storage.migrate import upgrade
from tests.bot_kit import ALICE, BOB, CAROL, make_router, runtime
from tests.slack_app import SlackApp
from tests.slack_stub import (
    BOT_TOKEN,
    Call,
    SlackStub,
    action_body,
    slash_body,
    view_submission_body,
)
from tests.test_backups import (  # noqa: F401  (restore_server_logs: autouse)
    EXPECTED_ROWS,
    Seeded,
    live_counts,
    restore_server_logs,
    seeded_customer,
)
from tests.test_blocks_contract import check_contract
from tests.test_restore import bad_deploy, database

OPS = "C0DBOPS"


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture
def customer(sandbox: dict[str, Any]) -> Iterator[Seeded]:
    with seeded_customer(sandbox, "vps3", prefix="rsl") as seeded:
        yield seeded


@pytest.fixture
def router(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, customer: Seeded, tmp_path: Path
) -> Iterator[Router]:
    engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    upsert_customers(engine, [Customer(customer.name, "vps3", customer.name, customer.name)])
    rt = runtime(engine, sandbox_fleet, timezone="America/New_York")
    yield make_router(rt)
    rt.close()
    engine.dispose()


@pytest.fixture
def tested_backup(router: Router, customer: Seeded) -> str:
    """A backup of the customer that has passed its restore test, then the bad deploy."""
    backups = router.rt.backups
    taken = backups.take_backup(customer.name, CAROL)
    assert backups.verify(customer.name, actor="scheduler").verification.ok
    bad_deploy(customer)
    assert live_counts_or_none(customer) != EXPECTED_ROWS
    return taken.stamp


def live_counts_or_none(c: Seeded) -> dict[str, int] | None:
    try:
        return live_counts(c.conninfo)
    except Exception:  # the bad deploy dropped a table live_counts does not read
        return None


def form_of(stub: SlackStub, trigger: str) -> Call:
    """The form opened on ``trigger``: directly (the backups were read in time), or in place of
    a placeholder opened first (tests/test_forms.py holds each path on purpose)."""
    opened = stub.wait_for(lambda c: c.kind == "views.open" and c.body["trigger_id"] == trigger)
    if _view(opened).get("callback_id") == "db_restore":
        return opened
    assert "…" in json.dumps(opened.body["view"], ensure_ascii=False)  # the placeholder
    return stub.wait_for(
        lambda c: c.kind == "views.update" and _view(c).get("callback_id") == "db_restore"
    )


def _view(call: Call) -> dict[str, Any]:
    view = call.body["view"]
    return dict(json.loads(view) if isinstance(view, str) else view)


def view_of(call: Call) -> dict[str, Any]:
    return dict(_view(call), id=call.body.get("view_id") or f"V{uuid.uuid4().hex[:10].upper()}")


def values(backup: str, typed: str) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        "backup": {"backup": {"type": "static_select", "selected_option": {"value": backup}}},
        "confirm": {"typed": {"type": "plain_text_input", "value": typed}},
    }


def restores_started(router: Router, name: str) -> int:
    return sum(1 for e in router.events.about([name], limit=500) if e.kind == "restore.started")


def test_restore_end_to_end_from_the_modal(
    router: Router, stub: SlackStub, customer: Seeded, tested_backup: str
) -> None:
    slack = SlackApp(router, stub)
    trigger = stub.trigger()
    token = uuid.uuid4().hex
    before = database(customer)

    async def scenario() -> None:
        try:
            body = slash_body(
                f"restore {customer.name}",
                user=CAROL,
                trigger_id=trigger,
                response_url=stub.response_url(token),
                channel=OPS,
            )
            assert (await slack.send(body))[0] == 200
            view = view_of(form_of(stub, trigger))
            # The form: the facts, the restore-tested backup chosen, a box for the name.
            assert view["callback_id"] == "db_restore"
            text = json.dumps(view["blocks"])
            assert tested_backup in text and "restore test ok" in text
            (select,) = [b for b in view["blocks"] if b.get("block_id") == "backup"]
            assert select["element"]["initial_option"]["value"] == tested_backup
            meta = json.loads(view["private_metadata"])
            assert meta["customer"] == customer.name and meta["channel"] == OPS
            assert stub.replies_to(token) == []  # the form is the answer, no message

            # A slip of the keyboard: the modal stays open with the error; nothing is restored.
            status, ack = await slack.send(
                view_submission_body(view, values(tested_backup, customer.name[:-1]), user=CAROL)
            )
            assert status == 200 and ack["response_action"] == "errors"
            assert customer.name in ack["errors"]["confirm"]
            assert database(customer) == before and restores_started(router, customer.name) == 0
            assert router.events.query(kind="restore.refused")

            # The name typed right: the modal says it is under way, the restore runs after.
            submit = view_submission_body(view, values(tested_backup, customer.name), user=CAROL)
            status, ack = await slack.send(submit)
            assert status == 200 and ack["response_action"] == "update"
            assert "Restoring" in json.dumps(ack["view"])
            # Slack delivering the same submit again (a retry) restores nothing more.
            assert (await slack.send(submit))[0] == 200
        finally:
            await slack.close()

    asyncio.run(scenario())
    (said,) = stub.replies_to(token)
    assert said.body["response_type"] == "in_channel"
    assert f"Restored {customer.name} from {tested_backup}" in said.body["text"]
    assert "kept as" in said.text
    # The backup's data is back under the customer's name; the bad deploy's database is kept.
    assert live_counts(customer.conninfo) == EXPECTED_ROWS
    now = database(customer)
    assert now is not None and before is not None and now["oid"] != before["oid"]
    assert restores_started(router, customer.name) == 1
    (form,) = router.events.query(kind="form", limit=10)
    assert form.actor == CAROL and form.payload["form"] == "db_restore"
    (done,) = router.events.query(kind="restore.done", limit=10)
    assert done.actor == CAROL and done.subject == customer.name
    assert router.events.query(kind="delivery.repeated", limit=10)
    # The response_url (a bearer capability) never reaches the event log.
    assert not [e for e in router.events.query(limit=500) if "/response/" in json.dumps(e.payload)]


def test_the_restore_button_on_an_incident_card_opens_the_form(
    router: Router, stub: SlackStub, customer: Seeded, tested_backup: str
) -> None:
    # The same bot with Slack: the card goes to the ops channel (the stub).
    rt = router.rt
    slack_rt = runtime(
        rt.engine,
        rt.fleet,
        events=rt.events,
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
        ops_channel=OPS,
        timezone="America/New_York",
    )
    router = make_router(slack_rt)
    try:
        router.run(Invocation(ALICE, "slack", text=f"incident open {customer.name} P1 rows lost"))
        card = stub.wait_for(
            lambda c: (
                c.kind == "chat.postMessage"
                and c.body.get("channel") == OPS
                and not c.body.get("thread_ts")
                and "rows lost" in c.body.get("text", "")
            )
        )
        card_blocks = card.body["blocks"]
        found = [
            el
            for block in (json.loads(card_blocks) if isinstance(card_blocks, str) else card_blocks)
            if block["type"] == "actions"
            for el in block["elements"]
            if el["action_id"] == "db_restore"
        ]
        (button,) = found
        assert button["value"] == f"restore {customer.name} {tested_backup}"
        assert tested_backup in button["text"]["text"] and "old" in button["text"]["text"]
        assert button["style"] == "danger" and "confirm" not in button  # the form confirms

        slack = SlackApp(router, stub)

        async def press(user: str) -> tuple[str, str]:
            token = uuid.uuid4().hex
            body = action_body(
                "db_restore", button["value"], user=user, response_url=stub.response_url(token)
            )
            trigger = json.loads(dict(_form(body))["payload"])["trigger_id"]
            assert (await slack.send(body))[0] == 200
            return token, trigger

        async def scenario() -> tuple[tuple[str, str], tuple[str, str]]:
            try:
                return await press(BOB), await press(CAROL)
            finally:
                await slack.close()

        (bob_token, bob_trigger), (_, carol_trigger) = asyncio.run(scenario())
        # Bob is told no, and no form opened for him.
        (denied,) = stub.replies_to(bob_token)
        assert "admin" in denied.body["text"].lower()
        assert not stub.find(
            lambda c: c.kind == "views.open" and c.body["trigger_id"] == bob_trigger
        )
        view = view_of(form_of(stub, carol_trigger))
        (select,) = [b for b in view["blocks"] if b.get("block_id") == "backup"]
        assert select["element"]["initial_option"]["value"] == tested_backup
    finally:
        slack_rt.close()


def _form(body: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(body)


def test_who_may_restore_and_what_the_shell_shows(
    router: Router, customer: Seeded, tested_backup: str
) -> None:
    def run(user: str, text: str) -> Any:
        reply = router.run(Invocation(user, "shell", text=text))
        assert reply is not None
        check_contract(text, reply)
        return reply

    for user in (BOB, ALICE):
        with pytest.raises(Denied):
            run(user, f"restore {customer.name}")
    with pytest.raises(UsageError, match="not a backup name"):
        run(CAROL, f"restore {customer.name} yesterday")
    with pytest.raises(UsageError):
        run(CAROL, f"restore {customer.name}; DROP DATABASE x")
    # Without Slack's modal the reply says the same and how to go ahead by typing.
    preview = run(CAROL, f"restore {customer.name}")
    line = f"/db restore {customer.name} {tested_backup} --confirm {customer.name}"
    assert line in preview.text and preview.ephemeral and preview.view is not None
    # The name typed wrong on the line: refused, nothing restored.
    before = database(customer)
    with pytest.raises(Exception, match="does not match"):
        run(CAROL, f"restore {customer.name} {tested_backup} --confirm {customer.name}x")
    assert database(customer) == before and restores_started(router, customer.name) == 0
