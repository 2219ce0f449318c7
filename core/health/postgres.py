"""Checks of what PostgreSQL said (pure: stats + thresholds -> Check): the cluster-wide ones,
then each customer database's."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime

from core.health.queries import Activity, ClusterStats, DatabaseStats, Probe, VacuumStats
from core.health.thresholds import (
    BadThreshold,
    Check,
    Number,
    Verdict,
    _plain,
    _unknown,
    optional_seconds,
    parse_bytes,
    parse_count_for_time,
    parse_percent,
)
from core.units import pretty_age, pretty_bytes

# Below this many block reads since the statistics reset a hit ratio says nothing: a database
# that was just created or restored reads everything from disk once.
HITRATIO_MIN_BLOCKS = 10_000


# --- cluster checks (pure: stats + thresholds -> Check) --------------------------------------


def check_server_connection(stats: ClusterStats | None, error: str = "") -> Check:
    if stats is None:
        return Check("connection", "crit", detail=error or "cannot connect")
    return Check("connection", "ok", value=stats.connect_ms, detail="accepting connections")


def check_backends(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_backends: '90%' of max_connections, 12 connections, or '-5' (5 slots left)."""
    name = "backends"
    specs = []
    for label, raw in (("warning", warn), ("critical", crit)):
        match = re.fullmatch(r"(-?)(\d+)(%?)", str(raw).strip())
        if not match or (match.group(1) and match.group(3)):
            return _unknown(name, f"bad {label} threshold {raw!r}: use 90%, 12 or -5")
        specs.append((match.group(1) == "-", int(match.group(2)), match.group(3) == "%"))
    limit, total = stats.max_connections, sum(stats.backends.values())
    if limit <= 0:
        return _unknown(name, "max_connections not readable")

    def as_count(minus: bool, n: int, pct: bool) -> int:
        return limit - n if minus else (n * limit // 100 if pct else n)

    def hit(minus: bool, n: int, pct: bool) -> bool:
        if minus:
            return limit - total <= n
        return total / limit * 100 >= n if pct else total >= n

    percent = int(total / limit * 100) or 1
    detail = f"{total} of {limit} connections ({percent}%)"
    w, c = specs
    verdict: Verdict = "crit" if hit(*c) else "warn" if hit(*w) else "ok"
    return Check(name, verdict, total, as_count(*w), as_count(*c), detail)


def check_txn_wraparound(stats: ClusterStats, warn: object, crit: object) -> Check:
    name = "txn_wraparound"
    try:
        w = int(str(warn).replace("_", "")) if warn not in (None, "") else None
        c = int(str(crit).replace("_", "")) if crit not in (None, "") else None
    except ValueError:
        return _unknown(name, f"bad thresholds {warn!r}/{crit!r}: transaction counts expected")
    rows = [d for d in stats.databases.values() if d.allowconn]
    if not rows:
        return _unknown(name, "no databases found")
    top = max(rows, key=lambda d: (d.xid_age, d.datname))
    verdict: Verdict = (
        "crit"
        if c is not None and top.xid_age >= c
        else "warn"
        if w is not None and top.xid_age >= w
        else "ok"
    )
    return Check(name, verdict, top.xid_age, w, c, f"{top.datname}: {top.xid_age}")


def _activity_check(
    name: str,
    rows: list[tuple[Activity, int]],
    warn: object,
    crit: object,
    what: str,
    counts: Callable[[Activity], bool] = lambda a: True,
) -> Check:
    """check_txn_idle's comparison: longest age against a time, a count, or 'count for time'.

    ``rows`` are what check_postgres's query returns (each with the age that matters); of those,
    ``counts`` picks the ones that count, as its Perl filter does after the query.
    """
    try:
        wcount, wtime = parse_count_for_time(warn, name)
        ccount, ctime = parse_count_for_time(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    shown_w = _plain(wtime) if wtime is not None and wcount is None else warn
    shown_c = _plain(ctime) if ctime is not None and ccount is None else crit
    shown_w = shown_w if isinstance(shown_w, int | str) or shown_w is None else str(shown_w)
    shown_c = shown_c if isinstance(shown_c, int | str) or shown_c is None else str(shown_c)
    if any(act.query and "insufficient" in act.query for act, _ in rows):
        return _unknown(name, "the monitoring role cannot see other sessions (grant pg_monitor)")
    rows = [(act, secs) for act, secs in rows if counts(act)]
    if not rows:
        return Check(name, "ok", 0, shown_w, shown_c, f"no {what}")
    count = len(rows)
    top, longest = rows[0]
    for act, secs in rows:
        if secs >= longest:
            top, longest = act, secs
    base = wcount or ccount
    if base and count < base:
        return Check(name, "ok", longest, shown_w, shown_c, f"fewer than {base} {what}")
    who = f"pid {top.pid} in {top.datname} as {top.usename}"
    detail = f"longest {what}: {longest}s ({who}); {count} in all"

    def tripped(cnt: int | None, tm: float | None) -> bool:
        if tm is not None and cnt is not None:
            return longest >= tm and count >= cnt
        if tm is not None:
            return longest >= tm
        return cnt is not None and count >= cnt

    verdict: Verdict = (
        "crit" if tripped(ccount, ctime) else "warn" if tripped(wcount, wtime) else "ok"
    )
    return Check(name, verdict, longest, shown_w, shown_c, detail)


def check_txn_idle(stats: ClusterStats, warn: object, crit: object) -> Check:
    rows = [
        (a, a.state_s)
        for a in stats.activity
        if a.state == "idle in transaction" or a.state is None
    ]
    return _activity_check(
        "txn_idle", rows, warn, crit, "idle in transaction",
        counts=lambda a: a.state == "idle in transaction",
    )  # fmt: skip


def check_txn_time(stats: ClusterStats, warn: object, crit: object) -> Check:
    rows = [(a, a.xact_s) for a in stats.activity if a.in_xact]
    return _activity_check("txn_time", rows, warn, crit, "transaction")


def check_query_time(stats: ClusterStats, warn: object, crit: object) -> Check:
    rows = [
        (a, a.state_s)
        for a in stats.activity
        if a.has_state_change and (a.state is None or not a.state.startswith("idle"))
    ]
    return _activity_check("query_time", rows, warn, crit, "query")


def _lock_limits(raw: object, label: str) -> dict[str, int]:
    text = "" if raw is None else str(raw)
    found = {
        re.sub(r"lock$", "", m.group(1).lower()): int(m.group(2))
        for m in re.finditer(r"(\w+)\s*=\s*(\d+)", text)
    }
    if found:
        return found
    if re.fullmatch(r"\d+", text.strip()):
        return {"total": int(text)}
    if text:
        raise BadThreshold(
            f"locks: bad {label} threshold {raw!r}: use 100 or 'total=100;waiting=5'"
        )
    return {}


def check_locks(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_locks: counts lock rows in databases that allow connections, by mode and waiting."""
    name = "locks"
    try:
        w, c = _lock_limits(warn, "warning"), _lock_limits(crit, "critical")
    except BadThreshold as exc:
        return _unknown(name, exc)
    totals: dict[str, int] = {"total": 0}
    got = False
    for granted, mode, _db in stats.locks:
        if granted is None:
            continue
        got = True
        totals["total"] += 1
        kind = re.sub(r"lock$", "", (mode or "").lower())
        totals[kind] = totals.get(kind, 0) + 1
        if not granted:
            totals["waiting"] = totals.get("waiting", 0) + 1
    shown_w: Number = w.get("total") if set(w) <= {"total"} else str(warn)
    shown_c: Number = c.get("total") if set(c) <= {"total"} else str(crit)
    if not got:
        return Check(name, "unknown", 0, shown_w, shown_c, "no locks seen in any database")
    verdict: Verdict = "ok"
    over = []
    for kind in sorted(set(totals) | set(w) | set(c)):
        n = totals.get(kind, 0)
        if kind in c and n >= c[kind]:
            verdict = "crit"
            over.append(f"{kind}={n}")
        elif kind in w and n >= w[kind]:
            verdict = "warn" if verdict == "ok" else verdict
            over.append(f"{kind}={n}")
    waiting = totals.get("waiting", 0)
    detail = f"total locks: {totals['total']}, waiting: {waiting}"
    if over:
        detail += f" (over: {', '.join(over)})"
    return Check(name, verdict, totals["total"], shown_w, shown_c, detail)


def check_prepared_txns(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_prepared_txns: age in seconds of the oldest prepared transaction."""
    name = "prepared_txns"
    try:
        w, c = optional_seconds(warn, name), optional_seconds(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    sw = _plain(w) if w is not None else None
    sc = _plain(c) if c is not None else None
    shown_w: Number = sw if isinstance(sw, int) or sw is None else str(sw)
    shown_c: Number = sc if isinstance(sc, int) or sc is None else str(sc)
    if not stats.prepared:
        return Check(name, "ok", 0, shown_w, shown_c, "no prepared transactions")
    verdict: Verdict = "ok"
    for _db, age in stats.prepared:
        if c is not None and age >= c:
            verdict = "crit"
        elif w is not None and age >= w and verdict == "ok":
            verdict = "warn"
    oldest_db, oldest = max(stats.prepared, key=lambda r: r[1])
    detail = f"{len(stats.prepared)} prepared, oldest {oldest}s in {oldest_db}"
    return Check(name, verdict, oldest, shown_w, shown_c, detail)


def _not_read(name: str, stats: ClusterStats, what: str) -> Check | None:
    if stats.capabilities is None:
        return _unknown(name, f"{what} not read")
    return None


def check_replication_slots(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_replication_slots: the most WAL any slot retains, in bytes, against the thresholds.

    As check_postgres 2.25 measures it (WAL from the slot's restart_lsn to the server's current
    position, 0 for a slot without one; no slots is ok), and beyond it: a slot whose WAL is gone
    (wal_status ``lost``: its replica or subscriber can never catch up) is crit, one past
    max_slot_wal_keep_size and about to lose it (``unreserved``) at least warn, whatever the
    bytes; inactive slots are named. With ``max_slot_wal_keep_size = -1`` (the default) nothing
    caps what a slot keeps: the detail says so, since then only the disk does.
    """
    name = "replication_slots"
    missing = _not_read(name, stats, "replication slots")
    if missing is not None:
        return missing
    try:
        w = parse_bytes(warn, name) if warn not in (None, "") else None
        c = parse_bytes(crit, name) if crit not in (None, "") else None
    except BadThreshold as exc:
        return _unknown(name, exc)
    if not stats.slots:
        return Check(name, "ok", 0, w, c, "no replication slots")
    top = max(stats.slots, key=lambda s: (s.retained, s.name))
    verdict: Verdict = (
        "crit"
        if c is not None and top.retained >= c
        else "warn"
        if w is not None and top.retained >= w
        else "ok"
    )
    lost = [s for s in stats.slots if s.wal_status == "lost"]
    unreserved = [s for s in stats.slots if s.wal_status == "unreserved"]
    if lost:
        verdict = "crit"
    elif unreserved and verdict == "ok":
        verdict = "warn"
    parts = [f"{top.name} retains {pretty_bytes(top.retained)} of WAL"]
    if lost:
        why = {s.invalidation_reason for s in lost if s.invalidation_reason}
        parts.append(
            f"lost (its WAL is gone, the consumer must be re-synced): "
            f"{', '.join(s.name for s in lost)}" + (f" ({', '.join(sorted(why))})" if why else "")
        )
    if unreserved:
        parts.append(
            "past max_slot_wal_keep_size, about to be lost: "
            + ", ".join(s.name for s in unreserved)
        )
    inactive = [s for s in stats.slots if not s.active and s.wal_status != "lost"]
    if inactive:
        parts.append(
            "inactive: "
            + ", ".join(
                s.name + (f" since {s.inactive_since[:19]}" if s.inactive_since else "")
                for s in inactive
            )
        )
    keep = stats.capabilities.max_slot_wal_keep_size if stats.capabilities else None
    if keep == "-1":
        parts.append("max_slot_wal_keep_size = -1: slots may keep WAL until the disk is full")
    return Check(name, verdict, top.retained, w, c, "; ".join(parts))


def check_checkpoint(stats: ClusterStats, warn: object, crit: object) -> Check:
    """check_postgres's checkpoint: seconds since the last checkpoint, against the thresholds.

    check_postgres runs pg_controldata on the server's data directory; this reads the same
    field of pg_control through pg_control_checkpoint(), which answers alike on every major and
    needs no shell on the server (and on a standby, as there, it is the last restartpoint). The
    counters in the detail come from pg_stat_checkpointer where the server has it (17+), else
    from pg_stat_bgwriter.

    Deliberately unlike it: PostgreSQL skips the timed checkpoint when no WAL was written since
    the last one, so an idle server's last checkpoint can be hours old and nothing is at risk.
    Less than one WAL segment written since it (the checkpoint's own record, a switch forced by
    archive_timeout) is ok whatever the age.
    """
    name = "checkpoint"
    missing = _not_read(name, stats, "checkpoint")
    if missing is not None:
        return missing
    try:
        w, c = optional_seconds(warn, name), optional_seconds(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    sw = int(w) if w is not None else None
    sc = int(c) if c is not None else None
    cp = stats.checkpoint
    if cp is None or cp.age_s is None:
        why = cp.unreadable if cp is not None and cp.unreadable else "no checkpoint on record"
        return Check(name, "unknown", None, sw, sc, why)
    age = max(0, cp.age_s)
    caps = stats.capabilities
    detail = f"last checkpoint {pretty_age(age)} ago"
    if caps is not None and caps.in_recovery:
        detail = f"last restartpoint {pretty_age(age)} ago"
    if cp.timed is not None and cp.requested is not None:
        detail += f"; {cp.timed} timed, {cp.requested} requested ({cp.source})"
    if caps is not None and caps.checkpoint_timeout_s:
        detail += f"; checkpoint_timeout {pretty_age(caps.checkpoint_timeout_s)}"
    segment = (caps.wal_segment_size if caps is not None else None) or 16 * 1024 * 1024
    if cp.wal_since is not None and cp.wal_since < segment:
        idle = "no WAL to speak of since (PostgreSQL skips checkpoints when idle)"
        return Check(name, "ok", age, sw, sc, f"{detail}; {idle}")
    verdict: Verdict = (
        "crit" if c is not None and age >= c else "warn" if w is not None and age >= w else "ok"
    )
    return Check(name, verdict, age, sw, sc, detail)


# Each major's end of life: the PostgreSQL project supports a major for five years, to the
# second Thursday of November (https://www.postgresql.org/support/versioning/).
END_OF_LIFE: dict[int, date] = {
    12: date(2024, 11, 21),
    13: date(2025, 11, 13),
    14: date(2026, 11, 12),
    15: date(2027, 11, 11),
    16: date(2028, 11, 9),
    17: date(2029, 11, 8),
    18: date(2030, 11, 14),
}


def check_version(stats: ClusterStats, warn: object, crit: object) -> Check:
    """The cluster's major against its end of life (ours: check_postgres's ``version`` compares
    with a version string instead). ``warn`` and ``crit`` are how long before the end of life
    the verdict turns: 6 months and none by default, so a major is warn for its last half year
    of updates and crit once it gets no more (no security fixes; the next upgrade is overdue).
    The value is the days left (negative past it)."""
    name = "version"
    missing = _not_read(name, stats, "server version")
    if missing is not None or stats.capabilities is None:
        return missing or _unknown(name, "server version not read")
    try:
        w, c = optional_seconds(warn, name), optional_seconds(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    sw = f"{int(w // 86400)}d" if w is not None else None
    sc = f"{int(c // 86400)}d" if c is not None else None
    caps = stats.capabilities
    major, full = caps.major, caps.version.split()[0]
    eol = END_OF_LIFE.get(major)
    if eol is None:
        if major > max(END_OF_LIFE):
            return Check(name, "ok", None, sw, sc, f"PostgreSQL {full}: newer than dbops knows")
        return Check(name, "crit", None, sw, sc, f"PostgreSQL {full}: long past its end of life")
    today = (stats.at or datetime.now(UTC)).astimezone(UTC).date()
    left = (eol - today).days
    when = f"{eol:%B} {eol.day}, {eol.year}"
    if left < 0:
        detail = (
            f"PostgreSQL {full}: {major} reached its end of life on {when} and gets no more "
            "fixes, security ones included; upgrade to a supported major"
        )
    else:
        detail = f"PostgreSQL {full}: {major} is supported until {when} ({left} days)"
    seconds = left * 86400
    verdict: Verdict = (
        "crit"
        if c is not None and seconds < c
        else "warn"
        if w is not None and seconds < w
        else "ok"
    )
    if verdict == "warn":
        detail += "; plan the upgrade"
    return Check(name, verdict, left, sw, sc, detail)


def is_full(error: str) -> bool:
    """PostgreSQL answered, but every connection slot is taken."""
    return "too many clients" in error or "remaining connection slots" in error


# --- database checks -------------------------------------------------------------------------


def check_database_connection(probe: Probe) -> Check:
    if probe.ok:
        return Check("connection", "ok", probe.ms, detail="accepting connections")
    return Check("connection", "crit", None, detail=probe.error or "cannot connect")


def check_database_size(db: DatabaseStats | None, warn: object, crit: object) -> Check:
    name = "database_size"
    if db is None:
        return Check(name, "unknown", detail="database not found on the cluster")
    try:
        w = parse_bytes(warn, name) if warn not in (None, "") else None
        c = parse_bytes(crit, name) if crit not in (None, "") else None
    except BadThreshold as exc:
        return _unknown(name, exc)
    size = db.size_bytes
    if size is None:
        return Check(name, "unknown", None, w, c, "size not readable (grant pg_monitor)")
    verdict: Verdict = (
        "crit" if c is not None and size >= c else "warn" if w is not None and size >= w else "ok"
    )
    return Check(name, verdict, size, w, c, f"{db.datname}: {pretty_bytes(size)}")


def check_hitratio(db: DatabaseStats | None, warn: object, crit: object) -> Check:
    """check_hitratio (lower is worse), with a floor of activity below which it is not judged."""
    name = "hitratio"
    if db is None:
        return Check(name, "unknown", detail="database not found on the cluster")
    try:
        w = parse_percent(warn, name) if warn not in (None, "") else None
        c = parse_percent(crit, name) if crit not in (None, "") else None
    except BadThreshold as exc:
        return _unknown(name, exc)
    reads = db.blks_hit + db.blks_read
    if reads < HITRATIO_MIN_BLOCKS:
        return Check(name, "ok", None, w, c, f"too little activity to judge ({reads} block reads)")
    ratio = round(100 * db.blks_hit / reads, 2)
    verdict: Verdict = (
        "crit" if c is not None and ratio <= c else "warn" if w is not None and ratio <= w else "ok"
    )
    return Check(name, verdict, int(ratio), w, c, f"{ratio:.2f}% of {reads} block reads from cache")


def check_last_vacuum(
    vac: VacuumStats | None, warn: object, crit: object, error: str = ""
) -> Check:
    """check_postgres's last_vacuum: the longest time since any one table was last vacuumed.

    As check_last_vacuum_analyze (check_postgres 2.25) does it, per database:

    * a table's time is the later of its last manual VACUUM and its last autovacuum;
    * the tables are the ordinary ones (relkind 'r'; not TOAST, views, materialized views or
      partitioned parents) outside information_schema;
    * a table never vacuumed (no time on record) is passed over, and when no table has a time
      the answer is UNKNOWN ("No matching tables have ever been vacuumed");
    * the age is ``round(now() - time)`` in seconds, compared with ``>=``, critical first;
      defaults 1 day and 2 days; a warning above the critical is refused.

    Deliberately unlike it: system catalogs (pg_catalog) are left out, as check_postgres's
    ``--exclude=pg_catalog.`` would. By default it counts them, and the shared ones (pg_authid,
    pg_database, ...) carry the same vacuum time in every database of a cluster: vacuumed once at
    initdb or by a ``vacuumdb --all``, and rarely again since they hardly change, they would make
    every database on a server crit two days later whatever its own tables are doing. What a
    customer's tables are doing is the question here. With ``--exclude`` check_postgres also
    says UNKNOWN when the oldest time rounds to 0 seconds (its ``$maxtime < 1`` on a skipped
    row); we do not copy that: a table vacuumed this instant is ok.

    Unknown, with the reason, where nothing can be measured: the database not answering, no
    user tables, or no vacuum on record (never run, or the statistics were reset or lost).
    """
    name = "last_vacuum"
    try:
        w, c = optional_seconds(warn, name), optional_seconds(crit, name)
    except BadThreshold as exc:
        return _unknown(name, exc)
    sw = int(w) if w is not None else None
    sc = int(c) if c is not None else None
    if w is not None and c is not None and w > c:
        return Check(name, "unknown", None, sw, sc, f"warning {warn} is above critical {crit}")
    if vac is None:
        return Check(name, "unknown", None, sw, sc, error or "vacuum times not read")
    if vac.tables == 0:
        return Check(name, "unknown", None, sw, sc, f"{vac.datname} has no user tables")
    if vac.oldest is None or vac.age_s is None:
        since = (
            f"since the statistics were reset {vac.stats_reset.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
            if vac.stats_reset is not None
            else "(never run, or the statistics were lost in a crash)"
        )
        tables = "table" if vac.tables == 1 else f"{vac.tables} tables"
        return Check(name, "unknown", None, sw, sc, f"no vacuum on record of its {tables} {since}")
    age = max(0, vac.age_s)
    verdict: Verdict = "crit" if c and age >= c else "warn" if w and age >= w else "ok"
    detail = f"{vac.oldest} last vacuumed {pretty_age(age)} ago"
    if vac.never:
        detail += f"; {vac.never} of {vac.tables} tables never vacuumed"
    return Check(name, verdict, age, sw, sc, detail)
