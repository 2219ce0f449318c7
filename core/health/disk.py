"""disk_space, through the server's runner: ``df`` on the data, WAL and backup paths."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.fleet import Server
from core.health.thresholds import (
    BadThreshold,
    Check,
    Number,
    Verdict,
    _unknown,
    parse_bytes,
    parse_percent,
)
from core.remote import CommandResult
from core.units import pretty_bytes


@dataclass(frozen=True)
class Filesystem:
    device: str
    mount: str
    size_bytes: int
    used_bytes: int
    avail_bytes: int
    used_percent: int
    paths: tuple[str, ...]


def df_argv(server: Server) -> list[str]:
    paths = list(dict.fromkeys([server.data_path, server.wal_dir, server.backup_path]))
    return ["df", "-P", "-B1", "--", *paths]


def parse_df(result: CommandResult, paths: Sequence[str]) -> list[Filesystem]:
    """`df -P -B1 -- paths` rows, one per filesystem, each with the paths it holds.

    df prints the rows in argument order and skips (to stderr) the paths it cannot read.
    """
    failed = {p for p in paths if f"{p}:" in result.stderr or f"'{p}'" in result.stderr}
    kept = [p for p in paths if p not in failed]
    rows = []
    for line in result.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[4].endswith("%"):
            rows.append(parts)
    out: dict[str, Filesystem] = {}
    for path, parts in zip(kept, rows, strict=False):
        device, size, used, avail, pct, mount = (
            parts[0],
            parts[1],
            parts[2],
            parts[3],
            parts[4],
            " ".join(parts[5:]),
        )
        if device in out:
            fs = out[device]
            out[device] = Filesystem(
                fs.device,
                fs.mount,
                fs.size_bytes,
                fs.used_bytes,
                fs.avail_bytes,
                fs.used_percent,
                (*fs.paths, path),
            )
            continue
        out[device] = Filesystem(
            device, mount, int(size), int(used), int(avail), int(pct.rstrip("%")), (path,)
        )
    return list(out.values())


def _disk_rule(raw: object) -> Callable[[int, int], bool]:
    """check_postgres's validate_size_or_percent_with_oper: '90%', '40G', '90% or 40G', ..."""
    text = "" if raw is None else str(raw).strip()
    if not text:
        return lambda used, pct: False
    match = re.fullmatch(r"(.+?)\s(&&|\|\||and|or)\s(.+)", text, re.I)
    if match:
        left, right = _disk_rule(match.group(1)), _disk_rule(match.group(3))
        if match.group(2).lower() in ("&&", "and"):
            return lambda used, pct: left(used, pct) and right(used, pct)
        return lambda used, pct: left(used, pct) or right(used, pct)
    if text.endswith("%"):
        limit = parse_percent(text, "disk_space")
        return lambda used, pct: pct >= limit
    size = parse_bytes(text, "disk_space")
    return lambda used, pct: used >= size


def _shown(raw: object) -> Number:
    if raw is None or (isinstance(raw, int) and not isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    return int(text[:-1]) if re.fullmatch(r"\d+%", text) else text


def check_disk_space(filesystems: Sequence[Filesystem], warn: object, crit: object) -> Check:
    """check_disk_space on the data, WAL and backup paths; value is the fullest one's percent."""
    name = "disk_space"
    try:
        w, c = _disk_rule(warn), _disk_rule(crit)
    except BadThreshold as exc:
        return _unknown(name, exc)
    if not filesystems:
        return Check(name, "unknown", detail="df returned no filesystems")
    verdict: Verdict = "ok"
    parts = []
    for fs in sorted(filesystems, key=lambda f: -f.used_percent):
        if c(fs.used_bytes, fs.used_percent):
            verdict = "crit"
        elif w(fs.used_bytes, fs.used_percent) and verdict == "ok":
            verdict = "warn"
        used, size = pretty_bytes(fs.used_bytes), pretty_bytes(fs.size_bytes)
        parts.append(f"{fs.mount} {fs.used_percent}% used ({used} of {size})")
    top = max(fs.used_percent for fs in filesystems)
    return Check(name, verdict, top, _shown(warn), _shown(crit), "; ".join(parts))
