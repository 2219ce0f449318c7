"""Slack's rules for what a message or a view may hold, as one checker.

``check_message`` and ``check_view`` take the JSON Slack receives (chat.postMessage,
chat.update, a response_url post, views.open/update/push) and answer what Slack would: None,
or a ``Refusal`` with Slack's error code (``invalid_blocks``, ``msg_too_long``,
``msg_blocks_too_long``, ``no_text``, ``invalid_arguments``) and its reasons in Slack's own
style ("must be less than 3001 characters [json-pointer:/blocks/2/text/text]").

Why in bot/ rather than tests/: three parties need the very same rules. The strict Slack stub
(tests/slack_stub.py) refuses with them, the Block Kit contract and property tests assert with
them, and the renderers fit with them: the morning report splits its details by
``block_text_length``, and ``bot.views.blocks.Reply`` trims by it as a last resort. Were the numbers
in tests only, a renderer could drift from what the tests check and nobody would notice until
Slack said no. Pure functions over dicts: no slack_sdk, no I/O, so a transport (the outbox)
can also look before it sends.

The numbers are Slack's documented limits (Block Kit reference, chat.postMessage, views.open),
except ``BLOCK_TEXT_MAX``: Slack refuses a message whose blocks carry "too much" text
(``msg_blocks_too_long``) without documenting the measure; about 12,000 characters of text
objects is where it starts, so that is the line here and renderers aim well under it.
action_id: Slack's reference asks for it to be unique "among all other action_ids in the
containing block"; that is what is checked (a message may have an Ack in two blocks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MESSAGE_BLOCKS_MAX = 50
VIEW_BLOCKS_MAX = 100
MESSAGE_TEXT_MAX = 40_000  # chat.postMessage's `text`: msg_too_long beyond
BLOCK_TEXT_MAX = 12_000  # every text object in a message's blocks: msg_blocks_too_long beyond
SECTION_TEXT_MAX = 3000
FIELD_TEXT_MAX = 2000
FIELDS_MAX = 10
HEADER_TEXT_MAX = 150
CONTEXT_ELEMENTS_MAX = 10
ACTIONS_ELEMENTS_MAX = 25
BUTTON_TEXT_MAX = 75
BUTTON_VALUE_MAX = 2000
URL_MAX = 3000
OPTION_TEXT_MAX = 75
OPTION_VALUE_MAX = 150
CHOICES_MAX = 10  # checkboxes and radio buttons
SELECT_OPTIONS_MAX = 100
OVERFLOW_OPTIONS = (1, 5)
CONFIRM_TITLE_MAX = 100
CONFIRM_TEXT_MAX = 300
CONFIRM_BUTTON_MAX = 30
PLACEHOLDER_MAX = 150
LABEL_MAX = 2000
INPUT_MAX_LENGTH = 3000
VIEW_TITLE_MAX = 24  # title, submit and close
PRIVATE_METADATA_MAX = 3000
ID_MAX = 255  # block_id, action_id, callback_id, external_id

_TS = re.compile(r"^\d+\.\d+$")
_INTERACTIVE = {
    "button",
    "checkboxes",
    "radio_buttons",
    "static_select",
    "multi_static_select",
    "external_select",
    "multi_external_select",
    "users_select",
    "multi_users_select",
    "conversations_select",
    "multi_conversations_select",
    "channels_select",
    "multi_channels_select",
    "overflow",
    "datepicker",
    "timepicker",
    "datetimepicker",
    "plain_text_input",
    "email_text_input",
    "url_text_input",
    "number_input",
}


@dataclass(frozen=True)
class Refusal:
    """What Slack answers instead of ok: its error code and why, where."""

    error: str
    messages: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.error}: " + "; ".join(self.messages)


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, where: str, why: str) -> None:
        self.problems.append(f"[ERROR] {why} [json-pointer:{where}]")

    # -- composition objects ---------------------------------------------------------------

    def text(
        self, obj: Any, where: str, limit: int, *, plain: bool = False, required: bool = True
    ) -> None:
        if obj is None:
            if required:
                self.bad(where, "missing required field")
            return
        if not isinstance(obj, Mapping):
            self.bad(where, "must be a text object")
            return
        kind = obj.get("type")
        if kind not in ("plain_text", "mrkdwn") or (plain and kind != "plain_text"):
            want = "plain_text" if plain else "plain_text or mrkdwn"
            self.bad(f"{where}/type", f"must be {want}")
        text = obj.get("text")
        if not isinstance(text, str) or not text:
            self.bad(f"{where}/text", "must be more than 0 characters")
        elif len(text) > limit:
            self.bad(f"{where}/text", f"must be less than {limit + 1} characters")

    def option(self, obj: Any, where: str, *, plain: bool) -> None:
        if not isinstance(obj, Mapping):
            self.bad(where, "must be an option object")
            return
        self.text(obj.get("text"), f"{where}/text", OPTION_TEXT_MAX, plain=plain)
        value = obj.get("value")
        if not isinstance(value, str) or not value:
            self.bad(f"{where}/value", "must be more than 0 characters")
        elif len(value) > OPTION_VALUE_MAX:
            self.bad(f"{where}/value", f"must be less than {OPTION_VALUE_MAX + 1} characters")
        if obj.get("description") is not None:
            self.text(obj["description"], f"{where}/description", OPTION_TEXT_MAX, plain=plain)

    def confirm(self, obj: Any, where: str) -> None:
        if not isinstance(obj, Mapping):
            self.bad(where, "must be a confirmation dialog object")
            return
        self.text(obj.get("title"), f"{where}/title", CONFIRM_TITLE_MAX, plain=True)
        self.text(obj.get("text"), f"{where}/text", CONFIRM_TEXT_MAX)
        self.text(obj.get("confirm"), f"{where}/confirm", CONFIRM_BUTTON_MAX, plain=True)
        self.text(obj.get("deny"), f"{where}/deny", CONFIRM_BUTTON_MAX, plain=True)
        if obj.get("style") not in (None, "primary", "danger"):
            self.bad(f"{where}/style", "must be primary or danger")

    def ident(self, value: Any, where: str, *, required: bool = False) -> None:
        if value is None:
            if required:
                self.bad(where, "missing required field")
            return
        if not isinstance(value, str) or not value:
            self.bad(where, "must be more than 0 characters")
        elif len(value) > ID_MAX:
            self.bad(where, f"must be less than {ID_MAX + 1} characters")

    # -- elements --------------------------------------------------------------------------

    def options(self, options: Any, where: str, most: int, *, plain: bool, least: int = 1) -> None:
        if not isinstance(options, list) or not least <= len(options) <= most:
            self.bad(where, f"must have between {least} and {most} items")
            return
        for i, option in enumerate(options):
            self.option(option, f"{where}/{i}", plain=plain)

    def element(self, el: Any, where: str) -> None:
        if not isinstance(el, Mapping):
            self.bad(where, "must be an element object")
            return
        kind = el.get("type")
        if kind == "image":
            self.image(el, where)
            return
        if kind not in _INTERACTIVE:
            self.bad(f"{where}/type", f"unsupported element type {kind!r}")
            return
        self.ident(el.get("action_id"), f"{where}/action_id")
        if el.get("confirm") is not None:
            self.confirm(el["confirm"], f"{where}/confirm")
        if el.get("placeholder") is not None:
            self.text(el["placeholder"], f"{where}/placeholder", PLACEHOLDER_MAX, plain=True)
        if kind == "button":
            self.text(el.get("text"), f"{where}/text", BUTTON_TEXT_MAX, plain=True)
            value = el.get("value")
            if value is not None and (not isinstance(value, str) or len(value) > BUTTON_VALUE_MAX):
                self.bad(f"{where}/value", f"must be less than {BUTTON_VALUE_MAX + 1} characters")
            url = el.get("url")
            if url is not None and (not isinstance(url, str) or len(url) > URL_MAX):
                self.bad(f"{where}/url", f"must be less than {URL_MAX + 1} characters")
            if el.get("style") not in (None, "primary", "danger"):
                self.bad(f"{where}/style", "must be primary or danger")
        elif kind in ("checkboxes", "radio_buttons"):
            self.options(el.get("options"), f"{where}/options", CHOICES_MAX, plain=False)
            self.chosen(el, where, "initial_options" if kind == "checkboxes" else "initial_option")
        elif kind in ("static_select", "multi_static_select"):
            if el.get("option_groups") is not None:
                groups = el["option_groups"]
                if not isinstance(groups, list) or not 1 <= len(groups) <= SELECT_OPTIONS_MAX:
                    self.bad(f"{where}/option_groups", "must have between 1 and 100 items")
                else:
                    for i, group in enumerate(groups):
                        at = f"{where}/option_groups/{i}"
                        self.text((group or {}).get("label"), f"{at}/label", 75, plain=True)
                        self.options(
                            (group or {}).get("options"),
                            f"{at}/options",
                            SELECT_OPTIONS_MAX,
                            plain=True,
                        )
            else:
                self.options(el.get("options"), f"{where}/options", SELECT_OPTIONS_MAX, plain=True)
                single = kind == "static_select"
                self.chosen(el, where, "initial_option" if single else "initial_options")
        elif kind == "overflow":
            least, most = OVERFLOW_OPTIONS
            self.options(el.get("options"), f"{where}/options", most, plain=True, least=least)
        elif kind in ("plain_text_input", "email_text_input", "url_text_input", "number_input"):
            longest = el.get("max_length")
            if longest is not None and (
                not isinstance(longest, int) or not 0 < longest <= INPUT_MAX_LENGTH
            ):
                self.bad(f"{where}/max_length", "must be between 1 and 3000")

    def chosen(self, el: Mapping[str, Any], where: str, key: str) -> None:
        """Initial options must be among the options, as Slack compares them."""
        initial = el.get(key)
        if initial is None:
            return
        picked = initial if isinstance(initial, list) else [initial]
        values = {
            (o.get("value"), (o.get("text") or {}).get("text"))
            for o in el.get("options") or []
            if isinstance(o, Mapping)
        }
        for i, option in enumerate(picked):
            at = f"{where}/{key}" + (f"/{i}" if isinstance(initial, list) else "")
            if not isinstance(option, Mapping):
                self.bad(at, "must be an option object")
            elif (option.get("value"), (option.get("text") or {}).get("text")) not in values:
                self.bad(at, "must match one of the provided options")

    def image(self, el: Mapping[str, Any], where: str) -> None:
        url = el.get("image_url")
        good = isinstance(url, str) and 0 < len(url) <= URL_MAX
        if el.get("slack_file") is None and not good:
            self.bad(f"{where}/image_url", "must be between 1 and 3000 characters")
        alt = el.get("alt_text")
        if not isinstance(alt, str) or not 0 < len(alt) <= LABEL_MAX:
            self.bad(f"{where}/alt_text", "must be between 1 and 2000 characters")

    # -- blocks ----------------------------------------------------------------------------

    def blocks(self, blocks: Any, where: str, most: int, *, view: bool = False) -> None:
        if not isinstance(blocks, list):
            self.bad(where, "must be an array")
            return
        if len(blocks) > most:
            self.bad(where, f"no more than {most} items allowed")
        seen: set[str] = set()
        for i, block in enumerate(blocks):
            at = f"{where}/{i}"
            if not isinstance(block, Mapping):
                self.bad(at, "must be a block object")
                continue
            block_id = block.get("block_id")
            self.ident(block_id, f"{at}/block_id")
            if isinstance(block_id, str):
                if block_id in seen:
                    self.bad(f"{at}/block_id", f"block_id {block_id!r} already exists")
                seen.add(block_id)
            self.block(block, at, view=view)

    def block(self, block: Mapping[str, Any], at: str, *, view: bool) -> None:
        kind = block.get("type")
        if kind == "section":
            text, fields = block.get("text"), block.get("fields")
            if text is None and not fields:
                self.bad(at, "must provide text or fields")
            if text is not None:
                self.text(text, f"{at}/text", SECTION_TEXT_MAX)
            if fields is not None:
                if not isinstance(fields, list) or not 1 <= len(fields) <= FIELDS_MAX:
                    self.bad(f"{at}/fields", f"must have between 1 and {FIELDS_MAX} items")
                else:
                    for i, field in enumerate(fields):
                        self.text(field, f"{at}/fields/{i}", FIELD_TEXT_MAX)
            if block.get("accessory") is not None:
                self.element(block["accessory"], f"{at}/accessory")
                self.unique_actions([block["accessory"]], at)
        elif kind == "header":
            self.text(block.get("text"), f"{at}/text", HEADER_TEXT_MAX, plain=True)
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= CONTEXT_ELEMENTS_MAX:
                self.bad(f"{at}/elements", f"must have between 1 and {CONTEXT_ELEMENTS_MAX} items")
                return
            for i, el in enumerate(elements):
                if isinstance(el, Mapping) and el.get("type") == "image":
                    self.image(el, f"{at}/elements/{i}")
                else:
                    self.text(el, f"{at}/elements/{i}", SECTION_TEXT_MAX)
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= ACTIONS_ELEMENTS_MAX:
                self.bad(f"{at}/elements", f"must have between 1 and {ACTIONS_ELEMENTS_MAX} items")
                return
            for i, el in enumerate(elements):
                self.element(el, f"{at}/elements/{i}")
            self.unique_actions(elements, at)
        elif kind == "input":
            if not view:
                self.bad(f"{at}/type", "input blocks are for views")
            self.text(block.get("label"), f"{at}/label", LABEL_MAX, plain=True)
            if block.get("hint") is not None:
                self.text(block["hint"], f"{at}/hint", LABEL_MAX, plain=True)
            if block.get("element") is None:
                self.bad(f"{at}/element", "missing required field")
            else:
                self.element(block["element"], f"{at}/element")
        elif kind == "divider":
            pass
        elif kind == "image":
            self.image(block, at)
            if block.get("title") is not None:
                self.text(block["title"], f"{at}/title", LABEL_MAX, plain=True)
        elif kind in ("rich_text", "file", "video", "markdown"):
            pass  # not ours; Slack's own rules for these are not modelled
        else:
            self.bad(f"{at}/type", f"unsupported block type {kind!r}")

    def unique_actions(self, elements: Sequence[Any], at: str) -> None:
        seen: set[str] = set()
        for i, el in enumerate(elements):
            action = el.get("action_id") if isinstance(el, Mapping) else None
            if isinstance(action, str):
                if action in seen:
                    self.bad(f"{at}/elements/{i}/action_id", f"action_id {action!r} already exists")
                seen.add(action)


def texts(node: Any) -> Iterator[str]:
    """Every text object's text in ``node``, depth first."""
    if isinstance(node, list):
        for item in node:
            yield from texts(item)
    elif isinstance(node, Mapping):
        if node.get("type") in ("plain_text", "mrkdwn") and isinstance(node.get("text"), str):
            yield node["text"]
            return
        for value in node.values():
            if isinstance(value, list | Mapping):
                yield from texts(value)


