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
