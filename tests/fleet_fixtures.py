"""Session-wide sandbox fleet fixtures (owned by the fleet work).

``sandbox`` is one real fleet for the whole session: 3 PostgreSQL clusters with an sshd each and
6 customers (acme first). Tests that break it use ``sandbox_break``, which heals at teardown, so
the next test finds the fleet as ``up`` left it.
"""

from __future__ import annotations

import shutil
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
def sandbox_backups_kept(sandbox: dict[str, Any]) -> Iterator[None]:
    """Tests that take backups or restore-test them leave the session sandbox's backup
    directories as they found them: whatever they add is removed afterwards."""
    roots = [Path(s["backup_path"]) for s in sandbox["servers"]]
    before = {p for root in roots for p in root.rglob("*")}
    try:
        yield
    finally:
        added = sorted(
            {p for root in roots for p in root.rglob("*")} - before, key=lambda p: len(p.parts)
        )
        for path in added:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
