"""`/db maintenance ...`: maintenance windows (issue 18) from Slack and the shell.

    /db maintenance <server|customer> <duration> [--at <time>] [--notify] <reason...>  (operator)
    /db maintenance  or  /db maintenance schedule   -> Slack: a form (target, start, duration,
                                   reason, notices); the shell: how to type it
    /db maintenance list [<server|customer>]        (anyone)
    /db maintenance end <id|server|customer>        (operator)

``--at`` is ISO 8601 with an offset or ``Z``, else read in TIMEZONE; without it the window
starts now. The window itself, its checks and its events are core.maintenance's; here a new
window is announced in OPS_CHANNEL (who, what, until when, why, the customers it affects,
the notices sent or not) and the announcement's place is kept on the window, since the
scheduler posts the window's summary in that message's thread when it ends. Without Slack
(the shell) the announcement is the command's reply.

Reading the list needs no role: DESIGN's rule is that anyone may read, and whether paging is
held for a server is what a viewer who sees it failing most needs to know. Scheduling and
ending change who gets paged: operators.

The form's submit is bot/slack/listeners/views.py: ``check_form`` keeps the modal open with
each field's error, then the line ``form_line`` builds runs through the router like a typed
command (the role check again, the events).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from slack_sdk.models.blocks import (
    CheckboxesElement,
    DateTimePickerElement,
    InputBlock,
    MarkdownTextObject,
    Option,
    PlainTextInputElement,
    PlainTextObject,
    SectionBlock,
)
from slack_sdk.models.views import View

from bot.commands.cards import mention
from bot.commands.roles import Role
from bot.commands.router import MAX_TEXT, Arg, Call, Kind, Rt, Spec, UsageError
from bot.views import blocks
from bot.views.blocks import Reply, escape
from bot.views.render import local_time
from core import email as mail
from core.customers import get_customer, list_customers
from core.errors import DbopsError
from core.maintenance import (
    MAX_AHEAD,
    MAX_DURATION,
    PAST_GRACE,
    REASON_MAX,
    Maintenance,
    Notice,
    Scheduled,
    parse_window_id,
)
from core.names import validate_server_name
from core.notify import Message, MessageRef, NotifyError
from core.pitr import is_time_of_day, parse_target
from core.units import parse_span, pretty_span
from core.windows import Window, window_ref

log = logging.getLogger("dbops.maintenance.slack")

FORM_ID = "db_maintenance"  # the modal's callback_id
TARGET_BLOCK, TARGET_ACTION = "target", "target"
START_BLOCK, START_ACTION = "start", "start"
DURATION_BLOCK, DURATION_ACTION = "duration", "duration"
REASON_BLOCK, REASON_ACTION = "reason", "reason"
NOTIFY_BLOCK, NOTIFY_ACTION = "notify", "notify"
NOTIFY_VALUE = "notify"
LIST_MAX = 30  # windows listed in one message; `list <target>` narrows the rest
BUTTONS_MAX = 5  # End buttons under the list, as many as incident list's Ack buttons
NAMES_MAX = 20  # customers named in an announcement
REASON_SHOWN = 120  # a reason's characters in the list (the announcement shows it whole)
ERROR_MAX = 150  # a field's error under it in the modal
NARROW = "/db maintenance list <server|customer>"
EXAMPLE = "/db maintenance vps1 2h --at 2026-12-05T02:00 --notify kernel upgrade"


def service(rt: Rt) -> Maintenance:
    """The runtime's maintenance windows (bot/runtime.py)."""
    return rt.maintenance


# --- argument kinds -------------------------------------------------------------------------------


def _span(value: str) -> str:
    """A duration as people type it (30m, 2h, 1h30m), kept in its shortest form."""
    return pretty_span(parse_span(value))


def _start(value: str) -> str:
    """``--at``: a moment in ISO 8601 (the zone it is read in when it names none is the
    settings' TIMEZONE, which the handler has); kept as typed."""
    value = value.strip()
    if not value or len(value) > 64 or not value.isprintable():
        raise DbopsError("`--at` takes a moment in ISO 8601.", hint="E.g. `--at 2026-12-05T02:00`.")
    parse_target(value, "UTC")
    return value


