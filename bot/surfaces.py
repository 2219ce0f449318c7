"""The modules that add commands to the router (each registers its Specs on import).

The foundation's commands live in bot/router.py; each later capability adds its own here.
"""

from __future__ import annotations

from bot import (
    backup_commands,
    incident_commands,
    provision_commands,
    restart_commands,
    restore_commands,
    scheduler_commands,
)

SURFACES = [
    scheduler_commands,
    incident_commands,
    backup_commands,
    restore_commands,
    provision_commands,
    restart_commands,
]
