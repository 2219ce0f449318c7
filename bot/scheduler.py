"""`dbops scheduler`: APScheduler 3 runs the routines; core.jobs makes each run happen once.

Jobs post through a Notifier (Slack's Web API, or the console in the demo). Several scheduler
processes may run against one PostgreSQL database: every run claims its (job, scheduled time)
first, so each happens once; a process that starts after a missed 08:00 (or after the process
running it died) runs it late, marked late.
"""

from __future__ import annotations

import inspect
import logging
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from slack_sdk.models.blocks import (
    ActionsBlock,
    CheckboxesElement,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    Option,
    PlainTextObject,
)

from bot.commands.cards import as_message
from bot.commands.incidents import announce
from bot.commands.router import Rt
from bot.notifiers import file_sender, upload_all
from bot.views.blocks import clip, escape
from bot.views.render import report_parts, report_summary
from core import checklists as cl
from core.alerts import alerts_from_report
from core.backups import Backups
from core.checkpoints import Checkpointer, publish
from core.escalation import Escalator
from core.incidents import Incidents
from core.jobs import (
    JobSpec,
    RunResult,
    execute,
    execute_manual,
    job_specs,
    missed_slots,
    owner_id,
)
from core.maintenance import Maintenance
from core.notify import Message, MessageRef, Notifier
from core.oncall import handoff
from core.ops import Ops
from storage.chain import Checkpoint
from storage.spool import flush_spool

log = logging.getLogger("dbops.scheduler")
CHECKLIST_ACTION = "checklist_tick"
CATCH_UP_EVERY_S = 30
OPTION_MAX = 75


CHECKBOXES_MAX = 10  # Slack's limit of options in one checkboxes element
_BLOCK = re.compile(r"checklist-(\d+)(?:-([0-9a-f]+)-(\d+)-([0-9a-f]+))?")


@dataclass(frozen=True)
class ChecklistBlock:
    """What a checklist's checkboxes block says: the run, the rendering (``via``), the items of
    its element and which of those it showed ticked. A block from before elements were split
    (``checklist-<run>``) names no items: ``items`` and ``shown`` are then None."""

    run_id: int
    via: str
    items: range | None
    shown: frozenset[int] | None


def checklist_block_id(state: cl.RunState, part: int) -> str:
    # Fresh per update (the revision) so clients drop their stale checkbox state, and carrying
    # what it showed ticked so a click can be read as the one change it makes.
    chunk = state.items[part * CHECKBOXES_MAX : (part + 1) * CHECKBOXES_MAX]
    mask = sum(1 << (i.index - part * CHECKBOXES_MAX) for i in chunk if i.done)
    return f"checklist-{state.id}-{state.revision:x}-{part}-{mask:x}"


def parse_checklist_block(block_id: str) -> ChecklistBlock | None:
    m = _BLOCK.fullmatch(block_id)
    if m is None:
        return None
    if m.group(2) is None:
        return ChecklistBlock(int(m.group(1)), block_id, None, None)
    part, mask = int(m.group(3)), int(m.group(4), 16)
    start = part * CHECKBOXES_MAX
    shown = frozenset(start + b for b in range(CHECKBOXES_MAX) if mask >> b & 1)
    return ChecklistBlock(int(m.group(1)), block_id, range(start, start + CHECKBOXES_MAX), shown)


def checklist_message(state: cl.RunState, tz: Any) -> Message:
    """A checklist as Block Kit: a checkbox per item, at most 10 to an element (one actions
    block each); ticks are recorded per user."""
    ticked = sum(1 for i in state.items if i.done)
    when = state.posted_at.astimezone(tz).strftime("%a %Y-%m-%d %H:%M %Z")
    checkboxes = []
    for part, start in enumerate(range(0, len(state.items), CHECKBOXES_MAX)):
        chunk = state.items[start : start + CHECKBOXES_MAX]
        options = [_option(i) for i in chunk]
        done = [o for o, i in zip(options, chunk, strict=True) if i.done]
        checkboxes.append(
            ActionsBlock(
                block_id=checklist_block_id(state, part),
                elements=[
                    CheckboxesElement(
                        action_id=CHECKLIST_ACTION, options=options, initial_options=done or None
                    )
                ],
            )
        )
    blocks = [
        HeaderBlock(text=PlainTextObject(text=state.title[:150])),
        *checkboxes,
        ContextBlock(
            elements=[
                MarkdownTextObject(
                    text=f"{ticked}/{len(state.items)} done · posted {when} · "
                    f"`/db checklist {state.name}`"
                )
            ]
        ),
    ]
    return Message(
        text=f"Checklist: {state.title} ({ticked}/{len(state.items)} done)",
        blocks=[b.to_dict() for b in blocks],
    )