def _window(value: str) -> str:
    """What `end` acts on: a window id (mw-3, #3, 3) as ``mw-3``, or a server or customer."""
    number = parse_window_id(value)
    if number is not None:
        return window_ref(number)
    return validate_server_name(value.lower())


KINDS: Mapping[str, Kind] = {"span": _span, "start_time": _start, "window": _window}


# --- how times and windows read -------------------------------------------------------------------


def _local(ts: datetime, tz: ZoneInfo) -> str:
    return local_time(ts, tz, "%a %Y-%m-%d %H:%M %Z")


def _span_of(delta: timedelta) -> str:
    """A duration people read: whole minutes (a window is planned to the minute)."""
    minutes = max(1, round(delta.total_seconds() / 60))
    return pretty_span(timedelta(minutes=minutes))


def _when(w: Window, now: datetime, tz: ZoneInfo) -> str:
    span = _span_of(w.ends_at - w.starts_at)
    if w.starts_at <= now + timedelta(minutes=1):
        return f"from now until {_local(w.ends_at, tz)} ({span})"
    return (
        f"from {_local(w.starts_at, tz)} to {_local(w.ends_at, tz)} ({span}; starts in "
        f"{_span_of(w.starts_at - now)})"
    )


def _where(w: Window) -> str:
    return f"{w.target_kind} *{escape(w.target)}*"


def _names(names: Sequence[str], most: int = NAMES_MAX) -> str:
    shown = ", ".join(escape(n) for n in names[:most])
    more = len(names) - most
    return shown + (f" and {more} more" if more > 0 else "")


def _channel(channel: str | None) -> str:
    """A channel for a message: linked when it is an id, else its name as typed."""
    if channel and re.fullmatch(r"[CG][A-Z0-9]{2,}", channel):
        return f"<#{channel}>"
    return escape(channel or "the ops channel")


def notices_line(window: Window, notices: Sequence[Notice]) -> str:
    """Whether the customers were told, and who was not and why."""
    if not window.notify:
        return "none (scheduled without notices)"
    sent = [n.customer for n in notices if n.sent]
    missed = [n for n in notices if not n.sent]
    parts = []
    if sent:
        parts.append(f"emailed {_names(sent)}")
    if missed:
        why = "; ".join(f"{escape(n.customer)} ({escape(n.detail)})" for n in missed[:NAMES_MAX])
        more = len(missed) - NAMES_MAX
        parts.append("*not* sent to " + why + (f" and {more} more" if more > 0 else ""))
    return "; ".join(parts) if parts else "no customer to tell"


def announcement_reply(
    m: Maintenance, scheduled: Scheduled, now: datetime, tz: ZoneInfo, *, threaded: bool = True
) -> Reply:
    """The window's announcement: who, what, until when, why, who is affected, notices.
    ``threaded``: it is posted, and the window's summary will follow in its thread."""
    w = scheduled.window
    customers = [c.name for c in m.customers_of(w)]
    affected = f"{_names(customers)} ({len(customers)})" if customers else "none on record"
    lines = [
        f"*When*: {_when(w, now, tz)}",
        f"*Why*: {escape(w.reason)}",
        f"*Customers affected*: {affected}",
        f"*Customer notices*: {notices_line(w, scheduled.notices)}",
    ]
    cover = _cover_at(m, w, max(w.starts_at, now), tz)
    if cover is not None:
        lines.append(cover)
    text = (
        f"Maintenance {w.ref} on {w.target_kind} {w.target} by {w.created_by}, "
        f"{_when(w, now, tz)}: {w.reason}"
    )
    return Reply(
        text=text,
        blocks=[
            blocks.section(
                f":construction: *Maintenance {w.ref}* on {_where(w)}, planned by "
                f"{mention(w.created_by)}"
            ),
            *blocks.text_sections("\n".join(lines)),
            blocks.context(
                "Checks keep running and are recorded inside the window; no incident opens and "
                f"no one is paged. `/db maintenance end {w.ref}` ends it early. Its summary "
                + ("goes in this thread" if threaded else "goes to the ops channel")
                + " when it ends."
            ),
        ],
        ephemeral=False,
    )


