"""The idle cost of `dbops scheduler`: CPU seconds per hour and RSS, with the sandbox fleet.

Starts a sandbox (3 servers, 15 customers, local or --ssh), then runs for --minutes, side by
side: `dbops scheduler` (health sweep every minute, escalation tick every 5 s, nothing else
due), a bare APScheduler BackgroundScheduler with one no-op 5 s job, and an idle Python
process (the floor). Reads utime+stime (children included) and VmRSS from /proc.

    .venv/bin/python bench/worker_idle.py [--minutes 3] [--ssh]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import sandbox  # noqa: E402

BARE_APSCHEDULER = """
import time
from apscheduler.schedulers.background import BackgroundScheduler
s = BackgroundScheduler(); s.add_job(lambda: None, "interval", seconds=5); s.start()
while True: time.sleep(3600)
"""
IDLE = "import time\nwhile True: time.sleep(3600)\n"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--ssh", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dbops-idle-"))
    os.chmod(work, 0o755)
    state = sandbox.up(work / "sbx", servers=3, customers=15, ssh=args.ssh)
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work / 'dbops.db'}",
        "DBOPS_FLEET": state["fleet"],
    }
    env.pop("SLACK_BOT_TOKEN", None)
    dbops = [sys.executable, "-m", "bot"]
    subprocess.run([*dbops, "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*dbops, "fleet", "import", str(work / "sbx" / "sandbox.json")],
        env=env,
        check=True,
        capture_output=True,
    )
    procs = {
        "dbops scheduler": subprocess.Popen(
            [*dbops, "scheduler"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        "bare APScheduler": subprocess.Popen([sys.executable, "-c", BARE_APSCHEDULER]),
        "idle python": subprocess.Popen([sys.executable, "-c", IDLE]),
    }
    try:
        time.sleep(10)  # start-up is not idle cost
        start = {name: cpu_s(p.pid) for name, p in procs.items()}
        t0 = time.monotonic()
        peak = dict.fromkeys(procs, 0.0)
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(1)
            for name, p in procs.items():
                peak[name] = max(peak[name], rss_mb(p.pid))
        elapsed_h = (time.monotonic() - t0) / 3600
        print(
            f"{args.minutes:g} min measured, {'ssh' if args.ssh else 'local'} sandbox "
            "(3 servers, 15 customers)"
        )
        print(f"{'process':<18} {'CPU s/hour':>11} {'CPU %':>6} {'peak RSS MB':>12}")
        for name, p in procs.items():
            rate = (cpu_s(p.pid) - start[name]) / elapsed_h
            print(f"{name:<18} {rate:>11.1f} {rate / 36:>6.2f} {peak[name]:>12.1f}")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=15)
        sandbox.down(work / "sbx", remove=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
