"""logfile, through the server's runner: the end of the PostgreSQL log, scanned."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.fleet import Server
from core.health.queries import APP_NAME
from core.health.thresholds import Check, Verdict, _unknown

# How much of the end of the PostgreSQL log a sweep reads.
LOG_TAIL_BYTES = 2 * 1024 * 1024
# What the logfile check counts as an error, as check_postgres and SOP-101 mean it; WARNING
# lines are counted apart, and LOG and the rest never count.
LOG_ERROR_LEVELS = ("ERROR", "FATAL", "PANIC")
# Lines at LOG level an operator should read: quoted in the check's detail, never counted as
# errors (a busy healthy server logs "checkpoints are occurring too frequently" all day).
LOG_LINES_THAT_MATTER = (
    "checkpoints are occurring too frequently",
    "was terminated by signal",
    "terminating any other active server processes",
    "all server processes terminated",
    "database system was interrupted",
    "database system was not properly shut down",
    "archive command failed",
    "out of memory",
    "could not write",
    "could not fsync",
)


# dbops's own sessions (application_name exactly dbops, core.fleet.APP_NAME) in a line's prefix,
# wherever log_line_prefix puts %a: a whole word, so neither a role nor a database of that name
# ("dbops@db", "user@dbops") nor another application ("dbops-sandbox-fault") is taken for it.
_OWN_APP_RE = re.compile(rf"(?<![\w.@-]){re.escape(APP_NAME)}(?![\w.@-])")
_SEVERITY_RE = re.compile(
    r"\b(DEBUG\d?|LOG|INFO|NOTICE|WARNING|ERROR|FATAL|PANIC|DETAIL|HINT|CONTEXT|STATEMENT|"
    r"QUERY|LOCATION):  "
)
_STAMP_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:\.\d+)?(?:\s*([A-Z]{2,5}|[+-]\d\d(?::?\d\d)?))?"
)
_TZ_HOURS = {
    "UTC": 0, "GMT": 0, "Z": 0, "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7,
    "MDT": -6, "PST": -8, "PDT": -7, "CET": 1, "CEST": 2, "BST": 1, "EET": 2, "EEST": 3,
}  # fmt: skip


def _line_time(line: str) -> datetime | None:
    match = _STAMP_RE.match(line)
    if not match:
        return None
    stamp = datetime.fromisoformat(match.group(1).replace(" ", "T"))
    zone = match.group(2)
    if zone is None or zone in _TZ_HOURS:
        return stamp.replace(tzinfo=UTC) - timedelta(hours=_TZ_HOURS.get(zone or "UTC", 0))
    if zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
        return stamp.replace(tzinfo=UTC) - (offset if zone[0] == "+" else -offset)
    return None


@dataclass
class LogFindings:
    counts: dict[str, int] = field(default_factory=dict)  # ERROR, FATAL and PANIC lines
    samples: list[str] = field(default_factory=list)  # the first few of those
    warnings: int = 0  # WARNING lines: shown, not errors
    notes: list[str] = field(default_factory=list)  # the first LOG lines that matter

    @property
    def total(self) -> int:
        """Error lines: ERROR, FATAL and PANIC."""
        return sum(self.counts.values())


# The detail of a log with nothing to show; the report leaves such a server out.
LOG_CLEAN = "no errors in the PostgreSQL log"
_LOG_WARNINGS_RE = re.compile(r"^\d+ errors?\b[^;]*\((\d+) warnings?\)")


def scan_log(text: str, since: datetime | None, *, partial_first_line: bool = False) -> LogFindings:
    """ERROR, FATAL and PANIC lines (counted), WARNING lines (counted apart) and LOG lines that
    matter (quoted), newer than ``since``.

    Lines dbops's own sessions caused (application_name dbops in the line) are left out; lines
    without a readable time stamp count, since the window is the end of the file anyway.
    """
    found = LogFindings()
    lines = text.splitlines()
    if partial_first_line and lines:
        lines = lines[1:]
    for line in lines:
        match = _SEVERITY_RE.search(line)
        if not match:
            continue
        severity, prefix, message = match.group(1), line[: match.start()], line[match.end() :]
        if severity == "LOG":
            if not any(p in message for p in LOG_LINES_THAT_MATTER):
                continue
        elif severity not in (*LOG_ERROR_LEVELS, "WARNING"):
            continue
        if _OWN_APP_RE.search(prefix):
            continue
        if since is not None:
            when = _line_time(line)
            if when is not None and when < since:
                continue
        quoted = f"{severity}: {' '.join(message.split())[:120]}"
        if severity == "WARNING":
            found.warnings += 1
        elif severity == "LOG":
            if len(found.notes) < 2 and quoted not in found.notes:
                found.notes.append(quoted)
        else:
            found.counts[severity] = found.counts.get(severity, 0) + 1
            if len(found.samples) < 3:
                found.samples.append(quoted)
    return found


def check_logfile(findings: LogFindings, warn: object, crit: object) -> Check:
    """Error lines (ERROR, FATAL, PANIC) against the thresholds; a PANIC is crit however few.

    The detail reads "2 errors: ERROR 1, FATAL 1 (3 warnings); ERROR: ..." or "0 errors
    (3 warnings)": warnings are said apart and never move the verdict.
    """
    name = "logfile"
    try:
        w = int(str(warn)) if warn not in (None, "") else None
        c = int(str(crit)) if crit not in (None, "") else None
    except ValueError:
        return _unknown(name, f"bad thresholds {warn!r}/{crit!r}: line counts expected")
    n = findings.total
    verdict: Verdict = (
        "crit"
        if (c is not None and n >= c) or findings.counts.get("PANIC")
        else "warn"
        if w is not None and n >= w
        else "ok"
    )
    if not n and not findings.warnings and not findings.notes:
        return Check(name, verdict, 0, w, c, LOG_CLEAN)
    head = f"{n} error{'' if n == 1 else 's'}"
    if n:
        head += ": " + ", ".join(f"{k} {v}" for k, v in sorted(findings.counts.items()))
    if findings.warnings:
        head += f" ({findings.warnings} warning{'' if findings.warnings == 1 else 's'})"
    quoted = " | ".join([*findings.samples, *findings.notes])
    return Check(name, verdict, n, w, c, f"{head}; {quoted}" if quoted else head)


def log_warnings(detail: str) -> int:
    """How many WARNING lines a logfile check's detail reports (0 when it names none)."""
    found = _LOG_WARNINGS_RE.match(detail)
    return int(found.group(1)) if found else 0


def log_argv(server: Server, tail_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    return ["tail", "-c", str(tail_bytes), "--", server.log_path]
