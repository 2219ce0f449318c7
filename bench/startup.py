"""How long does the `dbops` process take to start, against what it cannot avoid?

Two measurements, each against its baseline in the same run, rounds interleaved (A B A B ...)
so that a noisy neighbour on the machine costs both sides alike:

* help     `dbops --help`, whole process, against `python -c "import typer"` (a bare
           interpreter plus typer's own import; `python -c pass` is printed too).
           Aim: within 2x. For reference, a two-command typer app's --help (typer's rich
           help rendering, which `dbops --help` cannot skip without changing its output).
* status   `dbops status acme`, whole process, against the status work itself: a fresh
           process that has imported every module the command imports (as `-X importtime`
           lists them) times the command's own function, `bot.cli.status_cmd("acme")`, its
           output discarded: settings, schema check, Ops.status and the rendering (the first
           call, as the command makes it: connections opened, templates compiled). A module
           imported while it is timed is named (and would flatter the ratio). Aim: whole
           process within 1.5x.

The status runs go to a sandbox fleet (1 server, 1 customer: acme) that this script starts
with `dbops sandbox up` in a temp dir and stops at the end, and a SQLite database there.
Every process runs in that temp dir with none of dbops's settings from the environment.
Each time is shown with the CPU time (user + system, the process's and its children's) spent
alongside: on a shared machine the wall times swing with the neighbours' load, the CPU times much
less (the CPU ratio leaves out the time the work waits on PostgreSQL, so it runs higher than the
wall ratio would on an idle machine). The aims are judged on wall time.
Then `python -X importtime` names the biggest importers of each command (self time summed
by top-level package).

    .venv/bin/python bench/startup.py [--rounds 9] [--top 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

# The status work, timed inside a process that has already imported every module `dbops
# status` imports (argv[2:]): the command's own function, its output discarded.
WORK = """\
import contextlib, importlib, io, json, resource, sys, time
for name in sys.argv[2:]:
    with contextlib.suppress(Exception):
        importlib.import_module(name)
from bot.cli import status_cmd
def cpu():
    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, who))
before = set(sys.modules)
cpu0, started = cpu(), time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    status_cmd(sys.argv[1])
elapsed, cpu_s = time.perf_counter() - started, cpu() - cpu0
late = sorted(set(sys.modules) - before)
print(json.dumps({"seconds": elapsed, "cpu": cpu_s, "imported": late}))
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


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def wall(argv: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and the children it waited for)."""
    cpu, started = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    run(argv, env, cwd)
    return time.perf_counter() - started, _cpu(resource.RUSAGE_CHILDREN) - cpu


def work(
    env: dict[str, str], cwd: Path, customer: str, modules: Sequence[str]
) -> tuple[float, float]:
    out = json.loads(run([sys.executable, "-c", WORK, customer, *modules], env, cwd).stdout)
    if out["imported"]:
        late = ", ".join(out["imported"][:8])
        print(f"  (the timed status work imported {len(out['imported'])} modules: {late})")
    return float(out["seconds"]), float(out["cpu"])


def importtime(argv: Sequence[str], env: dict[str, str], cwd: Path) -> list[tuple[str, int]]:
    """(module, self time in us) for every module the command imports, in import order."""
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
    found = []
    for line in res.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        found.append((name.strip(), int(self_us)))
    return found


def importers(imported: list[tuple[str, int]], top: int) -> list[str]:
    """The top-level packages whose modules took the longest to import (self time, summed)."""
    by_package: dict[str, int] = defaultdict(int)
    for name, self_us in imported:
        by_package[name.split(".")[0]] += self_us
    total = sum(by_package.values())
    ranked = sorted(by_package.items(), key=lambda kv: kv[1], reverse=True)[:top]
    lines = [f"    {len(imported)} modules, {total / 1000:.0f} ms in all"]
    lines += [f"    {name:<22} {us / 1000:7.1f} ms" for name, us in ranked]
    return lines


def summary(name: str, times: list[float], cpu: list[float]) -> str:
    return (
        f"  {name:<28} median {statistics.median(times) * 1000:7.1f} ms"
        f"   max {max(times) * 1000:7.1f} ms   cpu median {statistics.median(cpu) * 1000:7.1f} ms"
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
            help_imports = importtime(["--help"], env, base)
            status_imports = importtime(["status", customer], env, base)
            modules = [name for name, _us in status_imports]
            work(env, base, customer, modules)
            names = [*commands, "status work itself"]
            times: dict[str, list[float]] = {name: [] for name in names}
            cpus: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.rounds):
                spent = {name: wall(argv, env, base) for name, argv in commands.items()}
                spent["status work itself"] = work(env, base, customer, modules)
                for name, (seconds, cpu_s) in spent.items():
                    times[name].append(seconds)
                    cpus[name].append(cpu_s)

            python = sys.version.split()[0]
            print(f"dbops start-up, {args.rounds} rounds ({' '.join(dbops)}; Python {python})")
            for name in names:
                print(summary(name, times[name], cpus[name]))
            med = {name: statistics.median(series) for name, series in times.items()}
            cpu = {name: statistics.median(series) for name, series in cpus.items()}
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
            print("the same ratios of the CPU times (for reference):")
            for label, ours_name, theirs in (
                ("help / (python + typer)", "dbops --help", "python -c 'import typer'"),
                ("help / typer app --help", "dbops --help", "typer app --help"),
                ("status / status work", f"dbops status {customer}", "status work itself"),
            ):
                print(f"  {label:<28} {cpu[ours_name] / cpu[theirs]:5.2f}x")
            print("biggest importers, `dbops --help`:")
            print("\n".join(importers(help_imports, args.top)))
            print(f"biggest importers, `dbops status {customer}`:")
            print("\n".join(importers(status_imports, args.top)))
        finally:
            run([*dbops, "sandbox", "down", "--dir", str(box)], env, base)


if __name__ == "__main__":
    main()
