"""End to end on the sandbox fleet: a month of sweeps simulated with time moved
(tests/history_sim.py, from the real now back), then the last ones through core.ops.Ops itself
(real clusters, real backups; df answers the simulated disks), and the disk_runway check, the
report JSON, the servers data, `dbops status --json` and the capacity review all show the same
runway.

vps1 has 100 GiB at 80% growing 1 GiB a day (about 20 days: WARN), vps2 half of that (about
120 days: ok), vps3 no history but the last sweeps (unknown, too little history).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from core.capacity import runway_at
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import Fleet, parse_fleet
from core.health import df_argv
from core.ops import Ops
from core.remote import CommandResult, Runner, RunnerPool
from core.report import render_status_text, render_text
from core.trends import disk_runway
from storage.events import EventLog
from storage.models_history import SWEEP, DatabaseHistory, ServerHistory
from tests.history_sim import GIB, backup_used, data_used, simulate

SIMULATED = ("vps1", "vps2")
DAYS = 30


class Disks:
    """The simulated disks at the time the test has moved to (``at``), as df prints them."""

    def __init__(self, fleet: Fleet, base: datetime) -> None:
        self.fleet, self.base, self.at = fleet, base, base

    def used(self, server: str) -> tuple[int, int]:
        share = SIMULATED.index(server) + 1 if server in SIMULATED else 4
        return data_used(self.at, self.base) // share, backup_used(self.at, self.base)

    def df(self, server: str) -> CommandResult:
        data, backup = self.used(server)
        paths = df_argv(self.fleet.server(server))[4:]
        config = self.fleet.server(server)
        lines = ["Filesystem 1B-blocks Used Available Capacity Mounted on"]
        for path in paths:
            size, used, device = (
                (200 * GIB, backup, "/dev/sim-backup")
                if path == config.backup_path
                else (100 * GIB, data, "/dev/sim-data")
            )
            pct = -(-100 * used // size)
            lines.append(f"{device} {size} {used} {size - used} {pct}% /sim{device[8:]}")
        return CommandResult(server, ["df", *paths], 0, "\n".join(lines) + "\n", "", 0.0)


class DiskRunner:
    """The server's own runner, except that ``df`` answers the simulated disks."""

    def __init__(self, inner: Runner, disks: Disks) -> None:
        self.inner, self.disks, self.server = inner, disks, inner.server

    def run(
        self, argv: Sequence[str], *, timeout: float = 10.0, stdin: bytes | None = None
    ) -> CommandResult:
        if argv and argv[0] == "df":
            return self.disks.df(self.server)
        return self.inner.run(argv, timeout=timeout, stdin=stdin)

    def connect(self, timeout: float) -> None:
        connect = getattr(self.inner, "connect", None)
        if callable(connect):
            connect(timeout=timeout)

    def close(self) -> None:
        self.inner.close()


class DiskPool(RunnerPool):
    def __init__(self, fleet: Fleet, disks: Disks) -> None:
        super().__init__(fleet)
        self.disks = disks

    def get(self, server: str) -> Runner:
        return DiskRunner(super().get(server), self.disks)


