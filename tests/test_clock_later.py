"""`make test-later` runs the suite a year ahead under libfaketime: every process it starts is
on the moved clock, Python's sleeps and waits still work, and commands sent over the sandbox's
SSH run on that clock too."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import sandbox

SITE = Path(__file__).with_name("faketime_site")
YEAR_S = 365 * 86400

# What the child reports: its wall clock, how long its sleep and its wait took, the wall clock
# of a `date` it runs as the postgres user (when it can, as the sandbox runs PostgreSQL), and
# the real clock (a `date` without libfaketime: this test may itself run under `make test-later`).
CHILD = """
import json, os, subprocess, threading, time
now = time.time()
real_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
real = subprocess.run(["date", "+%s"], env=real_env, capture_output=True, text=True).stdout
started = time.monotonic()
time.sleep(0.05)
slept = time.monotonic() - started
started = time.monotonic()
threading.Event().wait(0.05)
waited = time.monotonic() - started
argv = ["date", "+%s"]
if os.geteuid() == 0:
    argv = ["runuser", "-u", "postgres", "--", *argv]
other = subprocess.run(argv, capture_output=True, text=True)
print(json.dumps({"now": now, "real": int(real), "slept": slept, "waited": waited,
                  "other": other.stdout.strip(), "error": other.stderr.strip()}))
"""


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is missing: apt-get install faketime (make system-deps)")
    return found[0]


def test_a_python_process_a_year_ahead_sleeps_waits_and_starts_others_there() -> None:
    env = {
        **os.environ,
        "FAKETIME": "+365d",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": str(SITE),
        "LD_PRELOAD": _libfaketime(),
    }
    env.pop("FAKETIME_SHARED", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert YEAR_S - 2 <= got["now"] - got["real"] <= YEAR_S + 2, got
    assert 0.05 <= got["slept"] < 5 and 0.05 <= got["waited"] < 5, got
    assert got["other"], got["error"]  # another user's process opened libfaketime's semaphore
    assert YEAR_S - 2 <= int(got["other"]) - got["real"] <= YEAR_S + 2, got


def test_sshd_sessions_of_a_sandbox_under_libfaketime_get_its_clock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = {"name": "vps1", "ssh_port": 2222, "sshd_dir": str(tmp_path)}
    keys = tmp_path / "authorized_keys"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FAKETIME", "LD_PRELOAD"))}
    monkeypatch.setattr(os, "environ", clean)
    # Without libfaketime the sessions get only their own home (no ~/.bashrc of ours to run).
    (line,) = [x for x in sandbox._sshd_config(spec, keys).splitlines() if x.startswith("SetEnv")]
    assert line == f'SetEnv "HOME={tmp_path / "home"}"'

    moved = {
        "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "FAKETIME": "+365d",
        "FAKETIME_SHARED": "/faketime_sem_1 /faketime_shm_1",
    }
    monkeypatch.setattr(os, "environ", {**clean, **moved})
    config = sandbox._sshd_config(spec, keys)
    (line,) = [x for x in config.splitlines() if x.startswith("SetEnv")]
    assert line == (
        f'SetEnv "HOME={tmp_path / "home"}"'
        ' "FAKETIME=+365d" "FAKETIME_SHARED=/faketime_sem_1 /faketime_shm_1"'
        ' "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"'
    )
    # sshd accepts it (values with spaces quoted).
    path = tmp_path / "sshd_config"
    path.write_text(config)
    key = tmp_path / "ssh_host_ed25519_key"
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)]
    subprocess.run(keygen, env=clean, check=True)
    if os.geteuid() == 0:  # sshd wants its privilege separation directory, as the sandbox makes
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    checked = subprocess.run(
        [str(sandbox.SSHD), "-t", "-f", str(path)], env=clean, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