def _option(item: cl.Item) -> Option:
    # Slack caps a checkbox's text and its description at 75 characters each: long items
    # continue in the description rather than being cut.
    text = escape(item.text)
    if len(text) <= OPTION_MAX:
        return Option(value=str(item.index), text=MarkdownTextObject(text=text))
    cut = text.rfind(" ", 0, OPTION_MAX - 1)
    cut = cut if cut > 40 else OPTION_MAX - 1
    return Option(
        value=str(item.index),
        text=MarkdownTextObject(text=text[:cut] + "…"),
        description=MarkdownTextObject(text=clip("…" + text[cut:].strip(), OPTION_MAX)),
    )


def post_attachments(rt: Rt, checklist: cl.Checklist, ref: MessageRef, now: datetime) -> int:
    """What ``checklist``'s posting carries besides its items (``attach``: the capacity
    review's fleet disk chart, Ops.checklist_attachments) into the posting's thread, through
    the runtime's notifier; how many went. Drawn only for a notifier that takes files. One that
    did not go is a line in the thread saying why; it never undoes the posting (a failed job
    would be posted again by hand, checklist and all)."""
    if not checklist.attach or file_sender(rt.notifier) is None:
        return 0
    try:
        files = rt.ops.checklist_attachments(checklist, now)
    except Exception:
        log.exception("could not make the attachments of %s", checklist.name)
        files, failed = [], ["the chart could not be drawn (see the worker's log)"]
    else:
        failed = upload_all(rt.notifier, ref.channel, files, thread_ts=ref.ts, events=rt.events)
    if failed:
        note = f":warning: {len(failed)} file(s) of this checklist did not go: {failed[0]}"
        try:
            rt.notifier.post(ref.channel, Message(text=escape(note)), thread_ts=ref.ts)
        except Exception:
            log.exception("could not say that %s's files did not go", checklist.name)
    return max(0, len(files) - len(failed))


