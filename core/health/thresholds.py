"""A check's verdict, and thresholds read as check_postgres reads them.

Thresholds come from ``fleet.threshold(name)``; a threshold we cannot read makes that one check
``unknown``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import DbopsError
from core.fleet import Fleet

Verdict = Literal["ok", "warn", "crit", "unknown"]
Number = int | str | None
VERDICT_RANK: dict[str, int] = {"ok": 0, "unknown": 0, "warn": 1, "crit": 2}


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    value: Number = None
    warn: Number = None
    crit: Number = None
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict,
            "value": self.value,
            "warn": self.warn,
            "crit": self.crit,
            "detail": self.detail,
        }


def worst(verdicts: Iterable[str]) -> Verdict:
    """The most severe verdict; ``unknown`` never outranks ``ok`` (it is shown, not summed)."""
    best: Verdict = "ok"
    for v in verdicts:
        if v in ("warn", "crit") and VERDICT_RANK[v] > VERDICT_RANK[best]:
            best = "warn" if v == "warn" else "crit"
    return best


# --- thresholds, read as check_postgres reads them ------------------------------------------


class BadThreshold(DbopsError):
    pass


_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(\w*)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+\.?\d?)\s*([bkmgtepz])?\w*$", re.I)
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_SIZE_UNITS = {c: 1024**i for i, c in enumerate("bkmgtpez")}
_SIZE_UNITS["b"] = 1


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def parse_seconds(value: object, check: str = "threshold") -> float:
    """check_postgres's size_in_seconds: '10', '10s', '5 minutes', '1.5h'; numbers are seconds."""
    if isinstance(value, bool):
        raise BadThreshold(f"{check}: {value!r} is not a time")
    if isinstance(value, int | float):
        return float(value)
    match = _TIME_RE.match(str(value))
    unit = (match.group(2)[:1].lower() or "s") if match else ""
    if not match or unit not in _TIME_UNITS:
        raise BadThreshold(f"{check}: {value!r} is not a time such as 30s, 5m or 2h")
    return float(match.group(1)) * _TIME_UNITS[unit]


def optional_seconds(value: object, check: str) -> float | None:
    """A threshold in seconds, or None where the fleet file leaves it out (or empty)."""
    return None if value in (None, "") else parse_seconds(value, check)


def parse_bytes(value: object, check: str = "threshold") -> int:
    """check_postgres's size: '10G', '500 MB', '1024' (bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise BadThreshold(f"{check}: {value!r} is not a size such as 500M or 10G")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def parse_percent(value: object, check: str = "threshold") -> int:
    match = re.fullmatch(r"\s*(\d+)\s*%?\s*", str(value))
    if not match or isinstance(value, bool):
        raise BadThreshold(f"{check}: {value!r} is not a percentage such as 90%")
    return int(match.group(1))


def parse_count_for_time(value: object, check: str) -> tuple[int | None, float | None]:
    """check_postgres's validate_integer_for_time: '10s', '5m', '+3' (a count), '3 for 10s'."""
    if value is None or value == "":
        return None, None
    text = str(value).strip()
    match = re.fullmatch(r"(.+?)\s(?:for|and)\s(.+)", text, re.I)
    if match:
        count, when = match.group(1), match.group(2)
        if re.search(r"[a-zA-Z]$", count) or re.fullmatch(r"[-+]\d+", when):
            count, when = when, count
        if not re.fullmatch(r"[-+]?\d+", count.strip()):
            raise BadThreshold(f"{check}: {value!r}: expected a count and a time, as '3 for 10s'")
        return int(count), parse_seconds(when, check)
    if re.fullmatch(r"[-+]\d+", text):
        return int(text), None
    return None, parse_seconds(value, check)


def _limits(fleet: Fleet, check: str) -> tuple[Any, Any]:
    t = fleet.threshold(check)
    return t.get("warn"), t.get("crit")


def _unknown(name: str, exc: Exception | str) -> Check:
    return Check(name, "unknown", detail=str(exc))
