"""`dbops shell`: the bot in a terminal. Same router, same blocks, rendered as text.

Reads lines from stdin (so it can be piped): ``/db ...`` runs a command, ``press N`` presses
button N of the last reply through the same path (and the same role check) as a Slack button.
A button with a confirm dialog asks for ``yes`` on the next line. A reply's files (the chart of
``/db status acme --chart``) are saved in ``charts_dir``, the current directory unless given,
never over an existing file, and each path is printed.
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    SectionBlock,
    TextObject,
)

from bot.attachments import files_of, save
from bot.commands.errors import reply_for
from bot.commands.router import Invocation, Router
from bot.views.blocks import Reply

HINT = "Type `/db help` for commands, `press N` to press button N, `exit` to leave."
_LINK = re.compile(r"<([^<>|]+)\|([^<>]+)>")
_MENTION = re.compile(r"<[@#!]([^<>|]+)(?:\|([^<>]+))?>")
_EMOJI = {
    ":large_green_circle:": "[ok]",
    ":large_yellow_circle:": "[warn]",
    ":red_circle:": "[CRIT]",
    ":white_circle:": "[?]",
    ":white_check_mark:": "[ok]",
    ":warning:": "[!]",
    ":no_entry:": "[denied]",
    ":thinking_face:": "[?]",
    ":boom:": "[error]",
    ":rotating_light:": "[!!]",
    ":grey_question:": "[?]",
}


def plain(mrkdwn: str) -> str:
    """mrkdwn -> terminal text: links and mentions as words, emoji as tags, entities undone."""
    text = _LINK.sub(r"\2", mrkdwn)
    text = _MENTION.sub(lambda m: m.group(2) or m.group(1), text)
    for code, tag in _EMOJI.items():
        text = text.replace(code, tag)
    text = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w_])_([^_\n]+)_(?![\w_])", r"\1", text)
    return html.unescape(text)


def _text(obj: TextObject | str | None) -> str:
    if obj is None:
        return ""
    return plain(obj if isinstance(obj, str) else obj.text)


def render_blocks(blocks: Sequence[Block], first: int = 1) -> tuple[str, list[ButtonElement]]:
    """Blocks as text; buttons numbered ``[1] Report`` from ``first``. Returns the text and the
    buttons in number order."""
    lines: list[str] = []
    buttons: list[ButtonElement] = []
    for block in blocks:
        if isinstance(block, HeaderBlock):
            title = _text(block.text)
            lines += [title, "=" * len(title)]
        elif isinstance(block, SectionBlock):
            if block.text is not None:
                lines.append(_text(block.text))
            for f in block.fields or []:
                label, _, value = _text(f).partition("\n")
                lines.append(f"  {label}: {value}")
        elif isinstance(block, ContextBlock):
            parts = [_text(e) for e in block.elements if isinstance(e, TextObject)]
            lines.append("  (" + " | ".join(parts) + ")")
        elif isinstance(block, DividerBlock):
            lines.append("-" * 40)
        elif isinstance(block, ActionsBlock):
            labels = []
            for el in block.elements:
                if isinstance(el, ButtonElement):
                    buttons.append(el)
                    mark = " (!)" if el.style == "danger" else ""
                    labels.append(f"[{first + len(buttons) - 1}] {_text(el.text)}{mark}")
            lines.append("  ".join(labels))
    return "\n".join(lines), buttons


class Shell:
    def __init__(
        self,
        router: Router,
        actor: str,
        out: TextIO | None = None,
        *,
        charts_dir: Path | None = None,
    ) -> None:
        self.router = router
        self.actor = actor
        self.out = out or sys.stdout
        self.charts_dir = charts_dir
        self.buttons: list[ButtonElement] = []
        self._confirming: ButtonElement | None = None

    def say(self, text: str) -> None:
        self.out.write(text.rstrip("\n") + "\n")
        self.out.flush()

    def show(self, reply: Reply | None) -> None:
        if reply is None:
            return
        text, self.buttons = render_blocks(reply.blocks)
        self.say(text or reply.text)
        for attachment in files_of(reply):
            try:
                path = save(attachment, self.charts_dir or Path.cwd())
            except OSError as exc:
                self.say(f"[!] Could not save {attachment.filename}: {exc.strerror or exc}")
            else:
                self.say(f"Chart saved: {path} ({attachment.title})")

    def run_invocation(self, inv: Invocation) -> None:
        try:
            reply = self.router.run(inv)
        except Exception as exc:
            reply = reply_for(exc, where="shell")
        self.show(reply)

    def press(self, button: ButtonElement) -> None:
        self.run_invocation(
            Invocation(self.actor, "shell", action_id=button.action_id, value=button.value)
        )

    def handle(self, line: str) -> bool:
        """One line of input; False when the user asked to leave."""
        line = line.strip()
        if self._confirming is not None:
            button, self._confirming = self._confirming, None
            if line.lower() in ("y", "yes"):
                self.press(button)
            else:
                self.say("Cancelled.")
            return True
        if not line:
            return True
        if line in ("exit", "quit", "\\q"):
            return False
        word, _, rest = line.partition(" ")
        if word == "/db":
            self.run_invocation(Invocation(self.actor, "shell", text=rest))
        elif word == "press":
            self._press(rest.strip())
        else:
            self.say(HINT)
        return True

    def _press(self, number: str) -> None:
        if not number.isdigit() or not 1 <= int(number) <= len(self.buttons):
            count = len(self.buttons)
            self.say(f"No button {number or '?'}; the last reply has {count} button(s).")
            return
        button = self.buttons[int(number) - 1]
        if button.confirm is not None:
            confirm = button.confirm
            self.say(f"{_text(confirm.title)}: {_text(confirm.text)} Type yes to go ahead.")
            self._confirming = button
            return
        self.press(button)

    def loop(self, lines: Iterable[str], prompt: bool = False) -> None:
        if prompt:
            self.out.write("dbops> ")
            self.out.flush()
        for line in lines:
            if not self.handle(line):
                return
            if prompt:
                self.out.write("dbops> ")
                self.out.flush()