def _cover_at(m: Maintenance, w: Window, at: datetime, tz: ZoneInfo) -> str | None:
    """Overlapping windows combine: say so when another window carries the cover on."""
    server, customer = (w.target, None) if w.target_kind == "server" else (None, w.target)
    try:
        cover = m.covering(server, customer, at)
    except DbopsError:
        return None
    if cover is None or cover.until <= w.end:
        return None
    others = [x.ref for x in cover.windows if x.id != w.id] or [cover.window.ref]
    return (
        f"*Overlaps* {', '.join(others)}: {escape(w.target)} stays covered until "
        f"{_local(cover.until, tz)}."
    )


# --- scheduling -----------------------------------------------------------------------------------


def _announce(call: Call, m: Maintenance, scheduled: Scheduled, now: datetime) -> Reply:
    """Post the announcement in OPS_CHANNEL and keep where it landed on the window; without
    Slack the announcement is the reply."""
    settings = call.rt.settings
    if settings.slack_bot_token is None:
        return announcement_reply(m, scheduled, now, call.tz, threaded=False)
    announcement = announcement_reply(m, scheduled, now, call.tz)
    w = scheduled.window
    body = announcement.message()
    message = Message(
        text=body["text"],
        blocks=body["blocks"],
        meta={"outbox_key": f"maintenance-announcement-{w.id}"},
    )
    ref: MessageRef | None = None
    try:
        ref = call.rt.notifier.post(settings.ops_channel, message)
    except NotifyError as exc:
        log.warning("could not announce %s: %s", w.ref, exc.message)
    if ref is None:
        warning = blocks.section(
            f":warning: Could not post this in {escape(settings.ops_channel)}; the window is "
            "scheduled all the same, and its summary goes to the ops channel when it ends."
        )
        unposted = announcement_reply(m, scheduled, now, call.tz, threaded=False)
        return Reply(text=unposted.text, blocks=[*unposted.blocks, warning])
    m.set_announcement(w.id, ref.channel, ref.ts)
    said = f"{_where(w)} {_when(w, now, call.tz)}"
    return Reply(
        text=f"Scheduled {w.ref} on {w.target}; announced in {settings.ops_channel}.",
        blocks=[
            blocks.section(
                f":construction: Scheduled *{w.ref}* on {said}: {escape(w.reason)}. "
                f"Announced in {_channel(ref.channel)}."
            )
        ],
    )


def _schedule(call: Call) -> Reply:
    args = call.command.args
    if "target" not in args:
        return form_reply(call, at=args.get("at"), notify="notify" in args)
    usage = call.command.spec.usage
    target = args["target"]
    if "duration" not in args:
        raise UsageError(
            f"A maintenance window on {target} needs a duration and a reason.",
            usage=usage,
            hint=f"E.g. `/db maintenance {target} 2h kernel upgrade`; "
            "`/db maintenance` alone opens a form.",
        )
    reason = args.get("reason", "")
    if not reason:
        raise UsageError(
            f"A maintenance window needs a reason: say what the work on {target} is.",
            usage=usage,
            hint=f"E.g. `/db maintenance {target} {args['duration']} kernel upgrade`.",
        )
    at = args.get("at")
    if at is not None and is_time_of_day(reason):
        # `--at 2026-12-05 02:00`: the words split at the space, and the time of day landed
        # at the start of the reason.
        clock = reason.split()[0]
        raise UsageError(
            f"{clock!r} looks like the time of day of `--at`.",
            usage=usage,
            hint=f"Write the moment as one word: `--at {at}T{clock}`.",
        )
    m = service(call.rt)
    now = call.rt.clock()
    starts = parse_target(at, call.rt.settings.timezone) if at is not None else None
    scheduled = m.schedule(
        target,
        args["duration"],
        reason,
        actor=call.actor,
        starts_at=starts,
        notify="notify" in args,
        now=now,
    )
    return _announce(call, m, scheduled, now)


# --- the form -------------------------------------------------------------------------------------