@pytest.fixture
def month(
    sandbox_fleet: Fleet, sandbox: dict[str, Any], tmp_path: Path, sqlite_engine: Engine
) -> Iterator[tuple[Ops, Disks, list[datetime]]]:
    """30 days of simulated sweeps up to the hour before the real now, then four real sweeps
    (Ops.report) at 5, 15, 35 and 75 minutes past it: the last crosses a roll-up."""
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    # Commands run locally, not over SSH, and no pgBackRest: a sweep in a few tenths of a second
    # rather than seconds (neither is what this test is about).
    data = sandbox_fleet.model_dump(exclude={"base_dir"})
    for server in data["servers"]:
        server["pgbackrest_config"] = None
        server["transport"] = "local"
    fleet = parse_fleet(data, base_dir=sandbox_fleet.base_dir)
    upsert_customers(sqlite_engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    disks = Disks(fleet, base)
    ops = Ops(fleet, sqlite_engine, EventLog(sqlite_engine), DiskPool(fleet, disks))
    simulate(
        ops.trends.history,
        days=DAYS,
        step=timedelta(hours=2),  # every other hour: the month for half the writes
        compact_every=12,
        customers=0,
        start=base - timedelta(days=DAYS),
        names=SIMULATED,
    )
    sweeps = [base + timedelta(minutes=m) for m in (5, 15, 35, 75)]
    for at in sweeps:
        disks.at = at
        ops.report(now=at, deadline_s=8)
    yield ops, disks, sweeps
    ops.close()


def runway_of(entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    check = next(c for c in entry["checks"] if c["name"] == "disk_runway")
    return check, entry["runway"]


@pytest.mark.heavy
def test_the_check_the_report_and_the_servers_show_the_same_runway(
    month: tuple[Ops, Disks, list[datetime]], sqlite_engine: Engine
) -> None:
    ops, disks, sweeps = month
    now = disks.at = sweeps[-1] + timedelta(minutes=5)
    report = ops.report(now=now, deadline_s=8)
    servers = {s["name"]: s for s in ops.servers(now=now, deadline_s=8)}
    acme = next(c for c in ops.customers() if c.name == "acme")
    status = ops.status("acme", now=now, deadline_s=8)
    review = {s["server"]: s for s in ops.capacity_review(now)["servers"]}

    seen = {}
    for entry in report["servers"]:
        name = entry["name"]
        check, runway = runway_of(entry)
        assert (runway["days"], runway["verdict"], runway["detail"]) == (
            check["value"],
            check["verdict"],
            check["detail"],
        )
        # /db servers and the capacity review: the same figures.
        assert runway_of(servers[name]) == (check, runway)
        assert (review[name]["days"], review[name]["verdict"], review[name]["detail"]) == (
            check["value"],
            check["verdict"],
            check["detail"],
        )
        seen[name] = check
    assert status["server"]["name"] == acme.server
    assert runway_of(status["server"]) == runway_of(next(
        s for s in report["servers"] if s["name"] == acme.server
    ))  # fmt: skip

    # vps1: 80% of 100 GiB, 1 GiB a day: 20 days (19 and some, rounded down), WARN.
    vps1, vps2, vps3 = seen["vps1"], seen["vps2"], seen["vps3"]
    fitted = disk_runway(ops.trends.history, "vps1", runway_at(now))
    assert fitted[0].days is not None and vps1["value"] == int(fitted[0].days)
    assert vps1["value"] in (19, 20) and vps1["verdict"] == "warn"
    assert (vps1["warn"], vps1["crit"]) == (30, 7)
    assert "data 80% used, full in" in vps1["detail"] and "backup" in vps1["detail"]
    assert vps2["verdict"] == "ok" and 110 <= vps2["value"] <= 125
    assert vps3["verdict"] == "unknown" and vps3["value"] is None
    assert vps3["detail"].startswith("too little history: 1 hour of disk readings")
    full = datetime.fromisoformat(servers["vps1"]["runway"]["full_at"])
    assert full == pytest.approx(now + timedelta(days=fitted[0].days), abs=timedelta(hours=1))
    assert "Disk runway: shortest" in render_text(report)
    assert f"shortest {vps1['value']} days (vps1)" in render_text(report)
    days = seen[acme.server]["value"]
    assert f"Disk runway: full in {days} days" in render_status_text(status)

    # What the real sweeps kept: the df figures at each sweep's start, and each database's.
    history = ops.trends.history
    kept = dict(history.series("server", "vps1", "data_used", sweeps[0], now, SWEEP))
    for at in sweeps:
        disks.at = at
        assert kept[at] == disks.used("vps1")[0]
    with sqlite_engine.connect() as conn:
        rows = conn.execute(
            select(DatabaseHistory.__table__).where(  # type: ignore[attr-defined]
                DatabaseHistory.customer == "acme", DatabaseHistory.at == int(now.timestamp())
            )
        ).all()
        backends = conn.execute(
            select(ServerHistory.backends).where(
                ServerHistory.server == acme.server, ServerHistory.at == int(now.timestamp())
            )
        ).scalar()
    (row,) = rows
    shown = next(d for d in report["databases"] if d["customer"] == "acme")
    assert row.size_bytes == shown["size_bytes"] and row.server == acme.server
    assert row.connections is not None and backends is not None
    assert row.backup_seconds is not None and row.backup_seconds >= 0 and row.backup_bytes
    # The last hour of real sweeps was rolled up when the 75-minute sweep came.
    hours = history.series("server", "vps3", "data_used", now - timedelta(days=1), now, 1)
    assert [t for t, _ in hours] == [sweeps[0] - timedelta(minutes=5)]
    assert ops.trends.failures == 0
