"""RPO and RTO of a customer database with point-in-time recovery, on a 1 GB database.

Brings up a sandbox of its own (core.sandbox.up in a temp dir under /tmp, torn down at the end):
one PostgreSQL cluster archiving its WAL with pgBackRest (archive_timeout 60 s), two customers,
commands run locally (no SSH). Fills acme's database to ~1 GB (generate_series into a table
with a primary key and a second index), takes the nightly dump (``Backups.take_backup``:
pg_dump -Fc, what dbops restored from before) and a full pgBackRest base backup
(``core.pitr.base_backup``), does some work, notes T, does more work (deletes, updates, a table
dropped), watches the recovery window's ``rpo_seconds`` under a trickle of writes, then times:

- ``Backups.restore_to_time(acme, T)``: the RTO with point-in-time recovery, by phase (from the
  commands dbops ran: planning and archiving the live WAL, restoring the backup set into the
  scratch instance, WAL replay to T, the dump as the customer, removing the scratch instance,
  pg_restore into a new database, verifying + analyzing + swapping), with the scratch
  instance's peak disk use against what the plan said it needs; the rows are checked to be
  exactly those at T;
- ``Backups.restore(acme, <the nightly dump>)``: the same database's restore from a dump, the
  RTO dbops had before (same phases after the dump), and the ratio of the two.

    .venv/bin/python bench/pitr.py [--size-mb 1024] [--rpo-watch 150] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from core import pitr, sandbox
from core.backups import Backups
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import load_fleet
from core.remote import RunnerPool
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade

CUSTOMER, OTHER = "acme", "globex"
BATCH_ROWS = 1_000_000
ACTOR = "U0CAROL"

# The phases of a restore, in order; a command that starts one is named by ``_starts``, and
# every other command belongs to the phase last started.
PHASES = (
    "plan + archive the live WAL",
    "restore the backup set",
    "WAL replay to T",
    "dump as the customer",
    "remove the scratch instance",
    "check the dump, load it into a new database",
    "verify, analyze, swap",
)


def _loads(command: str) -> bool:
    """pg_restore into the new database (the dump script names pg_restore too: it reads the
    dump back to count its rows)."""
    if "dbops-backup" in command:
        return False
    return "dbops-restore " in command or "/pg_restore " in command


def _starts(command: str, previous: str) -> int | None:
    """The phase ``command`` starts, if it starts one (``previous``: the command before it)."""
    if "pgbackrest" in command and command.endswith(" restore"):
        return 1
    if "dbops-pitr-conf" in command:
        return 2
    if "dbops-pitr-wait" in previous:  # recovered to T: what follows is the dump's
        return 3
    if "dbops-pitr-cleanup" in command:
        return 4
    if "dbops-pitr-cleanup" in previous:
        return 5
    if _loads(previous) and not _loads(command):
        return 6
    return None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def q(conninfo: str, text: str | sql.Composed, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(text, params or None)
        return cur.fetchall() if cur.description else []


class Commands:
    """Every command dbops runs on the server, with when it ended and how long it took."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.seen: list[tuple[float, float, str]] = []  # (end, seconds, command)

    def record(self, kind: str, subject: str, payload: dict[str, Any]) -> None:
        self.seen.append(
            (time.perf_counter(), payload.get("duration_ms", 0) / 1000, payload.get("command", ""))
        )
        self.events.append(kind, subject, payload, actor="dbops")

    def phases(self, started: float, ended: float, first: int = 0) -> dict[str, float]:
        """Wall seconds per phase: from the end of the previous phase's last command to the end
        of its own last one (the first from ``started``; what follows the last command, the
        events and the lock, goes to the last phase). ``first``: the phase the run starts in
        (a restore from a dump starts by checking it)."""
        last_end: dict[int, float] = {}
        current, before = first, ""
        for end, _, command in self.seen:
            if started <= end <= ended:
                current = max(current, _starts(command, before) or current)
                before = command
                last_end[current] = end
        out: dict[str, float] = {}
        since = started
        done = sorted(last_end)
        for index in done:
            end = ended if index == done[-1] else last_end[index]
            out[PHASES[index]] = round(end - since, 2)
            since = end
        return out

    def show(self) -> None:
        for _, seconds, command in self.seen:
            print(f"      {seconds:7.2f} s  {command[:150]}", file=sys.stderr)


