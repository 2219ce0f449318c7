"""disk_runway: days until a server's data or backup path is full, from the measurement history.

The runways themselves come from core.trends (a Theil-Sen fit over the last 14 days of the hour
tier); the sweep hands the check what core.capacity.Trends has cached for the server this hour.
Thresholds are in days: ``30`` or ``"30d"``, ``"4w"``, ``"36h"`` (defaults in core/fleet.py:
WARN under 30 days, CRIT under 7). ``value`` is the shortest runway in whole days, rounded
down (so it compares with whole-day thresholds as the fitted figure does), None when no path is
filling. A path that is not filling is ok; too little history is ``unknown`` with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, timedelta
from typing import Any

from core.health.thresholds import BadThreshold, Check, Number, _unknown, parse_seconds
from core.trends import RUNWAY_MIN_SPAN_DAYS, Runway, runway_check

NAME = "disk_runway"


def parse_days(value: object, check: str = NAME) -> float:
    """A runway threshold in days: a number of days (``30``), or a time with its unit
    (``"30d"``, ``"4w"``, ``"36h"``)."""
    if isinstance(value, bool) or value is None:
        raise BadThreshold(f"{check}: {value!r} is not a number of days such as 30 or 30d")
    if isinstance(value, int | float):
        days = float(value)
    elif re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(value)):
        days = float(str(value))
    else:
        try:
            days = parse_seconds(value, check) / 86400
        except BadThreshold:
            raise BadThreshold(
                f"{check}: {value!r} is not a number of days such as 30, 30d or 4w"
            ) from None
    if not days > 0 or math.isinf(days):
        raise BadThreshold(f"{check}: {value!r} must be more than 0 days")
    return days


def _shown(days: float) -> Number:
    return int(days) if days.is_integer() else f"{days:g}d"


def whole_days(days: float | None) -> int | None:
    """A runway as the report shows it: whole days, rounded down."""
    return None if days is None else math.floor(days)


def _why_unknown(runways: Sequence[Runway]) -> str:
    """Why no path has a runway, in plain words."""
    hours = max((r.points for r in runways), default=0)
    if hours == 0:
        days = f"{RUNWAY_MIN_SPAN_DAYS:g}"
        return f"no disk history yet: a trend needs {days} days of hourly readings"
    if all(r.total for r in runways):
        return (
            f"too little history: {hours} hour{'' if hours == 1 else 's'} of disk readings, "
            f"a trend needs {RUNWAY_MIN_SPAN_DAYS:g} days"
        )
    return "; ".join(r.detail for r in runways)


def check_disk_runway(runways: Sequence[Runway], warn: object, crit: object) -> Check:
    """The worst path decides (WARN under ``warn`` days, CRIT under ``crit``); unknown only
    when no path's runway is known."""
    try:
        w, c = parse_days(warn), parse_days(crit)
    except BadThreshold as exc:
        return _unknown(NAME, exc)
    found = runway_check(runways, w, c)
    detail = found.detail if found.verdict != "unknown" else _why_unknown(runways)
    days = [r.days for r in runways if r.days is not None]
    value = whole_days(min(days)) if days else None
    return Check(NAME, found.verdict, value, _shown(w), _shown(c), detail)


def runway_json(check: Check | None, runways: Sequence[Runway]) -> dict[str, Any] | None:
    """A server's ``runway`` in the report, ``dbops status --json`` and ``/db servers``: the
    check's own figures (``days`` is its value), when it is full, and each path's fit. Integers
    only, as the rest of the report. None: no runway was worked out (no history given)."""
    if check is None:
        return None
    filling = [r for r in runways if r.days is not None]
    first = min(filling, key=lambda r: r.days or 0.0) if filling else None
    full_at = first.now + timedelta(days=first.days or 0.0) if first else None
    return {
        "days": check.value,
        "verdict": check.verdict,
        "detail": check.detail,
        "full_at": full_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if full_at else None,
        "paths": [
            {
                "path": r.path,
                "days": whole_days(r.days),
                "filling": r.filling,
                "used_bytes": None if r.used is None else round(r.used),
                "total_bytes": r.total,
                "growth_bytes_per_day": (
                    None if r.growth_per_day is None else round(r.growth_per_day)
                ),
            }
            for r in runways
        ],
    }
