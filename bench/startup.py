"""How long does the `dbops` process take to start, against what it cannot avoid?

Two measurements, each against its baseline in the same run, rounds interleaved (A B A B ...)
so that a noisy neighbour on the machine costs both sides alike:

* help     `dbops --help`, whole process, against `python -c "import typer"` (a bare
           interpreter plus typer's own import; `python -c pass` is printed too).
           Aim: within 2x. For reference, a two-command typer app's --help (typer's rich
           help rendering, which `dbops --help` cannot skip without changing its output).
* status   `dbops status acme`, whole process, against the status work itself: a fresh
           process that has imported what the command uses times Context.load().ready(),
           Ops.status("acme") and the rendering (the first call, as the command makes it:
           connections opened, templates compiled). Aim: whole process within 1.5x.

The status runs go to a sandbox fleet (1 server, 1 customer: acme) that this script starts
with `dbops sandbox up` in a temp dir and stops at the end, and a SQLite database there.
Every process runs in that temp dir with none of dbops's settings from the environment.
Then `python -X importtime` names the biggest importers of each command (self time summed
by top-level package).

    .venv/bin/python bench/startup.py [--rounds 9] [--top 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402

HELP_AIM, STATUS_AIM = 2.0, 1.5

# Typer's own help rendering (rich), for reference: a two-command app's --help.
TYPER_APP = "import typer; a = typer.Typer(); a.command('x')(id); a.command('y')(id); a()"

# The status work, timed inside a process that has already imported what `dbops status` uses.
WORK = """\
import sys, time
from bot.context import Context
from core.ops import Ops
from core.report import render_status_text
import storage.migrate
started = time.perf_counter()
ctx = Context.load().ready()
ops = Ops(ctx.fleet, ctx.engine, ctx.events)
try:
    status = ops.status(sys.argv[1])
finally:
    ops.close()
text = render_status_text(status, ctx.settings.tz)
print(time.perf_counter() - started)
"""


def dbops_argv() -> list[str]:
    """The console script beside this interpreter (what an operator types), else `-m bot`."""
    script = Path(sys.executable).parent / "dbops"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bot"]


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any dbops setting, plus ``settings``."""
    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("SLACK_")}
    env.update(settings)
    return env


def run(argv: Sequence[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {res.returncode}:\n{res.stderr}")
    return res


def wall(argv: Sequence[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    run(argv, env, cwd)
    return time.perf_counter() - started


def work(env: dict[str, str], cwd: Path, customer: str) -> float:
    return float(run([sys.executable, "-c", WORK, customer], env, cwd).stdout.strip())


def importers(argv: Sequence[str], env: dict[str, str], cwd: Path, top: int) -> list[str]:
    """The top-level packages whose modules took the longest to import (self time, summed)."""
    code = (
        "import sys; sys.argv = ['dbops', *sys.argv[1:]]\n"
        "from bot.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
    )
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    by_package: dict[str, int] = defaultdict(int)
    modules = 0
    for line in res.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        by_package[name.strip().split(".")[0]] += int(self_us)
        modules += 1
    total = sum(by_package.values())
    ranked = sorted(by_package.items(), key=lambda kv: kv[1], reverse=True)[:top]
    lines = [f"    {modules} modules, {total / 1000:.0f} ms in all"]
    lines += [f"    {name:<22} {us / 1000:7.1f} ms" for name, us in ranked]
    return lines


def summary(name: str, times: list[float]) -> str:
    return (
        f"  {name:<28} median {statistics.median(times) * 1000:7.1f} ms"
        f"   max {max(times) * 1000:7.1f} ms"
    )


def verdict(label: str, ratio: float, aim: float) -> str:
    return f"  {label:<28} {ratio:5.2f}x   (aim <= {aim}x: {'met' if ratio <= aim else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--top", type=int, default=8, help="How many importers to name.")
    args = parser.parse_args()
    dbops = dbops_argv()

    with tempfile.TemporaryDirectory(prefix="dbops-startup-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # the clusters run as the postgres user, who must reach the sandbox
        env = clean_env(DATABASE_URL=f"sqlite:///{base / 'dbops.db'}")
        box = base / "sandbox"
        state = json.loads(
            run(
                [*dbops, "sandbox", "up", "--dir", str(box), "--servers", "1", "--customers", "1"],
                env,
                base,
            ).stdout
        )
        try:
            env["DBOPS_FLEET"] = state["fleet"]
            customer = state["customers"][0]["name"]
            status_argv = [*dbops, "status", customer]
            commands = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "python -c 'import typer'": [sys.executable, "-c", "import typer"],
                "typer app --help": [sys.executable, "-c", TYPER_APP, "--help"],
                "dbops --help": [*dbops, "--help"],
                f"dbops status {customer}": status_argv,
            }
            for argv in commands.values():  # warm: page cache, .pyc files, the schema
                wall(argv, env, base)
            work(env, base, customer)
            times: dict[str, list[float]] = {name: [] for name in commands}
            times["status work itself"] = []
            for _ in range(args.rounds):
                for name, argv in commands.items():
                    times[name].append(wall(argv, env, base))
                times["status work itself"].append(work(env, base, customer))

            python = sys.version.split()[0]
            print(f"dbops start-up, {args.rounds} rounds ({' '.join(dbops)}; Python {python})")
            for name, series in times.items():
                print(summary(name, series))
            med = {name: statistics.median(series) for name, series in times.items()}
            print("ratios (medians):")
            print(
                verdict(
                    "help / (python + typer)",
                    med["dbops --help"] / med["python -c 'import typer'"],
                    HELP_AIM,
                )
            )
            ours = med["dbops --help"] / med["typer app --help"]
            print(f"  {'help / typer app --help':<28} {ours:5.2f}x   (for reference)")
            print(
                verdict(
                    "status / status work",
                    med[f"dbops status {customer}"] / med["status work itself"],
                    STATUS_AIM,
                )
            )
            print("biggest importers, `dbops --help`:")
            print("\n".join(importers(["--help"], env, base, args.top)))
            print(f"biggest importers, `dbops status {customer}`:")
            print("\n".join(importers(["status", customer], env, base, args.top)))
        finally:
            run([*dbops, "sandbox", "down", "--dir", str(box)], env, base)


if __name__ == "__main__":
    main()