def block_text_length(blocks: Any) -> int:
    """The characters of text in ``blocks`` (every text object: sections, fields, context,
    headers, labels): the measure behind ``msg_blocks_too_long``."""
    return sum(len(t) for t in texts(blocks))


def check_message(message: Mapping[str, Any]) -> Refusal | None:
    """What Slack says to chat.postMessage / chat.update / a response_url post of ``message``:
    None when it takes it."""
    blocks = message.get("blocks")
    text = message.get("text")
    if blocks is not None and not isinstance(blocks, list):
        return Refusal("invalid_blocks", ("[ERROR] must be an array [json-pointer:/blocks]",))
    has_text = isinstance(text, str) and bool(text.strip())
    if not blocks and not has_text and not message.get("attachments"):
        return Refusal("no_text", ("text, blocks or attachments is required",))
    if isinstance(text, str) and len(text) > MESSAGE_TEXT_MAX:
        return Refusal("msg_too_long", (f"text is {len(text)} characters",))
    if not blocks:
        return None
    checker = _Checker()
    checker.blocks(blocks, "/blocks", MESSAGE_BLOCKS_MAX)
    if checker.problems:
        return Refusal("invalid_blocks", tuple(checker.problems))
    length = block_text_length(blocks)
    if length > BLOCK_TEXT_MAX:
        return Refusal("msg_blocks_too_long", (f"blocks hold {length} characters of text",))
    return None