def form_view(
    tz: ZoneInfo,
    *,
    target: str | None = None,
    starts: datetime | None = None,
    notify: bool = False,
    smtp: bool = True,
) -> dict[str, Any]:
    """The modal: target, start (empty: now), duration, reason, notices. The bot adds where to
    answer to ``private_metadata`` when it opens it."""
    option = Option(
        value=NOTIFY_VALUE,
        text=PlainTextObject(text="Email the affected customers"),
        description=PlainTextObject(
            text="Now, and again when it ends."
            if smtp
            else "No SMTP server is configured (SMTP_URL): no email can go out."
        ),
    )
    target_input = PlainTextInputElement(
        action_id=TARGET_ACTION,
        placeholder=PlainTextObject(text="vps1, or a customer such as acme"),
        max_length=64,
        initial_value=target,
    )
    start_input = DateTimePickerElement(
        action_id=START_ACTION,
        initial_date_time=int(starts.timestamp()) if starts is not None else None,
    )
    view = View(
        type="modal",
        callback_id=FORM_ID,
        title=PlainTextObject(text="Maintenance window"),
        submit=PlainTextObject(text="Schedule"),
        close=PlainTextObject(text="Cancel"),
        private_metadata=json.dumps({}),
        blocks=[
            SectionBlock(
                text=MarkdownTextObject(
                    text="Inside the window checks keep running and are recorded, but no "
                    "incident opens and no one is paged. Overlapping windows combine. The "
                    "window is announced in the ops channel."
                )
            ),
            InputBlock(
                block_id=TARGET_BLOCK,
                label=PlainTextObject(text="Server or customer"),
                element=target_input,
                hint=PlainTextObject(text="A server's window covers every database on it."),
            ),
            InputBlock(
                block_id=START_BLOCK,
                label=PlainTextObject(text="Start"),
                element=start_input,
                optional=True,
                hint=PlainTextObject(
                    text=f"Empty: now. At most {MAX_AHEAD.days} days ahead. Shown in your "
                    f"Slack time zone; the announcement uses {tz.key}."
                ),
            ),
            InputBlock(
                block_id=DURATION_BLOCK,
                label=PlainTextObject(text="Duration"),
                element=PlainTextInputElement(
                    action_id=DURATION_ACTION,
                    placeholder=PlainTextObject(text="30m, 2h or 1h30m"),
                    max_length=20,
                ),
                hint=PlainTextObject(text=f"At most {pretty_span(MAX_DURATION)}."),
            ),
            InputBlock(
                block_id=REASON_BLOCK,
                label=PlainTextObject(text="Reason"),
                element=PlainTextInputElement(
                    action_id=REASON_ACTION,
                    placeholder=PlainTextObject(text="kernel upgrade"),
                    multiline=True,
                    max_length=REASON_MAX,
                ),
                hint=PlainTextObject(text="What the work is: it goes in the announcement."),
            ),
            InputBlock(
                block_id=NOTIFY_BLOCK,
                label=PlainTextObject(text="Customer notices"),
                element=CheckboxesElement(
                    action_id=NOTIFY_ACTION,
                    options=[option],
                    initial_options=[option] if notify else None,
                ),
                optional=True,
            ),
        ],
    )
    return view.to_dict()


def form_reply(call: Call, *, at: str | None = None, notify: bool = False) -> Reply:
    """The form where Slack can open it; the shell (and Slack when it cannot) gets how to
    type the same."""
    starts = parse_target(at, call.rt.settings.timezone) if at is not None else None
    view = form_view(call.tz, starts=starts, notify=notify, smtp=bool(call.rt.smtp_url))
    usage = "/db maintenance <server|customer> <duration> [--at <time>] [--notify] <reason...>"
    how = (
        f"`{escape(usage)}`\n"
        f"e.g. `{EXAMPLE}`\n"
        f"`--at`: ISO 8601, with an offset or `Z`, else in {escape(call.rt.settings.timezone)}; "
        f"without it the window starts now. At most {pretty_span(MAX_DURATION)} long, "
        f"{MAX_AHEAD.days} days ahead. `--notify` emails the affected customers."
    )
    return Reply(
        text=f"Schedule a maintenance window: {usage}, e.g. {EXAMPLE}",
        blocks=[blocks.section("*Schedule a maintenance window*"), blocks.section(how)],
        view=view,
    )


