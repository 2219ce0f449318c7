"""`make demo` from a clone in a directory closed to others (root's 0700 home on Debian), as the
README tells a newcomer: the clusters run as the postgres user, who cannot enter the clone, so
their data goes under /var/tmp (the banner says where) and the home stays closed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_of_this_tree(into: Path) -> None:
    """What a clone of this checkout holds: tracked files and new ones not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (raw.decode() for raw in listed)):
        source = ROOT / name
        if not source.is_file():
            continue  # deleted in the work tree, not yet in the index
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, into / name)


def _venv_of_this_tree(clone: Path) -> None:
    """The clone's .venv as this checkout's own (a link), so that `make demo` finds it up to
    date and skips its minute of pip: what is under test is the demo in a closed home."""
    venv = Path(sys.executable).parent.parent
    assert (venv / "bin" / "dbops").exists(), venv
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    # make compares .venv/bin/dbops with pyproject.toml: the copy keeps its time; be sure.
    os.utime(clone / "pyproject.toml", (0, 0))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the closed-home case is root's")
@pytest.mark.parametrize(
    "install",
    [
        pytest.param("linked", id="this-venv"),
        # The same from nothing: make creates the venv and pip installs (~1 min more).
        pytest.param("fresh", id="fresh-venv", marks=pytest.mark.heavy),
    ],
)
def test_make_demo_from_a_clone_in_a_closed_home_answers_status(install: str) -> None:
    home = Path(tempfile.mkdtemp(prefix="dbops-home-"))  # 0700, like /root
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    clone = home / "dbops"
    clone.mkdir()
    _copy_of_this_tree(clone)
    if install == "linked":
        _venv_of_this_tree(clone)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "DBOPS_", "SMTP_", "DATABASE_", "STRIPE_", "MAKE"))
    }
    env["HOME"] = str(home)
    sandbox_link = clone / ".demo" / "sandbox"
    try:
        done = subprocess.run(
            ["make", "demo"],
            input="/db status acme\n",
            capture_output=True,
            text=True,
            env=env,
            cwd=clone,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        out = done.stdout
        assert "acme is online on vps1" in out, out[-3000:]
        assert sandbox_link.is_symlink()
        data = sandbox_link.resolve()
        assert data.parent == Path("/var/tmp")
        assert f"their data is in {data}" in out  # the banner says where
        # The demo's first screen is the demo: one line of install before its banner.
        before_banner = out.split("dbops demo:", 1)[0].strip().splitlines()
        assert len(before_banner) <= 3, before_banner
        assert "Warning" not in done.stderr and "warning" not in done.stderr, done.stderr[-2000:]
        assert stat.S_IMODE(home.stat().st_mode) == 0o700  # nobody's home was opened
    finally:
        dbops = clone / ".venv" / "bin" / "dbops"
        if dbops.exists() and sandbox_link.exists():
            subprocess.run(
                [str(dbops), "sandbox", "down", "--dir", str(sandbox_link)],
                capture_output=True,
                env=env,
                timeout=120,
                check=False,
            )
        if sandbox_link.is_symlink():
            shutil.rmtree(sandbox_link.resolve(), ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
