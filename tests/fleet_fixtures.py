"""Session-wide sandbox fleet fixtures (owned by the fleet work).

``sandbox`` is one real fleet for the whole session: 3 PostgreSQL clusters with an sshd each and
6 customers (acme first). Tests that break it use ``sandbox_break``, which heals at teardown, so
the next test finds the fleet as ``up`` left it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core import sandbox as sandbox_mod
from core.fleet import Fleet, load_fleet

SANDBOX_SERVERS = 3
SANDBOX_CUSTOMERS = 6


@pytest.fixture(scope="session")
def sandbox() -> Iterator[dict[str, Any]]:
    """The sandbox state (sandbox.json): fleet path, servers with ports, customers."""
    # Not tmp_path_factory: pytest makes its base 0700, which the postgres user cannot enter.
    directory = Path(tempfile.mkdtemp(prefix="dbops-sbx-"))
    try:
        # No skip on failure: a sandbox that cannot start (no sshd, no initdb) is a broken
        # machine set-up that every fleet test would otherwise hide.
        state = sandbox_mod.up(
            directory, servers=SANDBOX_SERVERS, customers=SANDBOX_CUSTOMERS, ssh=True
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        yield state
    finally:
        sandbox_mod.down(directory, remove=True)


@pytest.fixture(scope="session")
def sandbox_dir(sandbox: dict[str, Any]) -> Path:
    return Path(sandbox["dir"])


@pytest.fixture(scope="session")
def sandbox_fleet(sandbox: dict[str, Any]) -> Fleet:
    return load_fleet(sandbox["fleet"])


@pytest.fixture
def sandbox_break(sandbox_dir: Path) -> Iterator[Callable[[str, str], dict[str, Any]]]:
    """``sandbox_break(fault, target)`` breaks the session sandbox; everything heals afterwards."""

    def breaker(fault: str, target: str) -> dict[str, Any]:
        return sandbox_mod.break_fault(sandbox_dir, fault, target)

    try:
        yield breaker
    finally:
        sandbox_mod.heal(sandbox_dir)


@pytest.fixture
def sandbox_backups_kept(sandbox: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    """Tests that take backups or restore-test them leave the session sandbox's backup
    directories as they found them: whatever they add is removed afterwards, and whatever a
    run pruned (retention keeps one backup a day) is put back, with its owner and mode."""
    roots = [Path(s["backup_path"]) for s in sandbox["servers"]]
    kept = tmp_path / "backups-kept"
    before: dict[Path, os.stat_result] = {}
    for number, root in enumerate(roots):
        for path in sorted(root.rglob("*"), key=lambda p: len(p.parts)):
            before[path] = path.lstat()
            if path.is_file() and not path.is_symlink():
                copy = kept / str(number) / path.relative_to(root)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)
    try:
        yield
    finally:
        added = sorted(
            {p for root in roots for p in root.rglob("*")} - set(before),
            key=lambda p: len(p.parts),
        )
        for path in added:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        for path, st in before.items():  # parents first: sorted by depth above
            if path.exists() or path.is_symlink():
                continue
            number = next(i for i, root in enumerate(roots) if path.is_relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                path.mkdir()
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(kept / str(number) / path.relative_to(roots[number]), path)
            else:
                continue
            os.chown(path, st.st_uid, st.st_gid)
            path.chmod(stat.S_IMODE(st.st_mode))
