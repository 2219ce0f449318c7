"""Sizes and durations as people read them: ``pretty_bytes(1536)`` is "1.5 kB", ``pretty_age(90)``
is "90s"; and the durations people type: ``parse_span("1h30m")`` is 90 minutes. Parsing
thresholds lives with the checks that read them."""

from __future__ import annotations

import re
from datetime import timedelta

from core.errors import DbopsError

_SPAN = re.compile(r"(\d{1,6})([dhms])")
_SPAN_WHOLE = re.compile(r"(?:\d{1,6}[dhms])+")
_SPAN_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_SPAN_ORDER = "dhms"


def pretty_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def pretty_age(seconds: float) -> str:
    """Whole seconds up to two minutes, then minutes, hours and minutes, days and hours.

    A negative age (a clock a little ahead of ours) reads as 0s.
    """
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def parse_span(text: str, *, what: str = "duration") -> timedelta:
    """A duration as people type it: ``30m``, ``2h``, ``1h30m``, ``1d12h`` (days, hours,
    minutes, seconds, largest first, each unit once). Anything else is a DbopsError saying how
    to write it; a zero duration too."""
    raw = str(text).strip().lower()
    if not _SPAN_WHOLE.fullmatch(raw):
        raise DbopsError(
            f"{str(text)[:20]!r} is not a {what}.", hint="Write it like 30m, 2h or 1h30m."
        )
    parts = _SPAN.findall(raw)
    units = [u for _, u in parts]
    if units != sorted(set(units), key=_SPAN_ORDER.index):
        raise DbopsError(
            f"{raw[:20]!r} is not a {what}: each unit once, largest first.",
            hint="Write it like 1h30m, not 30m1h.",
        )
    span = timedelta(seconds=sum(int(n) * _SPAN_UNITS[u] for n, u in parts))
    if span <= timedelta(0):
        raise DbopsError(f"a {what} of {raw!r} is no time at all.", hint="e.g. 30m or 2h.")
    return span


def pretty_span(span: timedelta) -> str:
    """A duration as ``parse_span`` reads it: 5400 s is "1h30m", 90 s "1m30s"."""
    s = max(0, int(span.total_seconds()))
    out = ""
    for unit in _SPAN_ORDER:
        n, s = divmod(s, _SPAN_UNITS[unit])
        if n:
            out += f"{n}{unit}"
    return out or "0s"