@dataclass
class Worker:
    """The jobs of one scheduler process, runnable with or without APScheduler. Everything
    it works with is the runtime's: its notifier, its clock, its incident desk."""

    rt: Rt
    owner: str = field(default_factory=owner_id)

    def __post_init__(self) -> None:
        # When the worker's own runs happen (a test may move it; the desk keeps the runtime's).
        self.clock: Callable[[], datetime] = self.rt.clock
        self.checklists = cl.load_checklists()
        self.specs = {s.id: s for s in job_specs(self.rt.tz, self.checklists)}
        # A checkpoint soon after any restore, provisioning, restart or credit this process runs.
        self.checkpointer = Checkpointer(self.publish_checkpoint).watch(self.rt.events)

    @property
    def notifier(self) -> Notifier:
        return self.rt.notifier

    @property
    def ops(self) -> Ops:
        return self.rt.ops

    @property
    def escalator(self) -> Escalator:
        return self.rt.escalator

    @property
    def incidents(self) -> Incidents:
        return self.rt.incidents

    @property
    def backups(self) -> Backups:
        return self.rt.backups

    @property
    def channel(self) -> str:
        return self.rt.settings.ops_channel

    # -- jobs ------------------------------------------------------------------------------

    def morning_report(self, slot: datetime, late_s: int) -> dict[str, Any]:
        """The verdict and counts in the channel (always one short message), and the whole
        report in its thread, in as many messages as Slack needs to take every line."""
        report = self.ops.report(open_incidents=self.incidents.open_incidents())
        parts = report_parts(report, self.rt.tz)
        head = report_summary(report, parts=len(parts), late_s=late_s)
        ref = self.notifier.post(self.channel, as_message(head))
        for part in parts:
            self.notifier.post(self.channel, as_message(part), thread_ts=ref.ts)
        verdict = report["summary"]["verdict"]
        return {"verdict": verdict, "late_s": late_s, "ts": ref.ts, "parts": len(parts)}

    @property
    def maintenance(self) -> Maintenance:
        """The runtime's maintenance windows (bot/runtime.py)."""
        return self.rt.maintenance

    def maintenance_close(self) -> list[int]:
        """Windows whose end has passed (core.maintenance.close_due: what still fails is raised
        again, the end notices go): each summary in its announcement's thread, else the ops
        channel. First thing in a sweep, so what still fails pages at this sweep."""
        now = self.clock()
        posted = []
        for closing in self.maintenance.close_due(
            now, raise_again=lambda alerts: self.incidents.ingest(alerts, now=now)
        ):
            key = f"maintenance-summary-{closing.window.id}"
            message = Message(text=closing.text, meta={"outbox_key": key})
            self.notifier.post(closing.channel or self.channel, message, closing.thread_ts)
            self.maintenance.summary_posted(closing.window.id, now)
            posted.append(closing.window.id)
        return posted

    def health_sweep(self, slot: datetime, late_s: int) -> dict[str, Any]:
        # Once a minute, events kept while the log was down (by any process sharing the spool
        # file) go in, if they have not already: storage/spool.py.
        flush_spool(self.rt.events)
        try:
            closed = self.maintenance_close()
        except Exception:  # the sweep goes on; the next one tries the windows again
            log.exception("could not handle the maintenance windows that ended")
            closed = []
        report = self.ops.report(deadline_s=20.0)
        outcomes = self.incidents.ingest(alerts_from_report(report), now=self.clock())
        opened = [o.incident.id for o in outcomes if o.action == "opened" and o.incident]
        for incident_id in opened:
            try:
                announce(self.rt, incident_id)
            except Exception:
                log.exception("could not post the card of incident %s", incident_id)
        return {
            "verdict": report["summary"]["verdict"],
            "alerts": len(outcomes),
            "opened": len(opened),
            **({"maintenance_closed": closed} if closed else {}),
        }

    def nightly_backups(
        self, slot: datetime, late_s: int, *, actor: str = "scheduler"
    ) -> dict[str, Any]:
        run = self.backups.backup_all(actor=actor)
        if run.failed:
            names = ", ".join(sorted({o.customer for o in run.failed}))
            self.notifier.post(
                self.channel,
                Message(text=f":x: Nightly backups failed for {names}: see `/db log <customer>`."),
            )
        return {"ok": run.ok, "failed": len(run.failed), "wall_s": round(run.wall_s)}

    def restore_tests(
        self, slot: datetime, late_s: int, *, actor: str = "scheduler"
    ) -> dict[str, Any]:
        outcomes = self.backups.verify_all(actor=actor)
        bad = [o.customer for o in outcomes if o.verification.verdict == "crit"]
        if bad:
            self.notifier.post(
                self.channel,
                Message(
                    text=f":x: Restore tests failed for {', '.join(bad)}: see `/db log <customer>`."
                ),
            )
        return {"tested": len(outcomes), "failed": bad}

    def escalation_tick(self, slot: datetime, late_s: int) -> dict[str, Any] | None:
        done = self.escalator.tick(self.clock())
        return {"steps": len(done)} if done else None

    def checklist(self, name: str, *, actor: str = "scheduler") -> cl.RunState:
        checklist = cl.get_checklist(name)
        state = cl.start_run(
            self.rt.engine, self.rt.events, checklist, actor=actor, now=self.clock()
        )
        ref = self.notifier.post(self.channel, checklist_message(state, self.rt.tz))
        cl.attach_message(self.rt.engine, state.id, ref.channel, ref.ts)
        post_attachments(self.rt, checklist, ref, self.clock())
        return cl.run_state(self.rt.engine, state.id)

    def checklist_nudge(self, slot: datetime, late_s: int) -> dict[str, Any]:
        nudged = []
        for state in cl.unfinished(self.rt.engine, posted_after=slot - timedelta(days=7)):
            left = ", ".join(f"“{escape(i.text)}”" for i in state.open_items[:5])
            more = len(state.open_items) - 5
            text = (
                f":alarm_clock: *{escape(state.title)}* still has "
                f"{len(state.open_items)} open item(s): {left}"
                + (f" and {more} more" if more > 0 else "")
                + "."
            )
            self.notifier.post(
                state.channel or self.channel, Message(text=text), thread_ts=state.message_ts
            )
            cl.mark_nudged(self.rt.engine, self.rt.events, state, now=self.clock())
            nudged.append(state.id)
        return {"nudged": nudged}

    def publish_checkpoint(self) -> Checkpoint:
        return publish(
            self.rt.events,
            self.notifier,
            self.channel,
            self.rt.settings.dbops_checkpoints,
            now=self.clock(),
        )

    def events_checkpoint(self, slot: datetime, late_s: int) -> dict[str, Any]:
        checkpoint = self.publish_checkpoint()
        return {"id": checkpoint.id, "hash": checkpoint.hash, "key_id": checkpoint.key_id}

    def oncall_handoff(self, slot: datetime, late_s: int) -> dict[str, Any] | None:
        text = handoff(
            self.rt.engine,
            self.rt.events,
            self.rt.fleet,
            now=self.clock(),
            tz=self.rt.tz,
        )
        if text is None:
            return None
        self.notifier.post(self.channel, Message(text=text))
        return {"announced": True}

    # -- plumbing --------------------------------------------------------------------------

    def function(self, spec: JobSpec, actor: str = "scheduler") -> Callable[[datetime, int], Any]:
        """The body of ``spec``; bodies that record who acted (backups) act as ``actor``."""
        if spec.id.startswith("checklist:"):
            name = spec.args["checklist"]
            return lambda slot, late: {"run": self.checklist(name, actor=actor).id}
        fn: Callable[..., Any] = getattr(self, spec.id)
        if actor != "scheduler" and "actor" in inspect.signature(fn).parameters:
            return lambda slot, late: fn(slot, late, actor=actor)
        return fn

    def on_error(self, job_id: str, error_id: str, exc: BaseException) -> None:
        self._post_failure(f"Scheduled job `{job_id}`", job_id, error_id)

    def _post_failure(self, what: str, job_id: str, error_id: str) -> None:
        try:
            self.notifier.post(
                self.channel,
                Message(
                    text=f":x: {what} failed. Error id `{error_id}` "
                    "(the worker's log has the details)."
                ),
            )
        except Exception:
            log.exception("could not post the failure of %s", job_id)

    def run(self, job_id: str) -> RunResult:
        spec = self.specs[job_id]
        return execute(
            spec,
            self.function(spec),
            engine=self.rt.engine,
            events=self.rt.events,
            clock=self.clock,
            owner=self.owner,
            on_error=self.on_error,
        )

    def run_manual(self, job_id: str, *, actor: str, user: str | None = None) -> RunResult:
        """Run ``job_id`` now, on request (``dbops jobs run``): recorded as a manual run, it
        claims no slot, so the scheduled runs happen as they would have (core.jobs)."""
        spec = self.specs[job_id]
        return execute_manual(
            spec,
            self.function(spec, actor=actor),
            events=self.rt.events,
            actor=actor,
            clock=self.clock,
            owner=self.owner,
            user=user,
            on_error=lambda job, error_id, exc: self._post_failure(
                f"Job `{job}` (run by hand)", job, error_id
            ),
        )

    def catch_up(self) -> list[RunResult]:
        """Run the catch-up jobs' slots that nobody finished (missed while down, or orphaned)."""
        return [
            self.run(spec.id)
            for spec, _slot in missed_slots(self.rt.engine, list(self.specs.values()), self.clock())
        ]

    def schedule(self) -> BackgroundScheduler:
        scheduler = BackgroundScheduler(timezone=self.rt.tz)
        for spec in self.specs.values():
            scheduler.add_job(
                self.run,
                trigger=spec.trigger,
                args=[spec.id],
                id=spec.id,
                name=spec.description,
                replace_existing=True,
                misfire_grace_time=spec.misfire_grace_s,
                coalesce=spec.coalesce,
                max_instances=1,
            )
        scheduler.add_job(
            self.catch_up,
            "interval",
            seconds=CATCH_UP_EVERY_S,
            id="_catch_up",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
        )
        return scheduler


def run_forever(worker: Worker, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.rt.events.append(
        "scheduler.start", worker.owner, {"jobs": sorted(worker.specs)}, actor="scheduler"
    )
    for result in worker.catch_up():
        log.info("caught up %s (slot %s)", result.job_id, result.slot)
    scheduler = worker.schedule()
    scheduler.start()
    try:
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)
        worker.checkpointer.close()
        worker.rt.events.append("scheduler.stop", worker.owner, {}, actor="scheduler")
        worker.rt.close()
