"""How fast is the fleet health report, against what it could be and what it replaces?

Brings up a sandbox of 6 servers x 10 databases (core.sandbox.up, sshd per server) in a temp
dir, then, locally and over SSH:

* report       build_report for the whole fleet (median of --runs, runners kept between runs);
* floor        a plain psycopg script: the same connections and the same queries in parallel
               threads, no logic (the cluster pipeline; per database the probe's SELECT
               version() and last_vacuum query on one connection; per server with pgBouncer its
               admin console's SHOW DATABASES and SHOW POOLS), and "floor+cmds": plus the same
               df/tail/grep per server;
* sequential   the same checks, one server after another;
* check_postgres  one call per check per database (6 x 10 x 7); measured on --oracle-sample
               databases and scaled up, since the full loop takes minutes.

Then again with 25 ms added each way to every PostgreSQL, pgBouncer and SSH port by
bench/delayproxy.py: the whole report against the slowest single server's. Prints figures and
ratios; aims: report within 1.5x the floor, >= 30x faster than the check_postgres loop, delayed
report within 1.5x of the slowest single server.

    .venv/bin/python bench/fanout.py [--runs 5] [--oracle-sample 10] [--delay-ms 25]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import health, sandbox
from core.backups import backup_files_argv
from core.customers import Customer, customer_from_mapping
from core.fleet import Fleet, load_fleet, parse_fleet
from core.remote import RunnerPool
from core.report import build_report

CHECK_POSTGRES = "/usr/bin/check_postgres"
ORACLE_ACTIONS = ("connection", "backends", "txn_idle", "txn_time", "query_time", "locks",
                  "prepared_txns")  # fmt: skip
ORACLE_LIMITS = {"txn_idle": ("10s", "30s"), "txn_time": ("5m", "15m"), "query_time": ("2m", "5m")}
DEADLINE = 30.0


def median_time(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm: connections opened, caches filled
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def with_transport(fleet: Fleet, transport: str) -> Fleet:
    data = fleet.model_dump(exclude={"base_dir"})
    for server in data["servers"]:
        server["transport"] = transport
    return parse_fleet(data, base_dir=fleet.base_dir)


def floor(fleet: Fleet, customers: list[Customer], pool: RunnerPool | None) -> None:
    """The same connections and queries (and commands, given runners) in threads, no logic.

    Per server: the cluster connection and its pipeline; per database a connection running
    SELECT version() then the last_vacuum query (as ``probe_database``); where the server has
    pgBouncer, one admin-console connection running SHOW DATABASES and SHOW POOLS (as
    ``fetch_pgbouncer``).
    """
    limits = health.Limits.for_deadline(DEADLINE)
    threads = []

    def cluster(dsn: str) -> None:
        with psycopg.connect(health.health_conninfo(dsn, limits), autocommit=True) as conn:
            with conn.pipeline():
                curs = [conn.cursor() for _ in range(5)]
                for cur, sql in zip(curs, (health.LOCKS_SQL, health.BACKENDS_SQL,
                                           health.ACTIVITY_SQL, health.PREPARED_SQL,
                                           health.DATABASES_SQL), strict=True):  # fmt: skip
                    cur.execute(sql)
            for cur in curs:
                cur.fetchall()

    def probe(dsn: str, db: str) -> None:
        info = health.health_conninfo(dsn, limits, dbname=db)
        with psycopg.connect(info, autocommit=True) as conn:
            conn.execute("SELECT version()").fetchone()
            conn.execute(health.LAST_VACUUM_SQL).fetchone()

    def bouncer(info: str) -> None:
        with psycopg.connect(info, autocommit=True) as conn:
            conn.execute("SHOW DATABASES").fetchall()
            conn.execute("SHOW POOLS").fetchall()

    for server in fleet.servers:
        threads.append(threading.Thread(target=cluster, args=(server.dsn,)))
        for c in customers:
            if c.server == server.name:
                threads.append(threading.Thread(target=probe, args=(server.dsn, c.database)))
        if server.pgbouncer_ini:
            info = health.pgbouncer_conninfo(server, limits)
            threads.append(threading.Thread(target=bouncer, args=(info,)))
        if pool is not None:
            runner = pool.get(server.name)
            names = [c.name for c in customers if c.server == server.name]
            for argv in (health.df_argv(server), health.log_argv(server),
                         backup_files_argv(server, names)):  # fmt: skip
                threads.append(threading.Thread(target=runner.run, args=(argv,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def check_postgres_loop(sandbox_state: dict[str, Any], databases: list[Customer]) -> float:
    ports = {s["name"]: s["port"] for s in sandbox_state["servers"]}
    started = time.perf_counter()
    for c in databases:
        for action in ORACLE_ACTIONS:
            argv = [CHECK_POSTGRES, "--no-check_postgresrc", f"--action={action}",
                    "--host=127.0.0.1", f"--port={ports[c.server]}", "--dbuser=dbops_monitor",
                    f"--dbname={c.database}"]  # fmt: skip
            if action in ORACLE_LIMITS:
                warn, crit = ORACLE_LIMITS[action]
                argv += [f"--warning={warn}", f"--critical={crit}"]
            subprocess.run(argv, capture_output=True, check=False)
    return time.perf_counter() - started


def peak_memory(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def delayed_fleet(fleet: Fleet, ports: dict[str, int], workdir: Path) -> Fleet:
    """The fleet with every PostgreSQL, pgBouncer and SSH port behind the proxy, host keys
    re-labelled."""
    data = fleet.model_dump(exclude={"base_dir"})
    known = fleet.known_hosts_path.read_text(encoding="utf-8") if fleet.known_hosts else ""
    for server in data["servers"]:
        pg = int(conninfo_to_dict(server["dsn"])["port"] or 5432)
        server["dsn"] = make_conninfo(server["dsn"], port=ports[f"127.0.0.1:{pg}"])
        if server["pgbouncer_ini"]:
            server["pgbouncer_port"] = ports[f"127.0.0.1:{server['pgbouncer_port']}"]
        old = server["ssh_port"]
        server["ssh_port"] = ports[f"127.0.0.1:{old}"]
        known = known.replace(f"[127.0.0.1]:{old} ", f"[127.0.0.1]:{server['ssh_port']} ")
    hosts = workdir / "known_hosts.delayed"
    hosts.write_text(known, encoding="utf-8")
    data["known_hosts"] = str(hosts)
    return parse_fleet(data, base_dir=fleet.base_dir)


def line(label: str, seconds: float, extra: str = "") -> None:
    print(f"  {label:<34} {seconds * 1000:9.0f} ms  {extra}")


def bench_mode(
    name: str, fleet: Fleet, customers: list[Customer], runs: int, with_cmds: bool
) -> dict[str, float]:
    print(f"\n{name}: {len(fleet.servers)} servers, {len(customers)} databases")
    out: dict[str, float] = {}
    with RunnerPool(fleet) as pool:
        out["report"] = median_time(
            lambda: build_report(fleet, customers, pool, deadline_s=DEADLINE), runs
        )
        line("report (median)", out["report"])
        out["floor"] = median_time(lambda: floor(fleet, customers, None), runs)
        line(
            "floor: psycopg only",
            out["floor"],
            f"report/floor = {out['report'] / out['floor']:.2f}x",
        )
        if with_cmds:
            out["floor_cmds"] = median_time(lambda: floor(fleet, customers, pool), runs)
            line("floor+cmds: psycopg + df/tail/grep", out["floor_cmds"],
                 f"report/floor+cmds = {out['report'] / out['floor_cmds']:.2f}x")  # fmt: skip

        def sequential() -> None:
            for server in fleet.servers:
                health.check_fleet(fleet, customers, pool, deadline_s=DEADLINE,
                                   servers=[server.name])  # fmt: skip

        out["sequential"] = median_time(sequential, max(1, runs // 2))
        line("same checks, server after server", out["sequential"],
             f"sequential/report = {out['sequential'] / out['report']:.1f}x")  # fmt: skip
        peak = peak_memory(lambda: build_report(fleet, customers, pool, deadline_s=DEADLINE))
        print(f"  {'report peak Python memory':<34} {peak / 1024:9.0f} kB (tracemalloc)")
    return out


def bench_delay(name: str, fleet: Fleet, customers: list[Customer], runs: int) -> dict[str, float]:
    print(f"\n{name}")
    out: dict[str, float] = {}
    with RunnerPool(fleet) as pool:
        out["report"] = median_time(
            lambda: build_report(fleet, customers, pool, deadline_s=DEADLINE), runs
        )
        line("whole fleet report (median)", out["report"])
        singles = {}
        for server in fleet.servers:
            mine = [c for c in customers if c.server == server.name]
            one = parse_fleet(
                {**fleet.model_dump(exclude={"base_dir"}), "servers": [server.model_dump()]},
                base_dir=fleet.base_dir,
            )
            singles[server.name] = median_time(
                partial(build_report, one, mine, pool, deadline_s=DEADLINE),
                runs,
            )
        slowest = max(singles, key=lambda k: singles[k])
        out["slowest_single"] = singles[slowest]
        line(f"slowest single server ({slowest})", singles[slowest],
             f"report/slowest = {out['report'] / singles[slowest]:.2f}x")  # fmt: skip
        out["floor"] = median_time(lambda: floor(fleet, customers, None), runs)
        line(
            "floor: psycopg only",
            out["floor"],
            f"report/floor = {out['report'] / out['floor']:.2f}x",
        )
        print(f"  {'floor / slowest single server':<34} {out['floor'] / singles[slowest]:9.2f}x "
              "(the bound this machine sets)")  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="fleet health report benchmark")
    parser.add_argument("--servers", type=int, default=6)
    parser.add_argument("--databases", type=int, default=10, help="per server")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--oracle-sample", type=int, default=10,
                        help="databases to run the check_postgres loop on (0: all)")  # fmt: skip
    parser.add_argument("--delay-ms", type=float, default=25.0, help="added each way")
    parser.add_argument("--dir", type=Path, help="reuse/keep a sandbox here")
    args = parser.parse_args()

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="dbops-bench-"))
    started = time.perf_counter()
    state = sandbox.up(workdir, servers=args.servers,
                       customers=args.servers * args.databases, ssh=True)  # fmt: skip
    print(f"sandbox up in {time.perf_counter() - started:.1f}s at {workdir}")
    proxies: list[subprocess.Popen[str]] = []
    try:
        base = load_fleet(state["fleet"])
        customers = [customer_from_mapping(c) for c in state["customers"]]
        local = bench_mode("local", with_transport(base, "local"), customers, args.runs, True)
        ssh = bench_mode("ssh", with_transport(base, "ssh"), customers, args.runs, True)

        sample = customers if args.oracle_sample <= 0 else customers[: args.oracle_sample]
        loop = check_postgres_loop(state, sample)
        scaled = loop * len(customers) / len(sample)
        calls = len(sample) * len(ORACLE_ACTIONS)
        print(f"\ncheck_postgres loop: {calls} calls in {loop:.1f}s "
              f"-> {len(customers) * len(ORACLE_ACTIONS)} calls ~ {scaled:.1f}s")  # fmt: skip
        print(f"  loop/report (local) = {scaled / local['report']:.0f}x, "
              f"loop/report (ssh) = {scaled / ssh['report']:.0f}x")  # fmt: skip

        # One proxy process per server, as each server has its own network path; one process
        # for all would make the proxy's own CPU the bottleneck on a small machine.
        ports: dict[str, int] = {}
        for s in base.servers:
            targets = [f"127.0.0.1:{conninfo_to_dict(s.dsn)['port']}", f"127.0.0.1:{s.ssh_port}"]
            if s.pgbouncer_ini:
                targets.append(f"127.0.0.1:{s.pgbouncer_port}")
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("delayproxy.py")),
                 "--delay-ms", str(args.delay_ms), *targets],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            proxies.append(proc)
            assert proc.stdout is not None
            ports.update({k: int(v) for k, v in json.loads(proc.stdout.readline()).items()})
        slow = delayed_fleet(base, ports, workdir)
        rtt = f"{2 * args.delay_ms:g} ms round trip"
        d_local = bench_delay(f"local, {rtt}", with_transport(slow, "local"), customers, args.runs)
        d_ssh = bench_delay(f"ssh, {rtt}", with_transport(slow, "ssh"), customers, args.runs)

        print("\nsummary")
        print(
            f"  report/floor:            local {local['report'] / local['floor']:.2f}x, "
            f"ssh {ssh['report'] / ssh['floor_cmds']:.2f}x (vs floor+cmds)  [aim <= 1.5x]"
        )
        print(f"  check_postgres/report:   {scaled / local['report']:.0f}x  [aim >= 30x]")
        print(f"  delayed report/slowest:  local "
              f"{d_local['report'] / d_local['slowest_single']:.2f}x, ssh "
              f"{d_ssh['report'] / d_ssh['slowest_single']:.2f}x  [aim <= 1.5x]")  # fmt: skip
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"  process peak RSS:        {rss / 1024:.0f} MB")
    finally:
        for proc in proxies:
            proc.terminate()
            proc.wait(5)
        if args.dir is None:
            sandbox.down(workdir, remove=True)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
