"""Files that go with a reply or a posting (charts), whatever the surface.

A handler that answers with a chart returns a ``WithFiles`` reply: the reply as usual, and its
files (core.capacity.Attachment: PNG bytes, a file name, a title, a comment). Slack uploads
them to the channel after the reply (bot.slack.client.Replier); the shell saves them to its
charts directory and prints each path (``save``). A checklist's files (Ops.checklist_attachments)
go into its thread through the notifier (bot.notifiers.upload_all).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.views.blocks import Reply
from core.capacity import Attachment

if TYPE_CHECKING:
    from core.charts import Chart

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class WithFiles(Reply):
    """A reply and the files that go with it, in the order they are shown."""

    files: tuple[Attachment, ...] = ()


def files_of(reply: Reply) -> tuple[Attachment, ...]:
    return reply.files if isinstance(reply, WithFiles) else ()


def with_files(reply: Reply, files: Iterable[Attachment]) -> WithFiles:
    """``reply`` carrying ``files`` as well (after any it carried already)."""
    return WithFiles(
        text=reply.text,
        blocks=reply.blocks,
        ephemeral=reply.ephemeral,
        view=reply.view,
        overflow=reply.overflow,
        files=(*files_of(reply), *files),
    )


def chart_file(chart: Chart, filename: str, comment: str) -> Attachment:
    """A chart as a file: ``filename`` (a PNG's), its title, and the message it comes with."""
    return Attachment(filename, chart.title, chart.png, comment)


def save(attachment: Attachment, directory: Path) -> Path:
    """Write ``attachment`` into ``directory`` (made if missing) under its own name, made safe
    for a file system, never over an existing file (``name-2.png``...); the path written."""
    directory.mkdir(parents=True, exist_ok=True)
    name = _UNSAFE.sub("_", Path(attachment.filename).name).lstrip(".") or "chart.png"
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, f".{suffix}") if dot and stem else (name, "")
    path = directory / name
    n = 1
    while True:
        try:
            with path.open("xb") as out:  # never over a file that is there
                out.write(attachment.png)
            return path
        except FileExistsError:
            n += 1
            path = directory / f"{stem}-{n}{suffix}"
