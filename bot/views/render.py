"""Core's data -> replies (bot.views.blocks.Reply). Long text comes from templates/slack/*.md.j2.

The templates run in Jinja's sandbox, and every ``{{ }}`` is mrkdwn-escaped on the way out
(``finalize``) unless the value was built here as ``Mrkdwn``: customer names, check details and
log lines come from users and servers, and must never turn into a ``<!channel>`` or a link.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from slack_sdk.models.blocks import Block, ButtonElement

from bot.commands.roles import Role
from bot.views import blocks
from bot.views.blocks import Reply, escape
from core.errors import DbopsError
from core.report import text_view
from core.settings import SLACK_USER_ID
from core.units import pretty_age, pretty_bytes
from storage.events import StoredEvent

TEMPLATES = Path(__file__).resolve().parents[2] / "templates" / "slack"
ROLES_NOTE = (
    "Anyone may read; operators may ack, back up and restart; admins may restore and provision."
)
EMOJI = {
    "ok": ":large_green_circle:",
    "warn": ":large_yellow_circle:",
    "crit": ":red_circle:",
    "unknown": ":white_circle:",
}


class Mrkdwn(str):
    """Text that is already mrkdwn (escaped, or built only from our own constants)."""

    __slots__ = ()


def mrkdwn(value: object) -> Mrkdwn:
    return value if isinstance(value, Mrkdwn) else Mrkdwn(escape("" if value is None else value))


def _finalize(value: object) -> object:
    if isinstance(value, Mrkdwn) or not isinstance(value, str):
        return value if value is not None else ""
    return mrkdwn(value)


def _mention(user: object) -> Mrkdwn:
    text = str(user)
    return Mrkdwn(f"<@{text}>") if re.fullmatch(SLACK_USER_ID, text) else mrkdwn(text)


@lru_cache(maxsize=8)
def _env(tz_name: str) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=False,
        finalize=_finalize,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    tz = ZoneInfo(tz_name)
    env.filters["mrkdwn"] = mrkdwn
    env.filters["emoji"] = lambda v: Mrkdwn(EMOJI.get(str(v), ":white_circle:"))
    env.filters["mention"] = _mention
    env.filters["bytes"] = lambda n: "?" if n is None else pretty_bytes(int(n))
    env.filters["age"] = lambda s: "?" if s is None else pretty_age(int(s))
    env.filters["when"] = lambda ts: local_time(ts, tz)
    return env


def template(name: str, tz: ZoneInfo, **data: Any) -> str:
    return _env(tz.key).get_template(name).render(**data).strip("\n")


def local_time(ts: datetime | str | None, tz: ZoneInfo, fmt: str = "%Y-%m-%d %H:%M %Z") -> str:
    if ts is None or ts == "":
        return "never"
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(tz).strftime(fmt)


def _check(checks: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((c for c in checks if c["name"] == name), None)


# --- help, errors ----------------------------------------------------------------------------


class Listed(Protocol):
    """A command as `/db help` lists it (bot.commands.router's Spec)."""

    @property
    def name(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def usage(self) -> str: ...
    @property
    def role(self) -> Role: ...


def help_reply(specs: Sequence[Listed], topic: str | None = None) -> Reply:
    shown = [s for s in specs if topic is None or s.name.split()[0] == topic]
    view = [{"usage": s.usage, "summary": s.summary, "role": s.role.label} for s in shown]
    body = template("help.md.j2", ZoneInfo("UTC"), specs=view)
    title = f"/db {topic}" if topic else "dbops: what I can do"
    lines = "; ".join(s.usage for s in shown)
    return Reply(
        text=f"{title}: {lines}",
        blocks=[
            blocks.section(f"*{escape(title)}*"),
            *blocks.text_sections(body),
            blocks.context(ROLES_NOTE),
        ],
    )


def error_reply(exc: DbopsError, *, usage: str | None = None, icon: str = ":warning:") -> Reply:
    body = template(
        "error.md.j2",
        ZoneInfo("UTC"),
        icon=Mrkdwn(icon),
        message=exc.message,
        hint=exc.hint,
        usage=usage,
    )
    # Core names people as <@U123> ("already acknowledged by <@U123>"): shown as the person.
    # Only user mentions come back; an error is seen by its user alone, so nobody is pinged.
    body = _ESCAPED_MENTION.sub(r"<@\1>", body)
    text = " ".join(p for p in (exc.message, exc.hint, f"Usage: {usage}" if usage else "") if p)
    return Reply(text=text, blocks=list(blocks.text_sections(body)))


_ESCAPED_MENTION = re.compile(r"&lt;@(" + SLACK_USER_ID.strip("^$") + r")&gt;")


def internal_error_reply(correlation_id: str) -> Reply:
    msg = (
        f":boom: Something went wrong on my side. Reference `{correlation_id}`: "
        "an operator can find it in the dbops log."
    )
    return Reply(
        text=f"Something went wrong on my side (reference {correlation_id}).",
        blocks=[blocks.section(msg)],
    )


# --- status ----------------------------------------------------------------------------------


STATUS_DETAIL_MAX = 400  # `dbops status CUSTOMER --json` has the whole detail


def _status_view(status: Mapping[str, Any], tz: ZoneInfo) -> dict[str, Any]:
    """What the status reply shows, as plain (unescaped) text."""
    db, server = status["database"], status["server"]
    name, host = status["customer"], server["name"]
    age = (_check(db["checks"], "backup_age") or {}).get("value")
    if db["last_backup_at"]:
        backup = local_time(db["last_backup_at"], tz)
        backup += f" ({pretty_age(int(age))} ago)" if isinstance(age, int) else ""
    else:
        backup = "none found"
    used = status["disk"]["used_percent"]
    checks = [{**c, "where": host} for c in server["checks"]]
    checks += [{**c, "where": name} for c in db["checks"]]
    return {
        "name": name,
        "host": host,
        "online": "online" if db["online"] else "OFFLINE",
        "why": "" if db["online"] else (_check(db["checks"], "connection") or {}).get("detail"),
        "size": "?" if db["size_bytes"] is None else pretty_bytes(int(db["size_bytes"])),
        "connections": "?" if status["connections"] is None else str(status["connections"]),
        "backup": backup,
        "disk": "unknown" if used is None else f"{used}% used",
        "plan": status.get("plan") or "?",
        "verdict": status["verdict"],
        # Each problem's detail cut to a glance, so every failing check fits in the message.
        "problems": [
            {**c, "detail": blocks.clip(str(c.get("detail") or ""), STATUS_DETAIL_MAX)}
            for c in checks
            if c["verdict"] in ("warn", "crit")
        ],
        "unchecked": [c["name"] for c in checks if c["verdict"] == "unknown"],
    }


def status_reply(
    status: Mapping[str, Any], tz: ZoneInfo, buttons: Iterable[ButtonElement] = ()
) -> Reply:
    v = _status_view(status, tz)
    icon = EMOJI["ok" if v["online"] == "online" else "crit"]
    head = f"{icon} *{escape(v['name'])}* is *{v['online']}* on *{escape(v['host'])}*"
    head += f": {escape(v['why'])}" if v["why"] else ""
    note = f"Checked {local_time(status.get('generated_at'), tz)} in {status.get('duration_ms')} ms"
    note += "; not checked: " + ", ".join(v["unchecked"]) if v["unchecked"] else ""
    out: list[Block] = [
        blocks.section(head),
        blocks.fields(
            [
                ("Size", escape(v["size"])),
                ("Connections", escape(v["connections"])),
                ("Last backup", escape(v["backup"])),
                ("Server disk", escape(v["disk"])),
                ("Plan", escape(v["plan"])),
                ("Verdict", f"{EMOJI.get(v['verdict'], '')} {escape(v['verdict'])}"),
            ]
        ),
        *blocks.text_sections(
            template(
                "status.md.j2",
                tz,
                problems=v["problems"],
                server=v["host"],
                runway=status["server"].get("runway"),
                recovery=status["database"].get("recovery"),
            )
        ),
        blocks.context(escape(note)),
    ]
    if buttons := list(buttons):
        out.append(blocks.actions(buttons, block_id=f"status:{v['name']}"[:255]))
    count = len(v["problems"])
    text = (
        f"{v['name']} on {v['host']}: {v['online']}, {v['size']}, {v['connections']} "
        f"connections, last backup {v['backup']}, disk {v['disk']}; "
        f"{count} problem{'' if count == 1 else 's'}"
    )
    return Reply(
        text=text, blocks=out, overflow="`dbops status <customer> --json` has every check in full"
    )


# --- report, servers -------------------------------------------------------------------------


# Block text per message of the report: well under Slack's ~12,000 (bot/slack/rules.py), with
# room for the header, the notes and the buttons.
REPORT_PART_BUDGET = 9000
REPORT_ELSEWHERE = (
    "`dbops report` prints them all, and the morning report posts them all in its thread; "
    "`/db status <customer>` shows one customer"
)


def report_text(report: Mapping[str, Any]) -> str:
    """The report in one line (plain): the verdict and the counts. Always short."""
    summary = report["summary"]
    return (
        f"Morning health check {summary['verdict'].upper()}: {summary['servers_up']}/"
        f"{summary['servers_total']} servers, {summary['databases_online']}/"
        f"{summary['databases_total']} databases online, {summary['backups_ok']}/"
        f"{summary['databases_total']} backups ok"
    )


def paginate(lines: Sequence[str], budget: int) -> list[list[str]]:
    """``lines`` in pages of at most ``budget`` characters, every line kept, in order. A page
    that starts inside a list repeats the list's heading, marked continued."""
    pages: list[list[str]] = []
    page: list[str] = []
    size, heading = 0, ""
    for line in lines:
        line = blocks.clip(line, blocks.SECTION_MAX - 200)
        item = line[:1].isspace()
        if page and size + len(line) + 1 > budget:
            pages.append(page)
            page, size = [], 0
            if item and heading:
                page.append(f"{heading} _(continued)_")
                size += len(page[0]) + 1
        if not item and line.strip():
            heading = line
        page.append(line)
        size += len(line) + 1
    if page:
        pages.append(page)
    return pages or [[]]


def _report_pages(
    report: Mapping[str, Any], tz: ZoneInfo, budget: int
) -> tuple[dict[str, Any], list[list[str]]]:
    view = text_view(report, tz)
    body = template("report.md.j2", tz, **view)
    return view, paginate(body.split("\n"), budget)


def _counted(pages: Sequence[Sequence[str]]) -> int:
    """The report's own lines in ``pages`` (not the continued headings)."""
    return sum(1 for p in pages for line in p if line.strip() and "_(continued)_" not in line)


def report_parts(report: Mapping[str, Any], tz: ZoneInfo) -> list[Reply]:
    """The whole report, every line of it, as as many messages as it takes, each of which
    Slack takes: the morning report's thread. The first has the header; each says which part
    it is when there are several."""
    view, pages = _report_pages(report, tz, REPORT_PART_BUDGET)
    verdict = view["summary"]["verdict"]
    when = f"{view['when']}; {view['duration_ms']} ms"
    out = []
    for k, page in enumerate(pages, 1):
        parts: list[Block] = [blocks.header(f"Morning health check: {verdict.upper()}")]
        parts = parts if k == 1 else []
        parts += blocks.text_sections("\n".join(page))
        note = when if len(pages) == 1 else f"Part {k} of {len(pages)} · {when}"
        parts.append(blocks.context(escape(note)))
        text = report_text(report)
        text = text if k == 1 else f"Morning health check, part {k} of {len(pages)}"
        out.append(Reply(text=text, blocks=parts, ephemeral=False))
    return out


def report_summary(report: Mapping[str, Any], *, parts: int = 1, late_s: int = 0) -> Reply:
    """What the morning report posts in the channel: one line that always fits; the report
    itself (``report_parts``) goes in its thread."""
    text = report_text(report)
    if late_s > 120:
        text = f"(posted {late_s // 60} min late) {text}"
    out: list[Block] = [blocks.section(escape(text))]
    if parts > 1:
        out.append(blocks.context(f"Every line of the report is in the thread: {parts} messages."))
    return Reply(text=text, blocks=out, ephemeral=False)


def report_reply(
    report: Mapping[str, Any], tz: ZoneInfo, buttons: Iterable[ButtonElement] = ()
) -> Reply:
    """`/db report`: one message. On a bad morning that is the top of the report and how many
    lines are left out, and where they are (the morning report's thread has every one)."""
    view, pages = _report_pages(report, tz, REPORT_PART_BUDGET)
    verdict = view["summary"]["verdict"]
    out: list[Block] = [
        blocks.header(f"Morning health check: {verdict.upper()}"),
        *blocks.text_sections("\n".join(pages[0])),
    ]
    if len(pages) > 1:
        left = _counted(pages[1:])
        out.append(
            blocks.context(
                f"…and {left} more line{'' if left == 1 else 's'} not shown here: "
                + REPORT_ELSEWHERE
                + "."
            )
        )
    out.append(blocks.context(escape(f"{view['when']}; {view['duration_ms']} ms")))
    if buttons := list(buttons):
        out.append(blocks.actions(buttons, block_id="report"))
    return Reply(text=report_text(report), blocks=out, overflow=REPORT_ELSEWHERE)


def servers_reply(
    servers: Sequence[Mapping[str, Any]], tz: ZoneInfo, buttons: Iterable[ButtonElement] = ()
) -> Reply:
    view = []
    for s in servers:
        disk = _check(s["checks"], "disk_space") or {}
        ok = s["reachable"] and s["postgres"] == "up"
        problems = [c for c in s.get("problems", []) if c["verdict"] in ("warn", "crit")]
        state = "crit" if not ok else ("warn" if problems else "ok")
        summary = (
            "not reachable"
            if not s["reachable"]
            else ("PostgreSQL up" if s["postgres"] == "up" else "PostgreSQL DOWN")
        )
        value = disk.get("value")
        view.append(
            {
                "name": s["name"],
                "state": state,
                "summary": summary,
                "customers": s.get("customers", 0),
                "disk": value if isinstance(value, int) else None,
                "runway": s.get("runway"),
                "problems": problems,
            }
        )
    up = sum(1 for v in view if v["state"] != "crit")
    out: list[Block] = [
        blocks.section(f"*Servers*: {up}/{len(view)} up"),
        *blocks.text_sections(template("servers.md.j2", tz, servers=view) or "No servers."),
    ]
    if buttons := list(buttons):
        out.append(blocks.actions(buttons, block_id="servers"))
    names = ", ".join(f"{v['name']} {'up' if v['state'] != 'crit' else 'DOWN'}" for v in view)
    return Reply(
        text=f"Servers: {up}/{len(view)} up ({names})",
        blocks=out,
        overflow="`dbops report` and the morning report's thread list every server's problems",
    )


# --- log -------------------------------------------------------------------------------------


def _summary(event: StoredEvent) -> str:
    payload = event.payload
    for key in ("text", "summary", "message", "detail"):
        if isinstance(payload.get(key), str) and payload[key]:
            return str(payload[key])[:160]
    shown = {k: v for k, v in payload.items() if k not in ("nonce",)}
    text = json.dumps(shown, ensure_ascii=False, sort_keys=True, default=str)
    return "" if text == "{}" else text[:160]


def log_reply(subject: str, events: Sequence[StoredEvent], tz: ZoneInfo) -> Reply:
    view = [
        {"ts": e.ts, "kind": e.kind, "actor": e.actor, "summary": _summary(e)}
        for e in reversed(events)  # newest first
    ]
    body = template("log.md.j2", tz, events=view)
    title = f"*Log of {escape(subject)}*: {len(view)} latest event{'' if len(view) == 1 else 's'}"
    out: list[Block] = [blocks.section(title), *blocks.text_sections(body or "_Nothing yet._")]
    return Reply(
        text=f"Log of {subject}: {len(view)} events",
        blocks=out,
        overflow="`dbops events tail` has every event",
    )