@dataclass(frozen=True)
class FormInput:
    """What the modal held when it was submitted."""

    target: str
    duration: str
    reason: str
    start: int | None  # epoch seconds (the datetimepicker's), None: now
    notify: bool

    @classmethod
    def from_state(cls, values: Mapping[str, Any]) -> FormInput:
        def field(block: str, action: str) -> Mapping[str, Any]:
            found = (values.get(block) or {}).get(action)
            return found if isinstance(found, Mapping) else {}

        def text(block: str, action: str) -> str:
            return blocks.unescape(str(field(block, action).get("value") or "")).strip()

        raw_start = str(field(START_BLOCK, START_ACTION).get("selected_date_time") or "")
        chosen = field(NOTIFY_BLOCK, NOTIFY_ACTION).get("selected_options") or []
        return cls(
            target=text(TARGET_BLOCK, TARGET_ACTION),
            duration=text(DURATION_BLOCK, DURATION_ACTION),
            reason=" ".join(text(REASON_BLOCK, REASON_ACTION).split()),
            start=int(raw_start) if raw_start.isascii() and raw_start.isdigit() else None,
            notify=any(isinstance(o, Mapping) and o.get("value") == NOTIFY_VALUE for o in chosen),
        )


def _said(exc: DbopsError) -> str:
    text = exc.message + (f" {exc.hint}" if exc.hint else "")
    return blocks.clip(text.replace("`", ""), ERROR_MAX)


def check_form(rt: Rt, form: FormInput) -> tuple[str | None, dict[str, str]]:
    """The line the form stands for, or each field's error (the modal stays open with them).
    The same checks core makes when the line runs, made now so that the person can fix them
    in the form rather than read them after it has closed."""
    errors: dict[str, str] = {}
    m = service(rt)
    now = rt.clock()
    target = ""
    if not form.target:
        errors[TARGET_BLOCK] = "Say which server or customer, e.g. vps1 or acme."
    else:
        try:
            target = m.target(form.target.lower())[1]
        except DbopsError as exc:
            errors[TARGET_BLOCK] = _said(exc)
    span = ""
    try:
        length = parse_span(form.duration)
        if length > MAX_DURATION:
            errors[DURATION_BLOCK] = (
                f"At most {pretty_span(MAX_DURATION)}: plan longer work as several windows."
            )
        span = pretty_span(length)
    except DbopsError as exc:
        errors[DURATION_BLOCK] = _said(exc)
    starts: datetime | None = None
    if form.start is not None:
        starts = datetime.fromtimestamp(form.start, UTC)
        if starts < now - PAST_GRACE:
            errors[START_BLOCK] = "That is in the past: pick a later time, or leave it empty."
        elif starts > now + MAX_AHEAD:
            errors[START_BLOCK] = f"At most {MAX_AHEAD.days} days ahead: plan it closer."
    if not form.reason:
        errors[REASON_BLOCK] = "Say what the work is, e.g. kernel upgrade."
    elif any(word.startswith("--") for word in form.reason.split()):
        errors[REASON_BLOCK] = "A word of the reason cannot start with --."
    elif not form.reason.isprintable():
        errors[REASON_BLOCK] = "The reason has characters I cannot keep: use plain words."
    if form.notify:
        if not rt.smtp_url:
            errors[NOTIFY_BLOCK] = "No SMTP server is configured (SMTP_URL): untick it."
        else:
            try:
                mail.require_branding(rt.smtp_url, rt.fleet.business)
            except DbopsError as exc:
                errors[NOTIFY_BLOCK] = _said(exc)
    if errors:
        return None, errors
    at = f" --at {starts.strftime('%Y-%m-%dT%H:%M:%SZ')}" if starts is not None else ""
    flag = " --notify" if form.notify else ""
    line = f"maintenance {target} {span}{at}{flag} {form.reason}"
    if len(line) > MAX_TEXT:
        room = len(form.reason) - (len(line) - MAX_TEXT)
        return None, {REASON_BLOCK: f"Keep the reason under {room} characters."}
    return line, {}


