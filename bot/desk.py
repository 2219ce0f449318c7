"""The runtime's two parts that are the bot's own rather than core's: the incident desk (where
an incident's card and thread go) and onboarding (provisioning and billing together).

bot/runtime.py builds them; the commands reach them as ``call.rt.desk`` and
``call.rt.onboarding``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.views.blocks import Reply
    from core.billing import Billing
    from core.incidents import Incidents
    from core.notify import MessageRef, Notifier
    from core.provisioning import Provisioner

log = logging.getLogger("dbops")


@dataclass
class Desk:
    """The incident desk: core's Incidents (with its pager) and where its card and thread go.
    With SLACK_BOT_TOKEN set the card is posted in OPS_CHANNEL; without it (the shell) the
    posts go nowhere and a command's own reply carries the card (``slack`` False)."""

    incidents: Incidents
    notifier: Notifier
    channel: str
    slack: bool

    def post(self, message: Reply, thread: MessageRef | None = None) -> MessageRef | None:
        """Post in OPS_CHANNEL (in ``thread`` when given); a failed post is logged, not fatal."""
        from core.notify import Message, NotifyError

        body = message.message()
        try:
            if thread is not None:
                return self.notifier.post(
                    thread.channel, Message(text=body["text"], blocks=body["blocks"]), thread.ts
                )
            return self.notifier.post(
                self.channel, Message(text=body["text"], blocks=body["blocks"])
            )
        except NotifyError as exc:
            log.warning("could not post to Slack: %s", exc.message)
            return None

    def update(self, ref: MessageRef, message: Reply) -> None:
        from core.notify import Message, NotifyError

        body = message.message()
        try:
            self.notifier.update(ref, Message(text=body["text"], blocks=body["blocks"]))
        except NotifyError as exc:
            log.warning("could not update the incident card: %s", exc.message)


@dataclass
class Onboarding:
    """A new customer's way in: the Provisioner (its failpoints are the tests' seam) and
    Billing (Stripe: onboarding proposals and SLA credits)."""

    provisioner: Provisioner
    billing: Billing
