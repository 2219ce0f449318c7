"""Slack modals for commands that ask before they act (``Spec.form``: restore's typed name).

Slack's trigger_id is good for 3 seconds, and the form's content (a list of backups read over
SSH) usually takes a fraction of that but can take longer. So the form opens as it is when the
command answers in time (FORM_WAIT_S in bot.slack.background); otherwise a placeholder modal
opens with the trigger and is updated in place with the form, or with the error, when the
command answers.
Where no modal can open (an expired trigger), the command's reply goes out as a message
instead: it says how to do the same by typing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import MarkdownTextObject, SectionBlock
from slack_sdk.models.views import View
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.listeners.delivery import Destination
from bot.views.blocks import Reply, clip, escape
from core.notify import inert_payload

log = logging.getLogger("dbops.forms")
TITLE_MAX = 24
METADATA_MAX = 3000


def _modal(title: str, mrkdwn: str | None = None, reply: Reply | None = None) -> dict[str, Any]:
    body = (
        list(reply.blocks)
        if reply is not None and reply.blocks
        else [SectionBlock(text=MarkdownTextObject(text=clip(mrkdwn or "", 3000)))]
    )
    return View(
        type="modal",
        title=clip(title, TITLE_MAX),
        close="Close",
        blocks=body[:100],
    ).to_dict()


def with_destination(view: Mapping[str, Any], to: Destination) -> dict[str, Any]:
    """``view`` with where the result goes (channel, response_url) added to its metadata, which
    Slack hands back on submit. The response_url is a bearer capability: it goes to Slack and
    back, never into a log or the event log."""
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    meta.update({"channel": to.channel, "response_url": to.response_url})
    text = json.dumps(meta)
    if len(text) > METADATA_MAX:
        meta.pop("response_url")
        text = json.dumps(meta)
    return {**view, "private_metadata": text}


class Forms:
    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client

    async def open(self, trigger: str, title: str, doing: str) -> str | None:
        """A placeholder modal, opened while the trigger is fresh; its view id, or None."""
        return await self._open(trigger, _modal(title, f":hourglass_flowing_sand: {doing}"))

    async def open_form(self, trigger: str, reply: Reply, to: Destination) -> bool:
        """The form (``reply.view``) itself, opened while the trigger is fresh."""
        if reply.view is None:
            return False
        return await self._open(trigger, with_destination(reply.view, to)) is not None

    async def _open(self, trigger: str, view: dict[str, Any]) -> str | None:
        """views.open; the new view's id, or None when Slack refused (an expired trigger)."""
        try:
            result = await self.client.views_open(trigger_id=trigger, view=inert_payload(view))
        except SlackApiError as exc:
            log.warning("could not open a form: %s", exc.response.get("error"))
            return None
        except Exception as exc:
            log.warning("could not open a form: %s", type(exc).__name__)
            return None
        opened = result.get("view") or {}
        view_id = opened.get("id") if isinstance(opened, dict) else None
        return str(view_id) if view_id else None

    async def show(self, view_id: str, reply: Reply, to: Destination, title: str) -> bool:
        """The form (``reply.view``) in place of the placeholder, or the reply itself (an error,
        a refusal) in a modal the user closes."""
        if reply.view is not None:
            view = with_destination(reply.view, to)
        else:
            view = _modal(title, escape(reply.text), reply)
        try:
            result = await self.client.views_update(view_id=view_id, view=inert_payload(view))
        except Exception as exc:
            log.warning("could not show a form: %s", type(exc).__name__)
            return False
        return bool(result.get("ok"))
