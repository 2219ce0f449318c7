"""The `/db` command router: a registry of commands, a pure parser, and the one place that runs
a command (parse -> role gate -> handler) for every surface: slash command, button, shell.

A command is a ``Spec`` (name, arguments, role, handler, usage). ``parse`` turns text into a
``Command`` whose every argument has been validated (core.names), or raises ``UsageError``
(help, usage, "did you mean"). Buttons carry a command line as their value and are parsed the
same way, so a press goes through the same validation and the same role check as typing.

The command set is bot/commands/catalog.py's ``build_registry()``: each commands module's
``SPECS`` (and the argument ``KINDS`` they use) in the order `/db help` lists them. Nothing here
is global: a ``Registry`` is passed to ``parse`` and to the ``Router``. The foundation's own
commands (help, status, report, servers, log) are this module's ``SPECS``.
"""

from __future__ import annotations

import difflib
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

from slack_sdk.models.blocks import ButtonElement

from bot.attachments import chart_file, with_files
from bot.commands.roles import Role, Roles
from bot.views import blocks, render
from bot.views.blocks import Reply
from core.errors import DbopsError
from core.names import validate_name, validate_server_name
from core.ops import Ops
from storage.events import EventLog

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Engine

    from bot.desk import Desk, Onboarding
    from core.backups import Backups
    from core.escalation import Escalator
    from core.fleet import Fleet
    from core.incidents import Incidents
    from core.maintenance import Maintenance
    from core.notify import Notifier
    from core.restarts import Restarts
    from core.settings import Settings

MAX_TEXT = 500  # longer than any command; more is a paste gone wrong
SWITCH_ON = "on"  # the value of a switch that was given (Arg.switch: --chart)
_INCIDENT = re.compile(r"^(?:inc-)?([0-9]{1,9})$")
_WORD = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")


