"""The process's runtime under its old name, for callers not yet moved to ``bot.runtime``
(bench/startup.py). New code imports ``bot.runtime.Runtime``."""

from __future__ import annotations

from bot.runtime import Runtime as Context

__all__ = ["Context"]
