"""The outbox: what dbops sends to Slack is stored first, sent once, and never lost.

A card posted while Slack answers 429 for a minute arrives once, a minute later (the worker's
clock is moved, nothing sleeps). A worker SIGKILLed after Slack took its post, before it could
say so, leaves the row to another worker, which finds the post by its metadata instead of
posting it again. An update queued before its post has gone lands on that post once it has.
Two workers on one PostgreSQL never send a row twice. An ops channel that is gone reaches carol
(the admin) by DM and /healthz until a post there works again; failures about failures stop.
Slack is the strict stub, over real sockets; the databases are SQLite and the test PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, select, update
from sqlmodel import SQLModel

from bot.outbox import EVENT_TYPE, OutboxNotifier, build_outbox_notifier, forget_outbox_notifiers
from bot.slack.health import NOTICED
from bot.views import blocks
from bot.views.blocks import Reply
from core.notify import Message, NotifyError
from core.outbox import LEASE_S, Outbox, T, placeholder_id
from core.settings import Settings, load_settings
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.pgserver import Databases
from tests.slack_stub import BOT_TOKEN, DROP, SlackStub, dm_channel
from tests.test_healthz import app_for, health, serving

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

ROOT = Path(__file__).resolve().parents[1]
CAROL = "U_CAROL"  # the admin
OPS = "#db-ops"


class Clock:
    """The worker's clock, moved by the test; the stub's rate limits move with it."""

    def __init__(self, stub: SlackStub, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)
        self.stub = stub

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.stub.advance(seconds)


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    NOTICED.clear()
    forget_outbox_notifiers()
    with SlackStub() as s:
        yield s
    forget_outbox_notifiers()


def settings_for(stub: SlackStub, **extra: Any) -> Settings:
    return load_settings(
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
        ops_channel=OPS,
        dbops_admins=[CAROL],
        **extra,
    )


def notifier_for(
    engine: Engine, stub: SlackStub, clock: Clock | None = None, **kwargs: Any
) -> OutboxNotifier:
    return build_outbox_notifier(settings_for(stub), EventLog(engine), clock=clock, **kwargs)


def card(title: str) -> Message:
    """An incident card: words, and a button that must survive the wait."""
    ack = blocks.button("Ack", "db_incident_ack", f"incident ack {title}")
    return Message(
        text=f"P1 {title}",
        blocks=[blocks.section(f"*P1 {title}*").to_dict(), blocks.actions([ack]).to_dict()],
    )


def posted(stub: SlackStub, text: str, channel: str = OPS) -> list[dict[str, Any]]:
    """The messages in Slack now whose text is ``text``."""
    return [m for m in stub.messages(channel) if m.get("text") == text]


def post_calls(stub: SlackStub, text: str) -> list[Any]:
    return stub.find(lambda c: c.kind == "chat.postMessage" and c.body.get("text") == text)


def row_of(engine: Engine, ts: str) -> dict[str, Any]:
    row_id = placeholder_id(ts)
    with engine.connect() as conn:
        found = conn.execute(select(T).where(T.c.id == row_id)).one()
    return dict(found._mapping)


def test_the_migration_matches_the_model(engine: Engine) -> None:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert [d for d in diffs if "outbox" in repr(d)] == []


def test_a_card_posted_while_slack_rate_limits_for_a_minute_arrives_once(
    engine: Engine, stub: SlackStub
) -> None:
    clock = Clock(stub)
    notifier = notifier_for(engine, stub, clock)
    stub.rate_limit(60, "chat.postMessage")
    ref = notifier.post(OPS, card("inc-7: acme is down"))
    # Stored, not lost: the caller holds a reference it can update later.
    assert ref.ts.startswith("outbox:")
    row = row_of(engine, ref.ts)
    assert row["status"] == "pending" and row["error"] == "ratelimited"
    assert row["next_at"].replace(tzinfo=UTC) == clock.now + timedelta(seconds=60)
    assert len(post_calls(stub, "P1 inc-7: acme is down")) == 1  # the one 429

    clock.advance(30)  # Retry-After is honoured: nothing is tried before it has passed
    assert notifier.courier.run_once() == 0
    assert len(post_calls(stub, "P1 inc-7: acme is down")) == 1

    clock.advance(31)
    assert notifier.courier.run_once() == 1
    (message,) = posted(stub, "P1 inc-7: acme is down")
    assert message["blocks"][1]["elements"][0]["action_id"] == "db_incident_ack"
    assert message["metadata"] == {"event_type": EVENT_TYPE, "event_payload": {"key": row["key"]}}
    done = row_of(engine, ref.ts)
    assert (done["status"], done["ts"], done["attempts"]) == ("sent", message["ts"], 2)
    sent = EventLog(engine).query(kind="message.sent")
    assert [e.payload["ts"] for e in sent] == [message["ts"]]
    assert [e.payload["key"] for e in EventLog(engine).query(kind="message.queued")] == [row["key"]]
    assert notifier.courier.run_once() == 0  # and never again


def test_an_update_queued_before_its_post_lands_on_that_post(
    engine: Engine, stub: SlackStub
) -> None:
    clock = Clock(stub)
    notifier = notifier_for(engine, stub, clock)
    stub.rate_limit(60, "chat.postMessage")
    ref = notifier.post(OPS, Message("inc-8 opened"))
    notifier.update(ref, Message("inc-8 acknowledged by alice"))
    notifier.update(ref, Message("inc-8 resolved"))
    reply = notifier.post(ref.channel, Message("diagnostics of inc-8"), thread_ts=ref.ts)
    assert reply.ts.startswith("outbox:")
    assert stub.find(lambda c: c.kind == "chat.update") == []  # nothing to update yet

    clock.advance(61)
    notifier.courier.run_once()
    (message,) = [m for m in stub.messages(OPS) if "thread_ts" not in m]
    assert message["text"] == "inc-8 resolved"  # the newest update, on the right message
    updates = stub.find(lambda c: c.kind == "chat.update")
    assert [(u.body["ts"], u.body["text"]) for u in updates] == [(message["ts"], "inc-8 resolved")]
    (thread,) = posted(stub, "diagnostics of inc-8")
    assert thread["thread_ts"] == message["ts"]
    statuses = [r["status"] for r in _rows(engine)]
    assert statuses == ["sent", "superseded", "sent", "sent"]
    # A later update through the placeholder the caller kept still finds the message.
    notifier.update(ref, Message("inc-8 closed"))
    assert [m["text"] for m in stub.messages(OPS) if "thread_ts" not in m] == ["inc-8 closed"]


def _rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(T).order_by(T.c.id))]


def _start_worker(db_url: str, stub: SlackStub, owner: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.outbox_proc",
            "--db",
            db_url,
            "--api",
            stub.base_url,
            "--owner",
            owner,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("slack_took_it", [True, False], ids=["after-slack-took-it", "before"])
def test_a_worker_killed_mid_send_sends_it_once(
    db_url: str, engine: Engine, stub: SlackStub, slack_took_it: bool
) -> None:
    outbox = Outbox(engine, EventLog(engine), owner="the-test")
    body = notifier_for(engine, stub).render.body(card("inc-9: globex is down"))
    row = outbox.enqueue("post", OPS, body, claim=False)
    hold = stub.hold_next("chat.postMessage", accept=slack_took_it)
    worker = _start_worker(db_url, stub, owner="doomed")
    try:
        assert hold.reached.wait(30), "the worker process never sent the post"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        hold.release()
    dying = outbox.get(row.id)
    assert dying is not None and (dying.status, dying.lease_owner) == ("sending", "doomed")

    # The lease holds while it lasts: no other worker touches the row.
    assert notifier_for(engine, stub, owner="early").courier.run_once() == 0
    later = Clock(stub, datetime.now(UTC) + timedelta(seconds=LEASE_S + 1))
    takeover = notifier_for(engine, stub, later, owner="takeover")
    assert takeover.courier.run_once() == 1

    (message,) = [m for m in stub.messages(OPS) if m.get("text") == "P1 inc-9: globex is down"]
    assert message["metadata"]["event_payload"] == {"key": row.key}
    done = outbox.get(row.id)
    assert done is not None and (done.status, done.ts) == ("sent", message["ts"])
    assert len(stub.find(lambda c: c.kind == "conversations.history")) == 1  # looked first
    accepted = [c for c in post_calls(stub, "P1 inc-9: globex is down") if c.ok]
    assert len(accepted) == 1
    (sent,) = EventLog(engine).query(kind="message.sent")
    assert sent.payload["adopted"] is slack_took_it


def test_two_workers_on_one_postgres_never_send_a_row_twice(
    pg_databases: Databases, stub: SlackStub
) -> None:
    url = pg_databases.create()
    engines = [make_engine(url), make_engine(url)]
    upgrade(engines[0])
    events = EventLog(engines[0])
    queued = Outbox(engines[0], events, owner="the-test")
    keys = [queued.enqueue("post", OPS, {"text": f"m{i}"}, claim=False).key for i in range(40)]
    # Ten more that a dead worker held (its lease long over), five of them already in Slack.
    past = datetime.now(UTC) - timedelta(minutes=5)
    dead = Outbox(engines[0], events, owner="dead", clock=lambda: past)
    for i in range(10):
        row = dead.enqueue("post", OPS, {"text": f"d{i}"})
        keys.append(row.key)
        if i < 5:
            stub.existing(
                OPS, f"d{i}", metadata={"event_type": EVENT_TYPE, "event_payload": {"key": row.key}}
            )
    stub.latency_s = 0.005  # Slack takes a moment: claims overlap with sends in flight
    workers = [notifier_for(e, stub, owner=f"w{n}") for n, e in enumerate(engines)]
    done: dict[str, int] = {}
    start = threading.Barrier(2)

    def work(notifier: OutboxNotifier) -> None:
        start.wait()
        done[notifier.outbox.owner] = notifier.courier.run_once()

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sum(done.values()) == 50 and all(done.values()), done
        in_slack = [m["metadata"]["event_payload"]["key"] for m in stub.messages(OPS)]
        assert sorted(in_slack) == sorted(keys)  # each once
        assert {r["status"] for r in _rows(engines[0])} == {"sent"}
        assert len([c for c in stub.find(lambda c: c.kind == "chat.postMessage") if c.ok]) == 45
        sent = EventLog(engines[0]).query(kind="message.sent", limit=1000)
        assert sorted(e.payload["key"] for e in sent) == sorted(keys)
    finally:
        for e in engines:
            e.dispose()


def test_the_ops_channel_gone_reaches_the_admin_and_healthz(
    tmp_path: Path, stub: SlackStub
) -> None:
    app = app_for(tmp_path, stub, dbops_admins=CAROL)
    with serving(app) as client:
        assert health(client)["status"] == "ok"
        stub.remove_channel(OPS)  # deleted (or made private) after dbops checked it
        stub.expect_refusals("channel_not_found")
        # The scheduler's side: another process, another engine on the same database.
        engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
        notifier = notifier_for(engine, stub)
        with pytest.raises(NotifyError) as lost:
            notifier.post(OPS, card("inc-10: the morning report"))
        assert lost.value.permanent
        (told,) = stub.messages(dm_channel(CAROL))
        assert "could not post in #db-ops" in told["text"] and "channel_not_found" in told["text"]
        assert "P1 inc-10: the morning report" in told["text"]  # what was lost, in words
        reason = (
            "cannot post in #db-ops: channel_not_found (1 message not sent, kept in the outbox)"
        )
        body = health(client)
        assert body["status"] == "degraded" and body["reasons"] == [reason]

        # A second failure there tells nobody again.
        with pytest.raises(NotifyError):
            notifier.post(OPS, Message("checklist: weekly"))
        assert len(stub.messages(dm_channel(CAROL))) == 1
        assert health(client)["reasons"] == [reason.replace("1 message", "2 messages")]

        stub.add_channel("db-ops")  # the bot is back in its channel
        notifier.post(OPS, Message("the next morning report"))
        assert health(client)["status"] == "ok"
        assert notifier.courier.run_once() == 0  # nothing failed is retried
        engine.dispose()


def test_failures_about_failures_end(engine: Engine, stub: SlackStub) -> None:
    """The ops channel is gone and the admin's DM fails too: the DM's failure goes to the ops
    channel once (which fails), and that is the end of it."""
    stub.remove_channel(OPS)
    stub.expect_refusals("channel_not_found")
    stub.fail_next(1, "conversations.open", error="user_not_found")
    notifier = notifier_for(engine, stub)
    with pytest.raises(NotifyError):
        notifier.post(OPS, Message("inc-11 opened"))
    rows = _rows(engine)
    assert [(r["kind"], r["target"], r["depth"], r["status"]) for r in rows] == [
        ("post", OPS, 0, "failed"),
        ("dm", CAROL, 1, "failed"),
        ("post", OPS, 2, "failed"),
    ]
    assert notifier.courier.run_once() == 0
    assert len(stub.find(lambda c: c.kind == "chat.postMessage")) == 2


def test_the_same_key_twice_is_one_message(engine: Engine, stub: SlackStub) -> None:
    """An escalation step retried after a crash between its send and its event: one page."""
    notifier = notifier_for(engine, stub)
    page = Message("inc-12: page 1", meta={"incident": 12, "outbox_key": "escalation-timer-3"})
    first = notifier.dm("U_ALICE", page)
    again = notifier.dm("U_ALICE", page)
    assert first == again and not first.ts.startswith("outbox:")
    assert len(stub.messages(dm_channel("U_ALICE"))) == 1


def test_the_incident_desk_posts_through_the_outbox(stub: SlackStub, tmp_path: Path) -> None:
    """The card of an incident opened during a rate limit, then acked: one card, updated."""
    from bot.commands.incidents import announce
    from bot.runtime import Runtime
    from tests.test_page_buttons import fleet

    engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
    upgrade(engine)
    events = EventLog(engine)
    rt = Runtime(settings_for(stub, timezone="UTC"), engine=engine, events=events, fleet=fleet())
    desk = rt.desk
    assert isinstance(desk.notifier, OutboxNotifier)
    start = datetime.now(UTC)
    try:
        with time_machine.travel(start, tick=False) as traveller:
            inc = desk.incidents.open("checkout is slow", "P3", actor="U_ALICE")
            stub.rate_limit(60, "chat.postMessage")
            said = announce(rt, inc.id)
            assert said.ref is not None and said.ref.ts.startswith("outbox:")
            assert desk.incidents.get(inc.id).card_ref == said.ref
            traveller.shift(61)
            stub.advance(61)
            desk.notifier.courier.run_once()
            cards = [m for m in stub.messages(OPS) if f"inc-{inc.id}" in m.get("text", "")]
            (the_card,) = [m for m in cards if "checkout is slow" in m["text"]]
            desk.update(said.ref, Reply(text=f"inc-{inc.id} acknowledged"))
        now = {m["ts"]: m["text"] for m in stub.messages(OPS)}
        assert now[the_card["ts"]] == f"inc-{inc.id} acknowledged"
    finally:
        rt.close()
        engine.dispose()


def test_an_outbox_row_never_moves_under_a_worker_that_lost_its_lease(
    engine: Engine, stub: SlackStub
) -> None:
    """A worker that took longer than its lease cannot mark the row: the taker owns it."""
    slow = Outbox(engine, EventLog(engine), owner="slow")
    row = slow.enqueue("post", OPS, {"text": "inc-13"})
    with engine.begin() as conn:
        conn.execute(update(T).where(T.c.id == row.id).values(lease_owner="taker"))
    from core.outbox import Landed, LeaseLost

    with pytest.raises(LeaseLost):
        slow.sent(row, Landed("C1", "1.000001"))
    assert slow.get(row.id) is not None and slow.get(row.id).status == "sending"  # type: ignore[union-attr]
    assert EventLog(engine).query(kind="message.sent") == []


def test_a_lost_answer_is_looked_for_before_the_post_goes_again(
    engine: Engine, stub: SlackStub
) -> None:
    """The connection drops with no answer: the post may be in Slack. The next attempt looks
    (conversations.history, by the row's metadata) and, finding nothing, posts it once."""
    clock = Clock(stub)
    notifier = notifier_for(engine, stub, clock)
    stub.fail_next(1, "chat.postMessage", status=DROP)  # hung up, nothing answered
    ref = notifier.post(OPS, Message("inc-14 opened"))
    row = row_of(engine, ref.ts)
    assert (row["status"], row["in_doubt"]) == ("pending", True)
    clock.advance(1)
    assert notifier.courier.run_once() == 1
    assert len(posted(stub, "inc-14 opened")) == 1
    assert [c.kind for c in stub.calls if c.kind.startswith(("chat.", "conversations.h"))] == [
        "chat.postMessage",
        "conversations.history",
        "chat.postMessage",
    ]


def test_rows_done_with_are_pruned_after_30_days(engine: Engine, stub: SlackStub) -> None:
    clock = Clock(stub)
    notifier = notifier_for(engine, stub, clock)
    old = notifier.post(OPS, Message("a month ago"))
    stub.rate_limit(3600, "chat.postMessage")
    waiting = notifier.post(OPS, Message("still waiting"))
    clock.advance(31 * 86400)
    assert notifier.outbox.prune() == 1
    assert [r["status"] for r in _rows(engine)] == ["pending"]
    assert not old.ts.startswith("outbox:") and waiting.ts.startswith("outbox:")


def test_every_worker_side_sender_is_the_outbox(stub: SlackStub, tmp_path: Path) -> None:
    """`dbops scheduler` and `dbops jobs run` (their notifier) and the webhooks of `dbops serve`
    send through the outbox when Slack is configured."""
    from bot.cli import _worker_notifier
    from bot.runtime import Runtime

    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        slack_bot_token=BOT_TOKEN,
        slack_api_url=stub.base_url,
    ).ready()
    assert isinstance(_worker_notifier(ctx), OutboxNotifier)
    assert isinstance(ctx.notifier, OutboxNotifier)  # the webhooks' and the incident desk's
    ctx.engine.dispose()