class UsageError(DbopsError):
    """The text is not a command we know, or not the arguments it takes."""

    def __init__(self, message: str, *, usage: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.usage = usage


def shown(text: str, limit: int = 30) -> str:
    """A user's text, short and printable, for quoting back in a message."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in text)


def _customer(value: str) -> str:
    return validate_name(value.lower(), "customer")


def _server(value: str) -> str:
    return validate_server_name(value.lower())


def _subject(value: str) -> str:
    """A customer, a server or an incident (``inc-12`` or ``12``)."""
    value = value.lower()
    match = _INCIDENT.fullmatch(value)
    if match:
        return f"inc-{int(match.group(1))}"
    if value.startswith("inc-"):
        raise DbopsError(f"{shown(value)!r} is not an incident id.", hint="Use e.g. inc-12.")
    return validate_server_name(value)


def _text(value: str) -> str:
    """Free text (a summary, a cause): words kept as typed, spacing normalised."""
    value = " ".join(value.split())
    if not value or not value.isprintable():
        raise DbopsError("That text has characters I cannot keep; use plain words.")
    return value


def _word(value: str) -> str:
    value = value.lower()
    if not _WORD.fullmatch(value):
        raise DbopsError(f"{shown(value)!r} is not a word I know here.")
    return value


# The kinds of argument an event's subject is taken from (a customer, server or incident).
_SUBJECT_KINDS = ("customer", "new_customer", "server", "subject")

Kind = Callable[[str], str]
"""How a kind of argument is validated: the text typed -> the value kept, or a DbopsError."""

# The foundation's kinds of argument. A commands module that needs another kind (a plan, a
# backup, a Slack user) has its own ``KINDS``; bot/commands/catalog.py hands them all to the
# Registry.
KINDS: Mapping[str, Kind] = MappingProxyType(
    {
        "customer": _customer,
        "server": _server,
        "subject": _subject,
        "word": _word,
        "text": _text,
    }
)


class Rt(Protocol):
    """The runtime as a handler (``call.rt``) and a job see it. bot/runtime.py's ``Runtime``
    is the one there is; it is named here by what it offers so that the commands, which the
    runtime builds its registry from, never import the runtime back."""

    @property
    def settings(self) -> Settings: ...
    @property
    def clock(self) -> Callable[[], datetime]: ...
    @property
    def tz(self) -> ZoneInfo: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def events(self) -> EventLog: ...
    @property
    def fleet(self) -> Fleet: ...
    @property
    def ops(self) -> Ops: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def notifier(self) -> Notifier: ...
    @property
    def escalator(self) -> Escalator: ...
    @property
    def incidents(self) -> Incidents: ...
    @property
    def desk(self) -> Desk: ...
    @property
    def backups(self) -> Backups: ...
    @property
    def restarts(self) -> Restarts: ...
    @property
    def onboarding(self) -> Onboarding: ...
    @property
    def maintenance(self) -> Maintenance: ...
    @property
    def smtp_url(self) -> str | None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str
    optional: bool = False
    flag: bool = False  # given as --name VALUE
    metavar: str | None = None
    rest: bool = False  # the last positional only: every remaining word, as one value
    switch: bool = False  # a flag with no value (--chart): present or not, kept as SWITCH_ON

    @property
    def usage(self) -> str:
        meta = f"<{self.metavar or self.name}{'...' if self.rest else ''}>"
        text = f"--{self.name}" if self.switch else f"--{self.name} {meta}" if self.flag else meta
        return f"[{text}]" if self.optional else text


@dataclass(frozen=True)
class Call:
    """What a handler gets: the parsed command and what it needs to answer it."""

    command: Command
    actor: str
    router: Router

    @property
    def rt(self) -> Rt:
        """The process's runtime: everything a handler works with (bot/runtime.py)."""
        return self.router.rt

    @property
    def ops(self) -> Ops:
        return self.router.rt.ops

    @property
    def tz(self) -> ZoneInfo:
        return self.router.rt.tz

    def arg(self, name: str) -> str:
        return self.command.args[name]


Handler = Callable[[Call], Reply]


@dataclass(frozen=True)
class Look:
    """A preflight's answer: what the command will do, and the line its button runs when the
    look settled what the typed line left open (provision's server, chosen by capacity), so
    that the press does what was shown."""

    what: str
    line: str | None = None


@dataclass(frozen=True)
class Spec:
    name: str  # one or two words: "status", "incident ack"
    summary: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    role: Role = Role.VIEWER
    button: str | None = None  # label when the command can be a button
    destructive: bool = False  # a danger button behind a confirm dialog
    public: bool = False  # the reply goes to the channel, not only to the user
    shared: bool = False  # a read: identical calls in flight share one answer
    # The flag argument a form fills in (restore's typed name): without it the handler answers
    # with a form (``Reply.view``, a Slack modal) instead of acting; the form submits the line
    # back with the flag, through the same parse and role check.
    form: str | None = None
    # For a destructive command typed rather than pressed: the look before the confirmation
    # (a sentence on what will happen, or a DbopsError refusing at once, e.g. "nothing to
    # restart"). Typed, such a command answers with its button; the press runs it.
    preflight: Callable[[Call], str | Look] | None = None

    def needs_form(self, command: Command) -> bool:
        return self.form is not None and self.form not in command.args

    @property
    def usage(self) -> str:
        return " ".join(["/db", self.name, *(a.usage for a in self.args)])

    @property
    def action_id(self) -> str:
        return "db_" + self.name.replace(" ", "_")


@dataclass(frozen=True)
class Command:
    spec: Spec
    args: Mapping[str, str] = field(default_factory=dict)
    # Typed (a slash command, a shell line), not pressed: a destructive one asks first.
    typed: bool = field(default=False, compare=False)

    @property
    def line(self) -> str:
        """The command as text that parses back to this command (a button's value)."""
        parts = [self.spec.name]
        for arg in self.spec.args:
            if arg.name in self.args:
                value = self.args[arg.name]
                if arg.switch:
                    parts.append(f"--{arg.name}")
                else:
                    parts += [f"--{arg.name}", value] if arg.flag else [value]
        return " ".join(parts)

    @property
    def subject(self) -> str | None:
        """What the command is about, for the event log (a customer, server or incident)."""
        for arg in self.spec.args:
            if arg.kind in _SUBJECT_KINDS and arg.name in self.args:
                return self.args[arg.name]
        return None


def base_action_id(action_id: str) -> str:
    """The command's action_id of a button that may be a repeat in its block
    (``db_incident_ack:3`` -> ``db_incident_ack``)."""
    head, sep, tail = action_id.rpartition(blocks.REPEAT)
    return head if sep and tail.isdigit() and tail.isascii() else action_id


def action_pattern(action_id: str) -> re.Pattern[str]:
    """What a listener matches for ``action_id``: it and its numbered repeats."""
    return re.compile(f"^{re.escape(action_id)}(?:{re.escape(blocks.REPEAT)}[0-9]+)?$")


class Registry:
    """Commands in the order `/db help` lists them, and the kinds of argument they take
    (``kinds``: name -> validator; the foundation's ``KINDS`` unless given)."""

    def __init__(self, specs: Iterable[Spec] = (), *, kinds: Mapping[str, Kind] = KINDS) -> None:
        self._specs: dict[str, Spec] = {}
        self._kinds: Mapping[str, Kind] = MappingProxyType(dict(kinds))
        for spec in specs:
            self.add(spec)

    def add(self, spec: Spec) -> Spec:
        if spec.name in self._specs:
            raise ValueError(f"command {spec.name!r} is registered twice")
        if spec.destructive and not spec.button:
            raise ValueError(f"destructive command {spec.name!r} needs a button label")
        unknown = [a.kind for a in spec.args if a.kind not in self._kinds]
        if unknown:
            raise ValueError(f"command {spec.name!r} takes unknown kinds {unknown}")
        self._specs[spec.name] = spec
        return spec

    def copy(self) -> Registry:
        return Registry(self._specs.values(), kinds=self._kinds)

    @property
    def kinds(self) -> Mapping[str, Kind]:
        return self._kinds

    @property
    def specs(self) -> list[Spec]:
        return list(self._specs.values())

    def get(self, name: str) -> Spec | None:
        return self._specs.get(name)

    def family(self, word: str) -> list[Spec]:
        """``word`` and its subcommands ("incident" -> "incident open", "incident ack")."""
        return [s for s in self._specs.values() if s.name == word or s.name.startswith(word + " ")]

    def by_action(self, action_id: str) -> Spec | None:
        """The command a button runs, repeats included (``db_incident_ack:3``: see
        bot.views.blocks.numbered)."""
        action_id = base_action_id(action_id)
        found = [s for s in self._specs.values() if s.button and s.action_id == action_id]
        return found[0] if found else None

    def action_ids(self) -> list[str]:
        return [s.action_id for s in self._specs.values() if s.button]

    def button(self, line: str, *, label: str | None = None) -> ButtonElement:
        """The button that runs ``line`` (parsed, so a button never carries a bad name)."""
        command = parse(line, self)
        spec = command.spec
        if not spec.button:
            raise ValueError(f"{spec.name!r} has no button")
        if spec.form is not None:
            # Red, and no confirm dialog: the form it opens is the confirmation.
            return blocks.button(label or spec.button, spec.action_id, command.line, danger=True)
        if spec.destructive:
            return blocks.danger_button(
                spec.button,
                spec.action_id,
                command.line,
                title=f"{spec.button}?",
                question=f"Run `/db {blocks.escape(command.line)}`? This cannot be undone.",
                confirm=spec.button,
            )
        return blocks.button(label or spec.button, spec.action_id, command.line)

    def match(self, words: list[str]) -> tuple[Spec | None, list[str]]:
        """The longest registered name that starts ``words`` (two words before one)."""
        lowered = [w.lower() for w in words[:2]]
        for n in (2, 1):
            if len(lowered) >= n and (spec := self._specs.get(" ".join(lowered[:n]))):
                return spec, words[n:]
        return None, words


def parse(text: str, registry: Registry) -> Command:
    """Text after `/db` -> a Command with validated arguments, or a UsageError. No I/O."""
    if len(text) > MAX_TEXT:
        raise UsageError(
            f"That is {len(text):,} characters; a /db command is a few words.",
            hint="Try `/db help`.",
        )
    words = text.split()
    if not words or words[0].lower() in ("help", "?", "-h", "--help"):
        words = ["help", *words[1:]]
    spec, rest = registry.match(words)
    if spec is None:
        raise _unknown(words, registry)
    values = _bind(spec, rest)
    args: dict[str, str] = {}
    for arg in spec.args:
        if arg.name in values:
            try:
                args[arg.name] = registry.kinds[arg.kind](values[arg.name])
            except UsageError:
                raise
            except DbopsError as exc:
                raise UsageError(exc.message, usage=spec.usage, hint=exc.hint) from None
    if spec.name == "help" and "command" in args and not registry.family(args["command"]):
        raise _unknown([args["command"]], registry)
    return Command(spec, args)


def _bind(spec: Spec, words: list[str]) -> dict[str, str]:
    """The words after the command name, by argument name (not validated yet)."""
    values: dict[str, str] = {}
    positional = [a for a in spec.args if not a.flag]
    flags = {a.name: a for a in spec.args if a.flag}
    loose: list[str] = []
    it = iter(words)
    for word in it:
        if word.startswith("--") and word[2:].lower() in flags and flags[word[2:].lower()].switch:
            values[word[2:].lower()] = SWITCH_ON
        elif word.startswith("--") and word[2:].lower() in flags:
            value = next(it, None)
            if value is None:
                raise UsageError(f"{word} needs a value.", usage=spec.usage)
            values[word[2:].lower()] = value
        elif word.startswith("--"):
            raise UsageError(f"`{spec.name}` has no option {shown(word)!r}.", usage=spec.usage)
        else:
            loose.append(word)
    if positional and positional[-1].rest and len(loose) > len(positional):
        keep = len(positional) - 1
        loose = [*loose[:keep], " ".join(loose[keep:])]
    if len(loose) > len(positional):
        raise UsageError(f"Too many arguments for `{spec.name}`.", usage=spec.usage)
    values.update({a.name: v for a, v in zip(positional, loose, strict=False)})
    missing = [a for a in spec.args if not a.optional and a.name not in values]
    if missing:
        raise UsageError(
            f"`{spec.name}` needs {' and '.join(a.usage for a in missing)}.", usage=spec.usage
        )
    return values


def _unknown(words: list[str], registry: Registry) -> UsageError:
    names = [s.name for s in registry.specs]
    typed = " ".join(words[:2]).lower() if len(words) > 1 else words[0].lower()
    near = difflib.get_close_matches(typed, names, n=3, cutoff=0.6)
    near += [n for n in difflib.get_close_matches(words[0].lower(), names, n=3, cutoff=0.6)]
    near = list(dict.fromkeys(near))[:3]
    hint = "Did you mean " + " or ".join(f"`/db {n}`" for n in near) + "?" if near else None
    return UsageError(
        f"I don't know `{shown(words[0])}`.", hint=hint or "`/db help` lists what I can do."
    )


# --- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One command as it arrived: typed (``text``) or a button (``action_id`` + ``value``)."""

    actor: str
    surface: str  # "slack" or "shell": the event source
    text: str | None = None
    action_id: str | None = None
    value: str | None = None
    channel: str | None = None
    delivery: str | None = None  # the transport's idempotency key (a Slack retry repeats it)
    trigger: str | None = None  # Slack's trigger_id: lets the reply open a form (3 s to use it)
    form: str | None = None  # the form (a modal's callback_id) that submitted ``text``

    @property
    def typed(self) -> str:
        return (self.text if self.action_id is None else self.value) or ""


class Router:
    """Runs invocations: record -> parse -> gate -> handler. Blocking; call it from a thread."""

    def __init__(self, rt: Rt, *, roles: Roles, registry: Registry) -> None:
        self.rt = rt
        self.roles = roles
        self.registry = registry

    @property
    def events(self) -> EventLog:
        return self.rt.events

    @property
    def tz(self) -> ZoneInfo:
        return self.rt.tz

    @property
    def ops(self) -> Ops:
        # Built on first use: help, healthz and the shell's hints work without a fleet.
        return self.rt.ops

    def begin(self, inv: Invocation) -> Command | None:
        """Record the invocation, parse it and check the user's role.

        None when ``inv.delivery`` was already recorded: a retried delivery whose first copy was
        accepted is dropped here, whichever copy got here first.
        """
        text = inv.typed or ""
        error: DbopsError | None = None
        command: Command | None = None
        button = self.registry.by_action(inv.action_id) if inv.action_id else None
        try:
            if inv.action_id is not None and button is None:
                raise UsageError("That button belongs to a command this dbops no longer has.")
            command = parse(text, self.registry)
            if button is not None and command.spec is not button:
                raise UsageError("That button does not match its command.")
        except DbopsError as exc:
            error = exc
        nonce = uuid.uuid4().hex
        payload: dict[str, Any] = {
            "text": text[:200],
            "surface": inv.surface,
            "channel": inv.channel,
            "ok": error is None,
            "nonce": nonce,
        }
        if inv.action_id is not None:
            payload["action_id"] = inv.action_id[:100]
        if inv.form is not None:
            payload["form"] = inv.form[:100]
        kind = "button" if inv.action_id is not None else "form" if inv.form else "command"
        stored = self.events.append(
            kind,
            command.subject if command else None,
            payload,
            actor=inv.actor,
            source=inv.surface,
            source_id=inv.delivery,
        )
        if stored.payload.get("nonce") != nonce:
            # A retry of a delivery already accepted: say so in the log, run nothing.
            self.events.append(
                "delivery.repeated",
                stored.subject,
                {"delivery": inv.delivery, "first_event": stored.id, "surface": inv.surface},
                actor=inv.actor,
            )
            return None
        if error is not None:
            raise error
        assert command is not None
        self.roles.require(
            inv.actor,
            command.spec.role,
            f"/db {command.spec.name}",
            events=self.events,
            surface=inv.surface,
            subject=command.subject,
        )
        return replace(command, typed=inv.action_id is None and inv.form is None)

    def execute(self, command: Command, actor: str) -> Reply:
        spec = command.spec
        if command.typed and spec.destructive:
            return self._confirm_first(command, actor)
        reply = spec.handler(Call(command, actor, self))
        # What a form confirmed (a restore) is news for the channel; the form itself is not.
        public = spec.public or (spec.form is not None and not spec.needs_form(command))
        return replace(reply, ephemeral=not public)

    def _confirm_first(self, command: Command, actor: str) -> Reply:
        """A destructive command typed: what it will do, and its button (behind Slack's
        confirm dialog) to do it. Nothing has run; the press goes through the gate again."""
        spec = command.spec
        look = spec.preflight(Call(command, actor, self)) if spec.preflight else spec.summary
        look = look if isinstance(look, Look) else Look(look)
        what = look.what.rstrip(". ")
        line = look.line or command.line
        return Reply(
            text=f"/db {line}: {what}. Press {spec.button} to go ahead.",
            blocks=[
                blocks.section(
                    f":warning: `/db {blocks.escape(line)}`: {blocks.escape(what)}.\n"
                    f"Press *{blocks.escape(spec.button)}* to go ahead (Slack asks once more)."
                ),
                blocks.actions([self.registry.button(line)]),
            ],
        )

    def run(self, inv: Invocation) -> Reply | None:
        command = self.begin(inv)
        return None if command is None else self.execute(command, inv.actor)


# --- the foundation's commands (bot/commands/catalog.py lists them first) --------------------


def _help(call: Call) -> Reply:
    topic = call.command.args.get("command")
    return render.help_reply(call.router.registry.specs, topic)


def _status(call: Call) -> Reply:
    name = call.arg("customer")
    status = call.ops.status(name)
    registry = call.router.registry
    buttons = [registry.button("report"), registry.button(f"log {name}")]
    reply = render.status_reply(status, call.tz, buttons)
    if "chart" not in call.command.args:
        return reply
    now = call.rt.clock()
    chart = call.ops.customer_chart(name, now)
    comment = f"`/db status {name} --chart`"
    return with_files(reply, [chart_file(chart, f"{name}-{now:%Y%m%d-%H%M}.png", comment)])


def _report(call: Call) -> Reply:
    return render.report_reply(call.ops.report(), call.tz, [call.router.registry.button("servers")])


def _servers(call: Call) -> Reply:
    buttons = [call.router.registry.button("report")]
    reply = render.servers_reply(call.ops.servers(), call.tz, buttons)
    if "chart" not in call.command.args:
        return reply
    now = call.rt.clock()
    chart = call.ops.fleet_chart(now)
    filename = f"fleet-disk-{now:%Y%m%d-%H%M}.png"
    return with_files(reply, [chart_file(chart, filename, "`/db servers --chart`")])


def _log(call: Call) -> Reply:
    subject = call.arg("subject")
    return render.log_reply(subject, call.ops.log(subject), call.tz)


# `--chart`: the reply comes with a chart (a PNG uploaded after it; the shell saves it).
CHART = Arg("chart", "word", optional=True, flag=True, switch=True)

SPECS: list[Spec] = [
    Spec("help", "what I can do", _help, (Arg("command", "word", optional=True),)),
    Spec(
        "status",
        "a customer's database: online, size, connections, last backup, disk, runway, "
        "recovery window, problems; --chart: its size and connections over 30 days",
        _status,
        (Arg("customer", "customer"), CHART),
        public=True,
        shared=True,
    ),
    Spec(
        "report",
        "the morning health check (SOP-101) across the fleet",
        _report,
        button="Report",
        public=True,
        shared=True,
    ),
    Spec(
        "servers",
        "every server: reachable, PostgreSQL, customers, disk runway, problems; "
        "--chart: every disk over 30 days",
        _servers,
        (CHART,),
        button="Servers",
        public=True,
        shared=True,
    ),
    Spec(
        "log",
        "the latest events about a customer, a server or an incident",
        _log,
        (Arg("subject", "subject", metavar="customer|incident"),),
        button="Log",
        shared=True,
    ),
]