def progress_view(target: str, channel: str | None, ops_channel: str) -> dict[str, Any]:
    """What the form shows once submitted, while the window is scheduled and announced."""
    where = f"<#{channel}>" if channel and channel.isalnum() else "the channel"
    return View(
        type="modal",
        title=PlainTextObject(text="Maintenance window"),
        close=PlainTextObject(text="Close"),
        blocks=[
            SectionBlock(
                text=MarkdownTextObject(
                    text=f":construction: Scheduling the window on *{escape(target)}*. It is "
                    f"announced in {_channel(ops_channel)}, and the result is posted in "
                    f"{where}; you can close this."
                )
            )
        ],
    ).to_dict()


# --- the list -------------------------------------------------------------------------------------


def _matches(m: Maintenance, name: str) -> tuple[str, list[Window]]:
    """The windows about a server (its own and its customers') or a customer (its own and
    its server's): what covers it, or will."""
    kind, name = m.target(name)
    now = m.clock()
    every = m.windows(now)
    if kind == "customer":
        server = get_customer(m.engine, name).server
        return name, [w for w in every if w.covers(server, name)]
    on_server = {c.name for c in list_customers(m.engine, name)}
    return name, [
        w
        for w in every
        if w.target == name or (w.target_kind == "customer" and w.target in on_server)
    ]


def _line(w: Window, now: datetime, tz: ZoneInfo) -> str:
    status = w.status(now)
    if status == "active":
        when = f"until {_local(w.end, tz)} ({_span_of(w.end - now)} left)"
    elif status == "scheduled":
        when = f"{_local(w.starts_at, tz)} to {_local(w.ends_at, tz)}"
    elif status == "cancelled":
        when = f"cancelled by {mention(w.ended_by)}" if w.ended_by else "cancelled"
    else:
        by = f" by {mention(w.ended_by)}" if status == "ended" and w.ended_by else ""
        when = f"{status}{by} at {_local(w.end, tz)}"
    reason = blocks.clip(w.reason, REASON_SHOWN)
    return (
        f"• *{w.ref}* {_where(w)}: {when}. _{escape(reason)}_ "
        f"({mention(w.created_by)}{', notices' if w.notify else ''})"
    )


GROUPS = (
    ("active", "In maintenance now"),
    ("scheduled", "Planned"),
    ("done", "Ended in the last 24 h"),
)


def list_reply(
    windows: Sequence[Window],
    now: datetime,
    tz: ZoneInfo,
    buttons: Sequence[Any] = (),
    *,
    about: str | None = None,
) -> Reply:
    """Active windows first, then planned, then those ended in the last day; at most LIST_MAX
    of them, and a line saying how to see the rest."""
    title = f"Maintenance windows on {about}" if about else "Maintenance windows"
    if not windows:
        none = f"No maintenance window on {about}" if about else "No maintenance window"
        return Reply(
            text=f"{none} is active or planned, and none ended in the last 24 h.",
            blocks=[
                blocks.section(
                    f"{escape(none)} is active or planned, and none ended in the last 24 h. "
                    "`/db maintenance` plans one."
                )
            ],
        )

    def group(w: Window) -> str:
        status = w.status(now)
        return status if status in ("active", "scheduled") else "done"

    ordered = [w for key, _ in GROUPS for w in windows if group(w) == key]
    shown = ordered[:LIST_MAX]
    out: list[Any] = [blocks.header(title)]
    for key, label in GROUPS:
        mine = [w for w in shown if group(w) == key]
        if mine:
            lines = "\n".join(_line(w, now, tz) for w in mine)
            out += blocks.text_sections(f"*{label}* ({sum(group(w) == key for w in windows)})")
            out += blocks.text_sections(lines)
    left = len(ordered) - len(shown)
    if left:
        out.append(
            blocks.context(
                f"…and {left} more not shown here: `{escape(NARROW)}` shows one target's."
            )
        )
    if buttons:
        out.append(blocks.actions(buttons))
    counts = ", ".join(
        f"{sum(group(w) == key for w in windows)} {label.lower()}" for key, label in GROUPS
    )
    refs = ", ".join(f"{w.ref} {w.target} ({w.status(now)})" for w in shown)
    return Reply(
        text=f"{title}: {counts}. {refs}",
        blocks=out,
        overflow=f"`{escape(NARROW)}` shows one target's",
    )