def check_view(view: Any) -> Refusal | None:
    """What Slack says to views.open / views.update / views.push / views.publish of ``view``
    (``invalid_arguments`` with where, as Slack answers a bad view)."""
    checker = _Checker()
    if not isinstance(view, Mapping):
        return Refusal("invalid_arguments", ("[ERROR] must be an object [json-pointer:/view]",))
    kind = view.get("type")
    if kind not in ("modal", "home"):
        checker.bad("/view/type", "must be modal or home")
    if kind == "modal":
        checker.text(view.get("title"), "/view/title", VIEW_TITLE_MAX, plain=True)
    for key in ("submit", "close"):
        if view.get(key) is not None:
            checker.text(view[key], f"/view/{key}", VIEW_TITLE_MAX, plain=True)
    blocks = view.get("blocks")
    if blocks is None:
        checker.bad("/view/blocks", "missing required field")
    else:
        checker.blocks(blocks, "/view/blocks", VIEW_BLOCKS_MAX, view=True)
        inputs = [b for b in blocks if isinstance(b, Mapping) and b.get("type") == "input"]
        if kind == "modal" and inputs and view.get("submit") is None:
            checker.bad("/view/submit", "must provide submit when the view has input blocks")
    meta = view.get("private_metadata")
    if meta is not None and (not isinstance(meta, str) or len(meta) > PRIVATE_METADATA_MAX):
        checker.bad("/view/private_metadata", "must be less than 3001 characters")
    for key in ("callback_id", "external_id"):
        checker.ident(view.get(key), f"/view/{key}")
    if checker.problems:
        return Refusal("invalid_arguments", tuple(checker.problems))
    return None


def is_ts(value: object) -> bool:
    """A message timestamp as Slack writes them ("1712345678.000100")."""
    return isinstance(value, str) and bool(_TS.fullmatch(value))


def assert_message_ok(message: Mapping[str, Any], what: str = "message") -> None:
    """For tests and assertions: raise AssertionError with Slack's reasons when refused."""
    refusal = check_message(message)
    if refusal is not None:
        raise AssertionError(f"Slack would refuse the {what}: {refusal}")


def assert_view_ok(view: Mapping[str, Any], what: str = "view") -> None:
    refusal = check_view(view)
    if refusal is not None:
        raise AssertionError(f"Slack would refuse the {what}: {refusal}")
