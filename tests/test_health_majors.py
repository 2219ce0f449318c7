"""The checks that PostgreSQL's majors make possible, on figures made by hand: replication_slots,
checkpoint and version (tests/test_pg_versions.py runs them on real servers, 13 to 18), and the
choice of pg_dump for a server's backups (core.backups.client)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from core import health
from core.backups.client import choose, parse_version
from core.errors import DbopsError
from core.fleet import DEFAULT_THRESHOLDS, Server
from core.health import Capabilities, CheckpointStats, ClusterStats, Slot

MB = 2**20


def caps(version_num: int = 170010, **kw: object) -> Capabilities:
    base: dict[str, object] = {
        "version_num": version_num,
        "version": f"{version_num // 10000}.{version_num % 100}",
        "checkpointer": version_num >= 170000,
        "bgwriter_checkpoints": version_num < 170000,
        "control_checkpoint": True,
        "max_slot_wal_keep_size": "-1",
        "wal_segment_size": 16 * MB,
        "checkpoint_timeout_s": 300,
    }
    base.update(kw)
    return Capabilities(**base)  # type: ignore[arg-type]


def stats(**kw: object) -> ClusterStats:
    found = ClusterStats(connect_ms=1, capabilities=caps())
    for key, value in kw.items():
        setattr(found, key, value)
    return found


def limits(name: str) -> tuple[object, object]:
    return DEFAULT_THRESHOLDS[name]["warn"], DEFAULT_THRESHOLDS[name]["crit"]


# --- replication_slots ---------------------------------------------------------------------------


def slots_check(*slots: Slot, keep: str = "-1") -> health.Check:
    found = stats(slots=list(slots), capabilities=caps(max_slot_wal_keep_size=keep))
    return health.check_replication_slots(found, *limits("replication_slots"))


def test_replication_slots_by_the_wal_the_worst_one_retains() -> None:
    assert slots_check().verdict == "ok" and slots_check().detail == "no replication slots"
    small = Slot("replica1", "physical", True, 5 * MB, "reserved")
    assert slots_check(small).verdict == "ok"
    held = Slot("sub1", "logical", False, 200 * MB, "extended", inactive_since="2026-12-01T10:00")
    got = slots_check(small, held)
    assert (got.verdict, got.value) == ("warn", 200 * MB)
    assert got.detail.startswith("sub1 retains 200.0 MB of WAL") or "sub1 retains" in got.detail
    assert "inactive: sub1 since 2026-12-01T10:00" in got.detail
    assert "max_slot_wal_keep_size = -1" in got.detail
    assert slots_check(Slot("big", "physical", True, 2048 * MB, "extended")).verdict == "crit"


def test_replication_slots_lost_is_crit_and_unreserved_warn_whatever_the_bytes() -> None:
    lost = Slot("sub1", "logical", False, 0, "lost", invalidation_reason="wal_removed")
    got = slots_check(lost, keep="64")
    assert got.verdict == "crit" and "lost" in got.detail and "wal_removed" in got.detail
    assert "max_slot_wal_keep_size" not in got.detail  # a limit is set: nothing to note
    assert slots_check(Slot("r", "physical", True, MB, "unreserved"), keep="64").verdict == "warn"


def test_new_checks_are_unknown_with_a_reason_without_the_servers_answers() -> None:
    bare = ClusterStats(connect_ms=1)
    for check in (health.check_replication_slots, health.check_checkpoint, health.check_version):
        got = check(bare, "1", "2")
        assert got.verdict == "unknown" and "not read" in got.detail
    down = health.cluster_down("connection refused")
    assert {c.name: c.verdict for c in down}["checkpoint"] == "unknown"


# --- checkpoint ----------------------------------------------------------------------------------


def test_checkpoint_age_against_thresholds_unless_the_server_was_idle() -> None:
    def check(age: int, wal: int, **kw: object) -> health.Check:
        cp = CheckpointStats(age, wal, 10, 2, "pg_stat_checkpointer")
        return health.check_checkpoint(stats(checkpoint=cp, **kw), *limits("checkpoint"))

    assert check(200, 64 * MB).verdict == "ok"
    assert check(3600, 64 * MB).verdict == "warn"
    busy = check(7300, 64 * MB)
    assert busy.verdict == "crit" and busy.value == 7300
    assert "10 timed, 2 requested (pg_stat_checkpointer)" in busy.detail
    idle = check(7300, 4096)  # PostgreSQL skipped the timed checkpoints: nothing was written
    assert idle.verdict == "ok" and "skips checkpoints when idle" in idle.detail
    unreadable = CheckpointStats(unreadable="the monitoring role may not run it")
    got = health.check_checkpoint(stats(checkpoint=unreadable), "1h", "2h")
    assert got.verdict == "unknown" and "may not run" in got.detail


def test_checkpoint_reads_the_view_the_server_has() -> None:
    assert health.checkpoint_queries(caps(170010))[1].endswith("pg_stat_checkpointer")
    assert health.checkpoint_queries(caps(160004))[1].endswith("pg_stat_bgwriter")
    # No privilege on pg_control_checkpoint(): not asked (no error in the server's log).
    assert health.checkpoint_queries(caps(160004, control_checkpoint=False)) == [
        health.queries.BGWRITER_CHECKPOINTS_SQL
    ]


# --- version -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("major", "today", "verdict"),
    [
        (13, date(2026, 12, 3), "crit"),  # ended November 13, 2025
        (14, date(2026, 12, 3), "crit"),  # ended November 12, 2026
        (14, date(2026, 11, 12), "warn"),  # its last day
        (14, date(2026, 6, 1), "warn"),  # within 6 months (164 days)
        (14, date(2026, 5, 10), "ok"),  # 186 days left
        (15, date(2026, 12, 3), "ok"),
        (15, date(2027, 6, 1), "warn"),
        (18, date(2026, 12, 3), "ok"),
    ],
)
def test_version_against_the_majors_end_of_life(major: int, today: date, verdict: str) -> None:
    at = datetime.combine(today, datetime.min.time(), UTC) + timedelta(hours=12)
    found = stats(capabilities=caps(major * 10000 + 4), at=at)
    got = health.check_version(found, *limits("version"))
    assert got.verdict == verdict, got
    assert got.value == (health.END_OF_LIFE[major] - today).days
    if verdict == "crit":
        assert "reached its end of life" in got.detail and "upgrade" in got.detail
    else:
        assert "is supported until" in got.detail


def test_version_of_a_major_dbops_does_not_know() -> None:
    newer = health.check_version(stats(capabilities=caps(190001)), "182d", "0d")
    older = health.check_version(stats(capabilities=caps(110022)), "182d", "0d")
    assert (newer.verdict, older.verdict) == ("ok", "crit")


# --- the client a server's backups use -----------------------------------------------------------


def server(**kw: object) -> Server:
    return Server(name="vps1", dsn="host=h user=m dbname=postgres", **kw)  # type: ignore[arg-type]


def test_the_newest_client_found_and_never_one_older_than_the_server() -> None:
    assert parse_version("pg_dump (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)") == (15, 14)
    out = (
        "client\t/usr/lib/postgresql/15/bin\tpg_dump (PostgreSQL) 15.14 (Debian 15.14-0)\n"
        "client\t/usr/lib/postgresql/17/bin\tpg_dump (PostgreSQL) 17.6\n"
        "server\t170010\t17.10\t\n"
    )
    got = choose(server(), out)
    assert (got.bin, got.major, got.label, got.server_version) == (
        "/usr/lib/postgresql/17/bin", 17, "pg_dump 17.6", "17.10"
    )  # fmt: skip
    assert got.program("pg_restore") == "/usr/lib/postgresql/17/bin/pg_restore"
    old = out.replace("17/bin\tpg_dump (PostgreSQL) 17.6", "14/bin\tpg_dump (PostgreSQL) 14.2")
    with pytest.raises(DbopsError, match=r"older than its PostgreSQL 17\.10") as caught:
        choose(server(), old)
    assert "postgresql-client-17" in (caught.value.hint or "")
    assert not got.restores_via_sql
    # psql run as another user from the SSH user's home says so on stderr, before its answers.
    noisy = out.replace("server\t", 'server\tcould not change directory to "/root"\t')
    assert choose(server(), noisy).server_version == "17.10"
    old_server = choose(server(), out.replace("170010\t17.10", "130023\t13.23"))
    assert old_server.restores_via_sql  # pg_restore 17 would SET transaction_timeout on 13
    argv = old_server.restore_argv("dbname=x", "/b/x.dump")
    assert argv[:2] == ["bash", "-c"] and argv[-3:] == ["/usr/lib/postgresql/17/bin", "dbname=x",
                                                       "/b/x.dump"]  # fmt: skip
    with pytest.raises(DbopsError, match="no pg_dump"):
        choose(server(client_bin="/opt/pg"), "server\t170010\t17.10\n")
    with pytest.raises(DbopsError, match="cannot ask PostgreSQL"):
        choose(server(), "client\t/x\tpg_dump (PostgreSQL) 18.1\nerror\tconnection refused\n")