def _list(call: Call) -> Reply:
    m = service(call.rt)
    now = call.rt.clock()
    name = call.command.args.get("target")
    if name is not None:
        about, found = _matches(m, name)
    else:
        about, found = None, m.windows(now)
    registry = call.router.registry
    open_ones = [w for w in found if w.status(now) in ("active", "scheduled")]
    buttons = [
        registry.button(
            f"maintenance end {w.ref}",
            label=f"{'End' if w.status(now) == 'active' else 'Cancel'} {w.ref}",
        )
        for w in open_ones[:BUTTONS_MAX]
    ]
    return list_reply(found, now, call.tz, buttons, about=about)


# --- ending ---------------------------------------------------------------------------------------


def _end(call: Call) -> Reply:
    m = service(call.rt)
    now = call.rt.clock()
    done = m.end(call.arg("window"), actor=call.actor, now=now)
    if not done:
        raise DbopsError(
            "Someone else ended that window a moment ago.",
            hint="`/db maintenance list` shows what is left.",
        )
    lines = []
    for w in done:
        if w.cancelled:
            planned = _local(w.starts_at, call.tz)
            lines.append(f"Cancelled *{w.ref}* on {_where(w)} (planned for {planned}).")
        else:
            lines.append(
                f"Ended *{w.ref}* on {_where(w)} early (it was planned until "
                f"{_local(w.ends_at, call.tz)}): paging is back on, and what still fails "
                "pages at the next health sweep."
            )
        _note_in_thread(call, w)
    if any(w.notify for w in done):
        lines.append("Customers who were told ahead get the end notice with the summary.")
    refs = ", ".join(w.ref for w in done)
    return Reply(
        text=f"Ended {refs}.",
        blocks=[
            *blocks.text_sections(":white_check_mark: " + "\n".join(lines)),
            blocks.context("Each window's summary goes in its announcement's thread."),
        ],
    )


def _note_in_thread(call: Call, w: Window) -> None:
    """Say in the announcement's thread who ended it, at once (the summary follows at the next
    sweep). A failed post is logged, not fatal: the window has ended either way."""
    settings = call.rt.settings
    if settings.slack_bot_token is None or not (w.announcement_channel and w.announcement_ts):
        return
    what = "cancelled" if w.cancelled else "ended early"
    text = f"{w.ref} was {what} by {mention(call.actor)}; its summary follows here shortly."
    try:
        call.rt.notifier.post(
            w.announcement_channel,
            Message(text=text, meta={"outbox_key": f"maintenance-ended-{w.id}"}),
            w.announcement_ts,
        )
    except NotifyError as exc:
        log.warning("could not note the end of %s in its thread: %s", w.ref, exc.message)


# --- the commands ---------------------------------------------------------------------------------


SPECS: list[Spec] = [
    Spec(
        "maintenance",
        "plan a maintenance window on a server or a customer (checks run, nobody is paged; "
        "`--at`: ISO 8601, else TIMEZONE; `--notify` emails the customers); alone, a form",
        _schedule,
        (
            Arg("target", "server", optional=True, metavar="server|customer"),
            Arg("duration", "span", optional=True),
            Arg("at", "start_time", optional=True, flag=True, metavar="time"),
            Arg("notify", "word", optional=True, flag=True, switch=True),
            Arg("reason", "text", optional=True, rest=True),
        ),
        role=Role.OPERATOR,
        form="target",
    ),
    Spec(
        "maintenance schedule",
        "the form to plan a maintenance window (start, duration, reason, customer notices)",
        _schedule,
        role=Role.OPERATOR,
        form="target",
    ),
    Spec(
        "maintenance list",
        "maintenance windows: active, planned and ended in the last day (one target's, given one)",
        _list,
        (Arg("target", "server", optional=True, metavar="server|customer"),),
        shared=True,
    ),
    Spec(
        "maintenance end",
        "end a window now (one not started yet is cancelled); paging is back on",
        _end,
        (Arg("window", "window", metavar="id|server|customer"),),
        role=Role.OPERATOR,
        button="End",
    ),
]