@contextmanager
def peak_disk(root: Path, pattern: str) -> Iterator[dict[str, int]]:
    """The largest disk use (allocated blocks, so the sparse files of the other customers'
    databases count as what they take) of the directories matching ``pattern`` under ``root``,
    sampled twice a second while the block runs."""
    peak = {"bytes": 0}
    stop = threading.Event()

    def used() -> int:
        total = 0
        for scratch in root.glob(pattern):
            for parent, _, files in os.walk(scratch):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(parent, name)).st_blocks * 512
                    except OSError:
                        continue
        return total

    def watch() -> None:
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], used())
            stop.wait(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def fill(conninfo: str, admin: str, target_bytes: int) -> tuple[int, int, float]:
    """acme's table ``big`` grown in batches until its database is ``target_bytes``; returns
    (rows, database bytes, seconds)."""
    t0 = time.perf_counter()
    q(
        conninfo,
        "CREATE TABLE big (id bigint PRIMARY KEY, account int NOT NULL, amount bigint NOT NULL,"
        " note text NOT NULL)",
    )
    q(conninfo, "CREATE INDEX big_account ON big (account)")
    rows, size = 0, 0
    while size < target_bytes:
        q(
            conninfo,
            "INSERT INTO big SELECT g, g %% 10007, g * 7 %% 100000,"
            " md5(g::text) || md5((g * 31)::text) FROM generate_series(%s::bigint, %s::bigint) g",
            rows + 1,
            rows + BATCH_ROWS,
        )
        rows += BATCH_ROWS
        size = q(admin, "SELECT pg_database_size(%s)", CUSTOMER)[0][0]
    q(conninfo, "VACUUM ANALYZE big")
    size = q(admin, "SELECT pg_database_size(%s)", CUSTOMER)[0][0]
    return rows, size, time.perf_counter() - t0


def state(conninfo: str) -> dict[str, Any]:
    """What the restore must bring back: acme's rows, in figures."""
    big = q(conninfo, "SELECT count(*), sum(id), sum(amount) FROM big")[0]
    ledger = q(conninfo, "SELECT count(*) FROM pg_tables WHERE tablename = 'ledger'")[0][0]
    counted = q(conninfo, "SELECT count(*), sum(v) FROM ledger")[0] if ledger else None
    return {"big": [int(x) for x in big], "ledger": [int(x or 0) for x in counted or ()] or None}


def drop_kept(admin: str, kept: str) -> None:
    """The database a restore keeps aside (1 GB): dropped, so the next one has the disk."""
    q(admin, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(kept)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="acme's database, about")
    parser.add_argument("--rpo-watch", type=int, default=150, help="seconds of RPO sampling")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--commands", action="store_true", help="list each restore's commands")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="dbops-bench-pitr-"))  # /tmp: postgres enters it
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "transport": "local"}
    try:
        up_s, st = timed(lambda: sandbox.up(directory, servers=1, customers=2, ssh=False))
        figures["sandbox_up_s"] = round(up_s, 1)
        fleet = load_fleet(st["fleet"])
        server = fleet.servers[0]
        spec = st["servers"][0]
        figures["archive_timeout_s"] = sandbox.ARCHIVE_TIMEOUT_S
        figures["pg_bin"] = spec["pg_bin"]
        admin = make_conninfo(host="127.0.0.1", port=str(spec["port"]), user="postgres",
                              dbname="postgres")  # fmt: skip
        acme = sandbox.customer_conninfo(st, CUSTOMER)
        other = sandbox.customer_conninfo(st, OTHER)
        engine = make_engine(f"sqlite:///{directory / 'bench.db'}")
        upgrade(engine)
        upsert_customers(engine, [customer_from_mapping(c) for c in st["customers"]])
        events = EventLog(engine)
        commands = Commands(events)

        rows, size, fill_s = fill(acme, admin, args.size_mb << 20)
        figures.update(rows=rows, database_bytes=size, fill_s=round(fill_s, 1))
        print(f"filled {CUSTOMER}: {rows:,} rows, {size / 2**30:.2f} GiB in {fill_s:.0f} s",
              file=sys.stderr)  # fmt: skip

        with RunnerPool(fleet, record=commands.record) as pool:
            runner = pool.get(server.name)
            backups = Backups(engine, events, fleet, pool)
            dump_s, nightly = timed(lambda: backups.take_backup(CUSTOMER, ACTOR))
            at_dump = state(acme)
            base_s, base = timed(
                lambda: pitr.base_backup(
                    runner, server, type="full", retention_full=2, retention_diff=7
                )
            )
            figures.update(
                dump_s=round(dump_s, 1),
                dump_bytes=nightly.size_bytes,
                base_backup_s=round(base_s, 1),
                base_backup_repo_bytes=base.repo_bytes,
            )
            print(f"nightly dump {dump_s:.0f} s, base backup {base_s:.0f} s", file=sys.stderr)

            # The day's work: some before T, more after it.
            q(acme, "UPDATE big SET amount = amount + 1 WHERE id % 50 = 0")
            q(acme, "CREATE TABLE ledger (id int PRIMARY KEY, v int NOT NULL)")
            q(acme, "INSERT INTO ledger SELECT g, g * 3 FROM generate_series(1, 5000) g")
            at_t = state(acme)
            target = datetime.now(UTC)
            time.sleep(0.01)  # the work below commits strictly after T
            q(acme, "DELETE FROM big WHERE id % 97 = 0")
            q(acme, "UPDATE big SET amount = 0 WHERE id % 53 = 0")
            q(acme, "DROP TABLE ledger")
            after_t = state(acme)
            assert after_t != at_t

            # The RPO under a trickle of writes (one commit a second, to the other customer):
            # archive_timeout switches the WAL once a minute, so it saw-tooths from 0 to ~60 s.
            q(other, "CREATE TABLE trickle (at timestamptz DEFAULT now())")
            rpo: list[int] = []
            end = time.monotonic() + args.rpo_watch
            next_sample = time.monotonic()
            while time.monotonic() < end:
                q(other, "INSERT INTO trickle DEFAULT VALUES")
                if time.monotonic() >= next_sample:
                    window = pitr.recovery_window(runner, server)
                    if window is not None:
                        rpo.append(window.rpo_seconds)
                    next_sample += 5
                time.sleep(1)
            window = pitr.recovery_window(runner, server)
            assert window is not None
            other_before = q(other, "SELECT count(*) FROM trickle")[0][0]
            figures.update(
                rpo_before_restore_s=window.rpo_seconds,
                rpo_watch_s=args.rpo_watch,
                rpo_samples=len(rpo),
                rpo_median_s=statistics.median(rpo) if rpo else None,
                rpo_max_s=max(rpo) if rpo else None,
            )

            # The RTO with point-in-time recovery.
            plan = backups.restore_to_time_plan(CUSTOMER, target)
            commands.seen.clear()
            root = Path(pitr.scratch_root(server))
            with peak_disk(root, f"{pitr.SCRATCH_PREFIX}*") as peak:
                t0 = time.perf_counter()
                result = backups.restore_to_time(CUSTOMER, target, CUSTOMER, ACTOR)
                t1 = time.perf_counter()
            if args.commands:
                commands.show()
            restored = state(acme)
            if restored != at_t:
                raise SystemExit(f"restored {restored}, at T it was {at_t}")
            assert result.pitr is not None
            figures.update(
                pitr_rto_s=round(t1 - t0, 1),
                pitr_phases=commands.phases(t0, t1),
                pitr_scratch_s=round(result.pitr["duration_s"], 1),
                pitr_swap_s=round(result.duration_s, 1),
                wal_segments_planned=plan.wal_segments,
                scratch_peak_bytes=peak["bytes"],
                scratch_planned_bytes=plan.need_bytes,
                rows_at_t_match=True,
                other_untouched=q(other, "SELECT count(*) FROM trickle")[0][0] == other_before,
            )
            drop_kept(admin, result.kept_as)

            # The RTO from the nightly dump, as dbops restored before.
            commands.seen.clear()
            t0 = time.perf_counter()
            plain = backups.restore(CUSTOMER, nightly.stamp, CUSTOMER, ACTOR)
            t1 = time.perf_counter()
            if args.commands:
                commands.show()
            if state(acme) != at_dump:
                raise SystemExit(f"the dump restore gave {state(acme)}, not {at_dump}")
            figures.update(
                dump_rto_s=round(t1 - t0, 1),
                dump_phases=commands.phases(t0, t1, first=5),
            )
            drop_kept(admin, plain.kept_as)
        figures["pitr_vs_dump"] = round(figures["pitr_rto_s"] / figures["dump_rto_s"], 2)
        engine.dispose()
    finally:
        sandbox.down(directory, remove=True)
        shutil.rmtree(directory, ignore_errors=True)

    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    gib, rows, cpus = figures["database_bytes"] / 2**30, figures["rows"], figures["cpus"]
    print(f"point-in-time restore of one {gib:.2f} GiB customer database "
          f"({rows:,} rows), 1 server, local commands, {cpus} CPUs")  # fmt: skip
    print(f"  nightly dump {figures['dump_s']} s ({figures['dump_bytes'] / 2**20:.0f} MiB), "
          f"full base backup {figures['base_backup_s']} s "
          f"({figures['base_backup_repo_bytes'] / 2**20:.0f} MiB in the repository)")  # fmt: skip
    print(f"RPO (archive_timeout {figures['archive_timeout_s']} s): {figures['rpo_samples']} "
          f"samples over {figures['rpo_watch_s']} s of one write a second: median "
          f"{figures['rpo_median_s']} s, worst {figures['rpo_max_s']} s; "
          f"{figures['rpo_before_restore_s']} s right before the restore")  # fmt: skip
    print(f"RTO, restore to T:   {figures['pitr_rto_s']:>7.1f} s   "
          f"(scratch instance {figures['pitr_scratch_s']} s, then the swap "
          f"{figures['pitr_swap_s']} s); rows equal those at T")  # fmt: skip
    for name, seconds in figures["pitr_phases"].items():
        print(f"    {name:<44} {seconds:>7.1f} s")
    print(f"    WAL to replay: up to {figures['wal_segments_planned']} segment(s), as planned")
    print(f"RTO, from the dump:  {figures['dump_rto_s']:>7.1f} s")
    for name, seconds in figures["dump_phases"].items():
        print(f"    {name:<44} {seconds:>7.1f} s")
    print(f"  restore to T / dump restore: {figures['pitr_vs_dump']}x")
    peak, planned = figures["scratch_peak_bytes"] / 2**30, figures["scratch_planned_bytes"] / 2**30
    print(f"scratch instance disk: peak {peak:.2f} GiB "
          f"(the plan asked for {planned:.2f} GiB free)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
