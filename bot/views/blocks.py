"""Replies as Block Kit, built with slack_sdk.models.blocks (which validates Slack's limits).

Every reply is a ``Reply``: a top-level ``text`` fallback (notifications, screen readers, old
clients), at most 50 blocks and well under Slack's ~12,000 characters of block text, and a
visibility (ephemeral or in the channel). The helpers here clip text to Slack's limits on a
line boundary instead of letting a long check detail or log line make the whole reply fail;
a reply too long for one message says how much it left out and where the rest is.
(Slack's rules themselves, and the checker the tests and the stub use: bot/slack/rules.py.)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)

from bot.slack import rules as slack_rules

MAX_BLOCKS = 50
SECTION_MAX = 3000
FIELD_MAX = 2000
FIELDS_MAX = 10
CONTEXT_ELEMENTS_MAX = 10
ACTIONS_MAX = 25
HEADER_MAX = 150
BUTTON_TEXT_MAX = 75
# chat.postMessage truncates `text` at 40,000 characters; a fallback longer than a section
# helps nobody.
FALLBACK_MAX = 3000
MORE = "…"
# Block text a reply aims to stay under: Slack refuses ~12,000 (msg_blocks_too_long), and the
# transport may lengthen a little (inert markup).
BLOCK_TEXT_BUDGET = 11_000
# A button repeated in one block gets its position after this (db_incident_ack:2); the router
# runs it as the command it names (bot.commands.router.base_action_id).
REPEAT = ":"
_REPEATED = re.compile(re.escape(REPEAT) + r"\d+$")


def escape(text: object) -> str:
    """Slack mrkdwn escaping: &, < and > are the only characters Slack asks to escape.

    Anything a user typed or a server reported goes through this, so ``<!channel>`` or
    ``<https://evil|click>`` is shown as text and never pings or links.
    """
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_ENTITY = re.compile(r"&(amp|lt|gt);")
_TYPED = {"amp": "&", "lt": "<", "gt": ">"}


def unescape(text: str) -> str:
    """What a person typed, from the text Slack sends (a slash command's, a DM's, a form's):
    Slack sends a typed &, < and > as &amp;, &lt; and &gt;. Decoded once, where the text comes
    in, in one pass (a typed "&lt;" arrives as "&amp;lt;" and stays "&lt;"); ``escape`` puts
    them back wherever the text is shown in Slack again."""
    return _ENTITY.sub(lambda m: _TYPED[m.group(1)], text)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, at a line break when one is near, with a marker."""
    if len(text) <= limit:
        return text
    cut = text[: limit - len(MORE)]
    newline = cut.rfind("\n")
    if newline > limit * 0.6:
        cut = cut[:newline]
    amp = cut.rfind("&")  # never leave half an entity such as "&am"
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + MORE


def header(text: str) -> HeaderBlock:
    return HeaderBlock(text=PlainTextObject(text=clip(text, HEADER_MAX), emoji=True))


def section(mrkdwn: str, *, block_id: str | None = None) -> SectionBlock:
    return SectionBlock(text=MarkdownTextObject(text=clip(mrkdwn, SECTION_MAX)), block_id=block_id)


def fields(pairs: Sequence[tuple[str, str]]) -> SectionBlock:
    """A two-column section: ``(label, value)`` pairs, labels bold. Values are mrkdwn."""
    items = [
        MarkdownTextObject(text=clip(f"*{label}*\n{value}", FIELD_MAX))
        for label, value in pairs[:FIELDS_MAX]
    ]
    return SectionBlock(fields=items)


def context(*mrkdwn: str) -> ContextBlock:
    elements = [MarkdownTextObject(text=clip(t, SECTION_MAX)) for t in mrkdwn if t]
    return ContextBlock(elements=elements[:CONTEXT_ELEMENTS_MAX])


def divider() -> DividerBlock:
    return DividerBlock()


def button(
    label: str, action_id: str, value: str, *, primary: bool = False, danger: bool = False
) -> ButtonElement:
    """A button with no dialog: a read, or one that opens a form (``danger``: red, since the
    form leads somewhere destructive). Destructive ones are made with ``danger_button``."""
    return ButtonElement(
        text=PlainTextObject(text=clip(label, BUTTON_TEXT_MAX)),
        action_id=action_id,
        value=value,
        style="danger" if danger else "primary" if primary else None,
    )


def danger_button(
    label: str, action_id: str, value: str, *, title: str, question: str, confirm: str
) -> ButtonElement:
    """A destructive button: always red, always behind a confirm dialog.

    The dialog is only a guard against slips; the press is authorised again when it arrives.
    """
    return ButtonElement(
        text=PlainTextObject(text=clip(label, BUTTON_TEXT_MAX)),
        action_id=action_id,
        value=value,
        style="danger",
        confirm=ConfirmObject(
            title=clip(title, 100),
            text=MarkdownTextObject(text=clip(question, 300)),
            confirm=clip(confirm, 30),
            deny="Cancel",
            style="danger",
        ),
    )


def numbered(buttons: Iterable[ButtonElement]) -> list[ButtonElement]:
    """The buttons with distinct action_ids: Slack refuses a block where two share one
    (``invalid_blocks``), so each repeat gets its position: db_incident_ack,
    db_incident_ack:2, db_incident_ack:3. Each still carries its own command line as its
    value, which says which incident or customer it is for."""
    out: list[ButtonElement] = []
    seen: dict[str, int] = {}
    for button in buttons:
        action = str(button.action_id or "")
        base = _REPEATED.sub("", action)
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1 or action != base:
            button = copy.copy(button)
            button.action_id = base if seen[base] == 1 else f"{base}{REPEAT}{seen[base]}"
        out.append(button)
    return out


def actions(buttons: Iterable[ButtonElement], *, block_id: str | None = None) -> ActionsBlock:
    """One row of buttons (Slack takes 25), each with its own action_id (``numbered``)."""
    return ActionsBlock(elements=numbered(list(buttons)[:ACTIONS_MAX]), block_id=block_id)


def action_rows(buttons: Iterable[ButtonElement], *, block_id: str) -> list[ActionsBlock]:
    """Any number of buttons, as rows of at most 25 (``block_id``, ``block_id-2``, ...), every
    action_id distinct across the rows."""
    every = numbered(buttons)
    return [
        ActionsBlock(
            elements=every[i : i + ACTIONS_MAX],
            block_id=block_id if i == 0 else f"{block_id}-{i // ACTIONS_MAX + 1}",
        )
        for i in range(0, len(every), ACTIONS_MAX)
    ]


def text_sections(mrkdwn: str, *, limit: int = SECTION_MAX) -> list[SectionBlock]:
    """Long mrkdwn split into sections of at most ``limit`` characters, at line breaks."""
    out: list[SectionBlock] = []
    chunk: list[str] = []
    size = 0
    for line in mrkdwn.strip("\n").split("\n"):
        if chunk and size + len(line) + 1 > limit:
            out.append(section("\n".join(chunk)))
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1
    if chunk and any(part.strip() for part in chunk):
        out.append(section("\n".join(chunk)))
    return out


def _size(block: Block) -> int:
    return slack_rules.block_text_length([block.to_dict()])


def _lines(block: Block) -> int:
    """How many lines a reader would miss without ``block``."""
    texts = list(slack_rules.texts([block.to_dict()]))
    return sum(t.count("\n") + 1 for t in texts if t.strip()) or 1


def fitted(
    blocks: Sequence[Block], overflow: str, *, budget: int = BLOCK_TEXT_BUDGET
) -> tuple[Block, ...]:
    """``blocks`` as one Slack message takes them: at most 50, at most ``budget`` characters
    of text. Past either, the trailing buttons stay, the text is cut at a line, and a note
    says how many lines were left out and where they are (``overflow``): never silently.

    A last resort: what can be long (the morning report) splits itself into messages that
    each fit; this keeps a reply that grew past a limit from being refused outright."""
    try:
        sizes = [_size(b) for b in blocks]
    except Exception:  # an invalid block: Reply.message() raises with slack_sdk's reason
        return tuple(blocks)
    if len(blocks) <= MAX_BLOCKS and sum(sizes) <= budget:
        return tuple(blocks)
    cut = len(blocks)
    while cut > 0 and isinstance(blocks[cut - 1], ActionsBlock):
        cut -= 1
    body, tail = list(blocks[:cut]), list(blocks[cut:])
    room_blocks = MAX_BLOCKS - 1 - len(tail)
    room = budget - sum(sizes[cut:]) - 400  # the note
    kept: list[Block] = []
    dropped = 0
    for block, size in zip(body, sizes[:cut], strict=True):
        if dropped or len(kept) >= room_blocks:
            dropped += _lines(block)
        elif size <= room:
            kept.append(block)
            room -= size
        else:
            part, rest = _cut_section(block, room)
            if part is not None:
                kept.append(part)
            dropped += rest if part is not None else _lines(block)
            room = 0
    if not dropped:
        return tuple(blocks)
    note = context(
        f"…and {dropped} more line{'' if dropped == 1 else 's'} not shown here: {overflow}."
    )
    return (*kept, note, *tail)


def _cut_section(block: Block, room: int) -> tuple[Block | None, int]:
    """The first lines of a text section that fit in ``room`` characters, and how many lines
    were left; (None, ...) when nothing useful fits."""
    if not isinstance(block, SectionBlock) or block.text is None or block.fields or room < 200:
        return None, 0
    lines = str(block.text.text).split("\n")
    size, n = 0, 0
    while n < len(lines) and size + len(lines[n]) + 1 <= room:
        size += len(lines[n]) + 1
        n += 1
    if n == 0:
        return None, 0
    return section("\n".join(lines[:n])), len(lines) - n


@dataclass(frozen=True)
class Reply:
    """One message: fallback text (plain; escaped when sent), blocks, and who sees it."""

    text: str
    blocks: Sequence[Block] = ()
    ephemeral: bool = True
    # A form to open instead (a Slack modal's view JSON) where the surface can; the text and
    # blocks say how to do the same by typing, for the shell and when the form cannot open.
    view: Mapping[str, Any] | None = None
    # Where the rest is, when the reply is too long for one Slack message and is cut.
    overflow: str = "ask for less, e.g. one customer"

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("every reply needs a text fallback")
        object.__setattr__(self, "text", clip(self.text, FALLBACK_MAX))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.blocks:
            object.__setattr__(self, "blocks", fitted(self.blocks, self.overflow))

    def buttons(self) -> list[ButtonElement]:
        return [
            el
            for block in self.blocks
            if isinstance(block, ActionsBlock)
            for el in block.elements
            if isinstance(el, ButtonElement)
        ]

    @cached_property
    def _message(self) -> dict[str, Any]:
        # Built once: to_dict() validates every block, and a shared reply goes to many people.
        return {
            # Slack reads the fallback as mrkdwn too: a typed <!channel> would ping everyone.
            "text": escape(self.text),
            "blocks": [b.to_dict() for b in self.blocks],
            "response_type": "ephemeral" if self.ephemeral else "in_channel",
        }

    def message(self) -> dict[str, Any]:
        """The JSON Slack takes from chat.postMessage and response_url."""
        return dict(self._message)
