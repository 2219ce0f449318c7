"""A checklist posted, two items ticked by two people, the rest nudged at the end of the day:
all of it in the event log."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import time_machine

from bot.runtime import Runtime
from bot.scheduler import CHECKLIST_ACTION, Worker, checklist_message
from core import checklists as cl
from core.errors import DbopsError
from core.notify import RecordingNotifier
from storage.migrate import upgrade

MONDAY_10AM_NY = datetime(2026, 11, 23, 15, 0, 5, tzinfo=UTC)
MONDAY_5PM_NY = datetime(2026, 11, 23, 22, 0, 3, tzinfo=UTC)


@pytest.fixture
def worker(sandbox: dict[str, Any], tmp_path: Path) -> Worker:
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=sandbox["fleet"],
        ops_channel="#db-ops",
    )
    upgrade(ctx.engine)
    return Worker(ctx.with_notifier(RecordingNotifier()))


def test_checklist_ticked_by_two_people_and_nudged(worker: Worker) -> None:
    notifier = worker.notifier
    assert isinstance(notifier, RecordingNotifier)
    with time_machine.travel(MONDAY_10AM_NY, tick=False):
        result = worker.run("checklist:security-review")
    assert result.ran and result.ok
    (post,) = notifier.posts("#db-ops")
    blocks = post.message.blocks or []
    boxes = [el for b in blocks if b["type"] == "actions" for el in b["elements"]]
    assert boxes and boxes[0]["type"] == "checkboxes"
    assert boxes[0]["action_id"] == CHECKLIST_ACTION
    items = cl.get_checklist("security-review").items
    assert [o["value"] for o in boxes[0]["options"]] == [str(i) for i in range(len(items))]

    run_id = result.outcome["run"]
    engine, events = worker.rt.engine, worker.rt.events
    cl.set_done(
        engine, events, run_id, {0}, user="U_ALICE", now=datetime(2026, 11, 23, 15, 20, tzinfo=UTC)
    )
    state = cl.set_done(
        engine, events, run_id, {0, 2}, user="U_BOB", now=datetime(2026, 11, 23, 16, 5, tzinfo=UTC)
    )
    assert [(i.index, i.user) for i in state.items if i.done] == [(0, "U_ALICE"), (2, "U_BOB")]
    assert not state.complete

    with time_machine.travel(MONDAY_5PM_NY, tick=False):
        nudge = worker.run("checklist_nudge")
    assert nudge.ok and nudge.outcome == {"nudged": [run_id]}
    reminder = notifier.posts("#db-ops")[-1]
    assert reminder.thread_ts == post.ref.ts
    assert f"{len(items) - 2} open item(s)" in reminder.message.text
    # Nudged once: the next evening's run does not repeat it.
    with time_machine.travel(datetime(2026, 11, 24, 22, 0, 3, tzinfo=UTC), tick=False):
        assert worker.run("checklist_nudge").outcome == {"nudged": []}

    log = events.query(subject=f"checklist-{run_id}")
    kinds = [(e.kind, e.actor, e.payload.get("item")) for e in log]
    assert kinds == [
        ("checklist.posted", "scheduler", None),
        ("checklist.tick", "U_ALICE", 0),
        ("checklist.tick", "U_BOB", 2),
        ("checklist.nudged", "dbops", None),
    ]
    runs = [(e.kind, e.subject) for e in events.query(kind_prefix="job.")]
    assert ("job.start", "checklist:security-review") in runs
    assert ("job.end", "checklist_nudge") in runs
    assert events.verify().ok


def test_unticking_and_completing_are_recorded(worker: Worker) -> None:
    state = worker.checklist("performance-review", actor="U_CAROL")
    engine, events = worker.rt.engine, worker.rt.events
    everything = set(range(len(state.items)))
    now = datetime(2026, 11, 25, 20, tzinfo=UTC)
    done = cl.set_done(engine, events, state.id, everything, user="U_CAROL", now=now)
    assert done.complete and done.completed_at == now
    undone = cl.set_done(engine, events, state.id, everything - {1}, user="U_ALICE", now=now)
    assert not undone.complete and undone.completed_at is None
    kinds = [e.kind for e in events.query(subject=f"checklist-{state.id}")]
    assert kinds.count("checklist.completed") == 1 and kinds[-1] == "checklist.untick"
    with pytest.raises(DbopsError, match="item does not exist"):
        cl.set_done(engine, events, state.id, {99}, user="U_ALICE", now=now)
    with pytest.raises(DbopsError, match=r"no checklist 'securty-review'.*'security-review'"):
        worker.checklist("securty-review")


def test_a_failed_job_posts_its_correlation_id(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("password=hunter2 leaked into an exception")

    monkeypatch.setattr(worker.ops, "report", broken)
    with time_machine.travel(datetime(2026, 11, 23, 13, 0, 5, tzinfo=UTC), tick=False):
        result = worker.run("morning_report")
    assert result.ran and not result.ok and result.error_id
    notifier = worker.notifier
    assert isinstance(notifier, RecordingNotifier)
    (post,) = notifier.posts("#db-ops")
    assert result.error_id in post.message.text and "hunter2" not in post.message.text
    (end,) = worker.rt.events.query(kind="job.end")
    assert end.payload["outcome"] == "failed" and end.payload["error_id"] == result.error_id
    assert "hunter2" not in str(end.payload)


def test_checklist_and_jobs_replies_keep_the_block_kit_contract(worker: Worker) -> None:
    from bot.commands.roles import Roles
    from bot.commands.router import Invocation, Router
    from tests.test_blocks_contract import check_contract

    router = Router(worker.rt, roles=Roles(frozenset({"U_ALICE"})), registry=worker.rt.registry)
    for n, line in enumerate(["checklist disaster-recovery", "jobs", "help checklist"]):
        reply = router.run(
            Invocation(actor="U_ALICE", surface="shell", text=line, delivery=f"t{n}")
        )
        assert reply is not None
        check_contract(line, reply)
    assert "disaster-recovery" in router.registry.get("checklist").summary  # type: ignore[union-attr]
    # Every posted checklist message (with long items continued in the description) is valid.
    for name in cl.load_checklists():
        state = worker.checklist(name)
        message = checklist_message(state, worker.rt.settings.tz)
        assert message.blocks and message.text
    # A viewer may not post one: denied, and the denial is an event.
    with pytest.raises(DbopsError):
        router.run(Invocation(actor="U_BOB", surface="shell", text="checklist jobs", delivery="t9"))
    assert router.events.query(kind="auth.denied")
