"""The nightly backup run across a 6 x 10 sandbox: servers side by side against one after another.

Brings up a sandbox of 6 PostgreSQL clusters with 10 customer databases each and an sshd per
server (core.sandbox.up, in a temp dir, torn down at the end), then runs ``Backups.backup_all``
over SSH, as the scheduler would, with ``parallel=False`` and ``parallel=True`` in the same run
(alternating which goes first each round, so neither always gets the warm cache), and the
restore tests (``verify_all``) the same two ways. Every run is the full job: pg_dump, sha256,
row counts from the dump, status, retention, globals per server, an event per command.

    .venv/bin/python bench/backups.py [--rounds 2] [--servers 6] [--customers 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import sandbox
from core.backups import Backups
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import load_fleet
from core.remote import RunnerPool
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", type=int, default=6)
    parser.add_argument("--customers", type=int, default=60)
    parser.add_argument("--no-verify", action="store_true", help="skip the restore tests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="dbops-bench-backups-"))
    figures: dict[str, Any] = {"servers": args.servers, "databases": args.customers,
                               "cpus": os.cpu_count(), "rounds": args.rounds}  # fmt: skip
    try:
        up_s, state = timed(lambda: sandbox.up(directory, args.servers, args.customers, ssh=True))
        figures["sandbox_up_s"] = round(up_s, 2)
        fleet = load_fleet(state["fleet"])
        engine = make_engine(f"sqlite:///{directory / 'bench.db'}")
        upgrade(engine)
        upsert_customers(engine, [customer_from_mapping(c) for c in state["customers"]])
        events = EventLog(engine)

        def record(kind: str, subject: str, payload: dict[str, Any]) -> None:
            events.append(kind, subject, payload, actor="dbops")

        with RunnerPool(fleet, record=record) as pool:
            for server in fleet.servers:  # SSH connections opened before anything is timed
                pool.get(server.name).run(["true"]).check()
            backups = Backups(engine, events, fleet, pool)
            runs: dict[str, list[float]] = {"sequential": [], "parallel": []}
            per_db: dict[str, list[float]] = {"sequential": [], "parallel": []}
            verify: dict[str, list[float]] = {"sequential": [], "parallel": []}
            sizes = 0
            for n in range(args.rounds):
                order = [False, True] if n % 2 == 0 else [True, False]
                for parallel in order:
                    mode = "parallel" if parallel else "sequential"
                    wall, run = timed(partial(backups.backup_all, parallel=parallel))
                    if run.failed:
                        raise SystemExit(f"{len(run.failed)} backups failed: {run.failed[0]}")
                    runs[mode].append(wall)
                    per_db[mode] += [o.duration_s for o in run.outcomes]
                    sizes = sum(o.size_bytes or 0 for o in run.outcomes)
                    if not args.no_verify:
                        vwall, results = timed(partial(backups.verify_all, parallel=parallel))
                        bad = [r for r in results if r.verification.verdict != "ok"]
                        if bad:
                            raise SystemExit(f"restore test failed: {bad[0].as_json()}")
                        verify[mode].append(vwall)
            seq, par = statistics.median(runs["sequential"]), statistics.median(runs["parallel"])
            figures.update(
                backup_sequential_s=round(seq, 2),
                backup_parallel_s=round(par, 2),
                backup_speedup=round(seq / par, 2),
                backup_per_db_sequential_ms=round(statistics.median(per_db["sequential"]) * 1000),
                backup_per_db_parallel_ms=round(statistics.median(per_db["parallel"]) * 1000),
                dumped_bytes=sizes,
                events=events.count(),
            )
            if not args.no_verify:
                vs = statistics.median(verify["sequential"])
                vp = statistics.median(verify["parallel"])
                figures.update(
                    verify_sequential_s=round(vs, 2),
                    verify_parallel_s=round(vp, 2),
                    verify_speedup=round(vs / vp, 2),
                )
        engine.dispose()
    finally:
        sandbox.down(directory, remove=True)
        shutil.rmtree(directory, ignore_errors=True)

    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    n, s = figures["databases"], figures["servers"]
    print(f"nightly backups, {s} servers x {n // s} databases over SSH, "
          f"{figures['cpus']} CPUs, median of {args.rounds} rounds "
          f"(sandbox up in {figures['sandbox_up_s']} s)")  # fmt: skip
    print(f"  one server after another  {figures['backup_sequential_s']:>7.2f} s")
    print(f"  servers side by side      {figures['backup_parallel_s']:>7.2f} s"
          f"   ({figures['backup_speedup']}x)")  # fmt: skip
    print(f"  per database (median)     {figures['backup_per_db_sequential_ms']} ms alone, "
          f"{figures['backup_per_db_parallel_ms']} ms side by side; "
          f"{figures['dumped_bytes'] // 1024} KiB dumped per run")  # fmt: skip
    if "verify_parallel_s" in figures:
        print("restore tests (pg_restore into a scratch database, row counts compared)")
        print(f"  one server after another  {figures['verify_sequential_s']:>7.2f} s")
        print(f"  servers side by side      {figures['verify_parallel_s']:>7.2f} s"
              f"   ({figures['verify_speedup']}x)")  # fmt: skip
    print(f"events recorded: {figures['events']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
