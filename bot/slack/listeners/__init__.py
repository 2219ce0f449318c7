"""Slack listeners, one module per surface; each registers itself on the app.

``register`` returns (and keeps on the services) what it registered, slash commands, action ids
and bot events, so tests can hold the app to manifest.yml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.slack.listeners import actions, checklists, commands, errors, messages, views

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bot.slack.background import Services


def register(app: AsyncApp, services: Services) -> dict[str, list[str]]:
    registered = {
        "commands": commands.register(app, services),
        "actions": actions.register(app, services),
        # Inputs that are not command buttons: a checklist's checkboxes, the restore form.
        "inputs": checklists.register(app, services),
        "forms": views.register(app, services),
        # Messages typed to the bot in its DM, run as command lines.
        "events": messages.register(app, services),
    }
    errors.register(app, services)
    services.registered = registered
    return registered
