"""Replies as Block Kit, built with slack_sdk.models.blocks (which validates Slack's limits).

Every reply is a ``Reply``: a top-level ``text`` fallback (notifications, screen readers, old
clients), at most 50 blocks, and a visibility (ephemeral or in the channel). The helpers here
clip text to Slack's limits on a line boundary instead of letting a long check detail or log
line make the whole reply fail.
"""

from __future__ import annotations

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


def escape(text: object) -> str:
    """Slack mrkdwn escaping: &, < and > are the only characters Slack asks to escape.

    Anything a user typed or a server reported goes through this, so ``<!channel>`` or
    ``<https://evil|click>`` is shown as text and never pings or links.
    """
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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


def actions(buttons: Iterable[ButtonElement], *, block_id: str | None = None) -> ActionsBlock:
    return ActionsBlock(elements=list(buttons)[:ACTIONS_MAX], block_id=block_id)


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


@dataclass(frozen=True)
class Reply:
    """One message: fallback text (plain; escaped when sent), blocks, and who sees it."""

    text: str
    blocks: Sequence[Block] = ()
    ephemeral: bool = True
    # A form to open instead (a Slack modal's view JSON) where the surface can; the text and
    # blocks say how to do the same by typing, for the shell and when the form cannot open.
    view: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("every reply needs a text fallback")
        object.__setattr__(self, "text", clip(self.text, FALLBACK_MAX))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if len(self.blocks) > MAX_BLOCKS:
            # Keep the buttons (the last block, by our convention) and say what was dropped.
            tail = self.blocks[-1:] if isinstance(self.blocks[-1], ActionsBlock) else []
            room = MAX_BLOCKS - 1 - len(tail)
            dropped = len(self.blocks) - len(tail) - room
            note = context(f"{dropped} more block(s) not shown; ask for less, e.g. one customer.")
            object.__setattr__(self, "blocks", (*self.blocks[:room], note, *tail))

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
