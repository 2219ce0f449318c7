"""Every /db command, in the order `/db help` lists them: ``build_registry()``.

Each commands module has its ``SPECS`` (and, when its arguments need a kind the foundation does
not validate, its ``KINDS``); nothing registers itself on import. The runtime builds the
registry once (``rt.registry``); tests build their own the same way.

The order is the one `/db help` has always shown: the foundation's reads first (what most
people type), then each capability as a block: backups, incidents and on-call, onboarding
(provision, SLA credits), restart, restore, checklists and jobs, maintenance windows. A new
command goes in its capability's block; a new capability goes at the end.
tests/test_router.py holds the order.
"""

from __future__ import annotations

from bot.commands import (
    backups,
    checklists,
    incidents,
    maintenance,
    provision,
    restart,
    restore,
    router,
)
from bot.commands.router import Kind, Registry, Spec

# (the commands, the kinds of argument they add), in help order.
CAPABILITIES: list[tuple[list[Spec], dict[str, Kind]]] = [
    (router.SPECS, dict(router.KINDS)),  # help, status, report, servers, log
    (backups.SPECS, {}),  # backups, backup
    (incidents.SPECS, dict(incidents.KINDS)),  # incident ..., oncall [set]
    (provision.SPECS, dict(provision.KINDS)),  # provision, credit apply
    (restart.SPECS, {}),  # restart
    (restore.SPECS, dict(restore.KINDS)),  # restore
    (checklists.SPECS, {}),  # checklist, jobs
    (maintenance.SPECS, dict(maintenance.KINDS)),  # maintenance [schedule|list|end]
]


def build_registry() -> Registry:
    """A new registry with every capability's commands and argument kinds."""
    kinds: dict[str, Kind] = {}
    for _, more in CAPABILITIES:
        clash = sorted(set(kinds) & set(more))
        if clash:
            raise ValueError(f"argument kinds defined twice: {clash}")
        kinds.update(more)
    return Registry([spec for specs, _ in CAPABILITIES for spec in specs], kinds=kinds)
