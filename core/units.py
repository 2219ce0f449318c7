"""Sizes and durations as people read them: ``pretty_bytes(1536)`` is "1.5 kB", ``pretty_age(90)``
is "90s". Display only; parsing thresholds lives with the checks that read them."""

from __future__ import annotations


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
