"""One object per database engine in this process, built on first use.

The incident desk (bot/incident_commands.py) and the onboarding desk (bot/provision_commands.py)
hold what is costly or stateful around one engine (a notifier, the core objects, a test's
failpoints); every handler for that engine gets the same one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy import Engine

T = TypeVar("T")


class PerEngine(Generic[T]):
    def __init__(self) -> None:
        self._made: dict[Engine, T] = {}
        self._lock = threading.Lock()

    def get(self, engine: Engine, build: Callable[[], T]) -> T:
        with self._lock:
            made = self._made.get(engine)
            if made is None:
                made = self._made[engine] = build()
            return made

    def clear(self) -> None:
        """Forget them all (tests that change the settings between cases)."""
        with self._lock:
            self._made.clear()
