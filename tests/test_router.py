"""The `/db` parser: text in, a validated Command or a UsageError out, and nothing else; and the
command set as bot/commands/catalog.py builds it, in its written-down help order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.commands import catalog, router
from bot.commands.router import Arg, Command, Registry, Spec, UsageError
from bot.views import render
from bot.views.blocks import Reply
from core.names import NAME_RE, SERVER_RE

REGISTRY = catalog.build_registry()


def parse(text: str, registry: Registry = REGISTRY) -> Command:
    return router.parse(text, registry)


def noop(call: object) -> Reply:
    return Reply("ok")


@pytest.mark.parametrize("text", ["", "   ", "help", "HELP", "?", "--help"])
def test_help_on_nothing_and_on_help(text: str) -> None:
    assert parse(text).spec.name == "help"


def test_help_on_one_command() -> None:
    assert parse("help status").args == {"command": "status"}


def test_status_takes_a_customer_and_lowercases_it() -> None:
    command = parse("status ACME")
    assert command.spec.name == "status" and command.args == {"customer": "acme"}
    assert command.line == "status acme" and command.subject == "acme"


@pytest.mark.parametrize(
    ("text", "subject"),
    [("log acme", "acme"), ("log 12", "inc-12"), ("log INC-007", "inc-7"), ("log vps-2", "vps-2")],
)
def test_log_takes_a_customer_server_or_incident(text: str, subject: str) -> None:
    assert parse(text).args == {"subject": subject}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("status", "`status` needs <customer>"),
        ("status acme globex", "Too many arguments"),
        ("report --json", "no option"),
        ("log inc-x1", "not an incident id"),
        ("status a", "not a valid customer name"),
        ("status " + "x" * 600, "characters"),
    ],
)
def test_wrong_arguments_give_the_usage(text: str, says: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(text)
    assert says in err.value.message
    if not text.startswith("status x"):
        assert err.value.usage and err.value.usage.startswith("/db ")


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("stauts acme", "status"), ("reprot", "report"), ("sever", "servers"), ("hepl", "help")],
)
def test_typos_get_did_you_mean(typo: str, meant: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(typo)
    assert f"`/db {meant}`" in (err.value.hint or "")


def test_unknown_help_topic_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="restores"):
        parse("help restores")


def test_help_lists_every_command_in_the_written_down_order() -> None:
    """catalog.py's order, whatever order the modules were imported in: the foundation's reads,
    then backups, incidents and on-call, onboarding, restart, restore, checklists and jobs."""
    order = [
        *("help", "status", "report", "servers", "log", "backups", "backup"),
        *("incident open", "incident list", "incident ack", "incident restart", "incident resolve"),
        *("incident email", "incident email-send", "incident report", "oncall", "oncall set"),
        *("provision", "credit apply", "restart", "restore", "checklist", "jobs"),
        *("maintenance", "maintenance schedule", "maintenance list", "maintenance end"),
    ]
    assert [s.name for s in REGISTRY.specs] == order
    assert [s.name for s in catalog.build_registry().specs] == order  # a new one: the same
    listed = render.help_reply(REGISTRY.specs).text.split("what I can do: ")[1].split("; ")
    assert [u.split(" <")[0].split(" [")[0] for u in listed] == [f"/db {n}" for n in order]


def test_each_build_is_a_new_registry_with_every_kind_it_needs() -> None:
    one, two = catalog.build_registry(), catalog.build_registry()
    assert one is not two and one.specs == two.specs
    two.add(Spec("extra", "only on this one", noop))
    assert one.get("extra") is None
    used = {a.kind for s in one.specs for a in s.args}
    assert used <= set(one.kinds)
    with pytest.raises(ValueError, match="unknown kinds"):
        Registry([Spec("x", "x", noop, (Arg("plan", "plan", flag=True),))])


def test_every_button_value_parses_back_to_its_command() -> None:
    for line in ("report", "servers", "log acme", "log inc-3"):
        button = REGISTRY.button(line)
        assert REGISTRY.by_action(button.action_id) is parse(button.value).spec
        assert parse(button.value).line == line


def test_later_commands_plug_in_with_two_word_names_and_flags() -> None:
    registry = Registry(
        (s for s in REGISTRY.specs if not s.name.startswith("incident ") and s.name != "provision"),
        kinds=REGISTRY.kinds,
    )
    registry.add(Spec("incident ack", "ack an incident", noop, (Arg("incident", "subject"),)))
    registry.add(
        Spec(
            "provision",
            "new customer",
            noop,
            (
                Arg("customer", "customer"),
                Arg("plan", "word", flag=True),
                Arg("server", "server", optional=True, flag=True),
            ),
        )
    )
    assert parse("incident ack 12", registry).args == {"incident": "inc-12"}
    cmd = parse("provision newco --plan small", registry)
    assert cmd.args == {"customer": "newco", "plan": "small"}
    assert cmd.line == "provision newco --plan small"
    assert parse("help provision", registry).spec.name == "help"
    assert (
        registry.get("provision").usage
        == "/db provision <customer> --plan <plan> [--server <server>]"
    )  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="--plan"):
        parse("provision newco", registry)
    with pytest.raises(UsageError):
        parse("incident ack", registry)


def test_registry_refuses_duplicates_and_unguarded_destructive_commands() -> None:
    registry = Registry()
    registry.add(Spec("restart", "x", noop, button="Restart", destructive=True))
    with pytest.raises(ValueError, match="twice"):
        registry.add(Spec("restart", "x", noop))
    with pytest.raises(ValueError, match="button"):
        registry.add(Spec("drop", "x", noop, destructive=True))


# --- properties -------------------------------------------------------------------------------

NAMES = [s.name for s in REGISTRY.specs]
words = st.one_of(
    st.sampled_from(["acme", "ACME", "inc-12", "12", "vps-1", "--plan", "--json", "help"]),
    st.text(min_size=1, max_size=20),
    st.from_regex(r"[a-z][a-z0-9_]{0,70}", fullmatch=True),
)
lines = st.one_of(
    st.text(max_size=700),
    st.builds(
        lambda name, rest: " ".join([name, *rest]),
        st.sampled_from([*NAMES, "stat", "logs"]),
        st.lists(words, max_size=4),
    ),
)


def _valid(kind: str, value: str) -> bool:
    if kind == "customer":
        return NAME_RE.fullmatch(value) is not None
    if kind == "subject":
        return SERVER_RE.fullmatch(value) is not None or (
            value.startswith("inc-") and value[4:].isdigit() and len(value) <= 13
        )
    return REGISTRY.kinds[kind](value) == value


@settings(max_examples=600, deadline=None)
@given(lines)
def test_parse_never_raises_anything_but_usage_and_never_passes_a_bad_name(text: str) -> None:
    try:
        command = parse(text)
    except UsageError:
        return
    for arg in command.spec.args:
        if arg.name in command.args:
            assert _valid(arg.kind, command.args[arg.name]), (arg, command.args)
    assert parse(command.line) == command  # what a button carries parses back the same
