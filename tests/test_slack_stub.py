"""The Slack stub says no where Slack says no, the way Slack says it.

Every test that sends to Slack sends to tests/slack_stub.py, so its strictness is what stands
between a message real Slack would refuse and a green suite. Here it is held to Slack's
documented behaviour, one rule at a time, through slack_sdk's own client (as dbops calls it)
and dbops's notifier (which must turn each refusal into the right NotifyError).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.notifiers import SlackNotifier
from core.notify import Message, MessageRef, NotifyError
from tests.slack_stub import (
    BOT_TOKEN,
    RESPONSE_URL_TTL_S,
    RESPONSE_URL_USES,
    TRIGGER_TTL_S,
    SlackStub,
)

SECTION = {"type": "section", "text": {"type": "mrkdwn", "text": "hello"}}
VIEW = {"type": "modal", "title": {"type": "plain_text", "text": "Restore"}, "blocks": [SECTION]}


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s
        s.expect_refusals(*{c.error or "" for c in s.refused()})  # these tests refuse on purpose


@pytest.fixture
def client(stub: SlackStub) -> WebClient:
    return WebClient(token=BOT_TOKEN, base_url=stub.base_url)


def error_of(call: Any) -> str:
    with pytest.raises(SlackApiError) as refused:
        call()
    return str(refused.value.response["error"])


def test_unknown_methods_and_tokens_are_refused(stub: SlackStub, client: WebClient) -> None:
    assert error_of(lambda: client.api_call("chat.postMessagee", json={})) == "unknown_method"
    assert client.auth_test()["user_id"]
    assert error_of(lambda: WebClient(base_url=stub.base_url).auth_test()) == "not_authed"
    revoked = WebClient(token="xoxb-revoked", base_url=stub.base_url)
    assert error_of(revoked.auth_test) == "invalid_auth"
    app_token = WebClient(token="xapp-1-x", base_url=stub.base_url)
    assert error_of(lambda: app_token.chat_postMessage(channel="C1", text="x")) == (
        "not_allowed_token_type"
    )


@pytest.mark.filterwarnings("ignore:The top-level `text` argument is missing")
def test_names_are_for_posting_and_ids_for_updating(stub: SlackStub, client: WebClient) -> None:
    posted = client.chat_postMessage(channel="#db-ops", text="hello")
    channel, ts = posted["channel"], posted["ts"]
    assert channel == stub.channel_id("#db-ops") == stub.channel_id("db-ops")
    assert channel.startswith("C") and channel != "#db-ops"
    # chat.update takes the id Slack answered, never the name.
    assert client.chat_update(channel=channel, ts=ts, text="changed")["ok"]
    refused = error_of(lambda: client.chat_update(channel="#db-ops", ts=ts, text="changed"))
    assert refused == "channel_not_found"
    missing = error_of(lambda: client.chat_update(channel=channel, ts="1.000001", text="x"))
    assert missing == "message_not_found"
    assert error_of(lambda: client.chat_postMessage(channel="", text="x")) == "channel_not_found"
    assert error_of(lambda: client.chat_postMessage(channel="C1234", text=" ")) == "no_text"


def test_a_dm_is_a_d_channel(stub: SlackStub, client: WebClient) -> None:
    opened = client.conversations_open(users="U_ALICE")["channel"]["id"]
    assert opened.startswith("D") and opened == stub.dm_channel("U_ALICE")
    notifier = SlackNotifier(client)
    ref = notifier.dm("U_ALICE", Message("paged"))
    assert ref.channel == opened
    notifier.update(ref, Message("settled"))  # the DM's id works for chat.update


def test_blocks_slack_refuses_are_refused_with_the_reason(
    stub: SlackStub, client: WebClient
) -> None:
    button = {"type": "button", "text": {"type": "plain_text", "text": "Ack"}, "action_id": "a"}
    twice = [{"type": "actions", "elements": [button, {**button, "value": "2"}]}]
    with pytest.raises(SlackApiError) as refused:
        client.chat_postMessage(channel="C1234", text="x", blocks=twice)
    answer = refused.value.response
    assert answer["error"] == "invalid_blocks"
    (why,) = answer["response_metadata"]["messages"]
    assert "action_id 'a' already exists" in why and "/blocks/0/elements/1/action_id" in why
    long = [{**SECTION, "text": {"type": "mrkdwn", "text": "x" * 2900}}] * 5
    assert error_of(lambda: client.chat_postMessage(channel="C1", text="x", blocks=long)) == (
        "msg_blocks_too_long"
    )
    assert error_of(lambda: client.chat_postMessage(channel="C1", text="x" * 40_001)) == (
        "msg_too_long"
    )
    # The notifier says so, and that retrying cannot help.
    with pytest.raises(NotifyError) as failed:
        SlackNotifier(client).post("C1234", Message("x", blocks=twice))
    assert failed.value.permanent and "invalid_blocks" in failed.value.message


def test_a_trigger_is_good_once_for_three_seconds(stub: SlackStub, client: WebClient) -> None:
    fresh = stub.trigger()
    assert client.views_open(trigger_id=fresh, view=VIEW)["view"]["id"]
    assert error_of(lambda: client.views_open(trigger_id=fresh, view=VIEW)) == (
        "exchanged_trigger_id"
    )
    stale = stub.trigger(age_s=TRIGGER_TTL_S + 0.5)
    assert error_of(lambda: client.views_open(trigger_id=stale, view=VIEW)) == (
        "expired_trigger_id"
    )
    aging = stub.trigger()
    stub.advance(TRIGGER_TTL_S + 0.1)
    assert error_of(lambda: client.views_open(trigger_id=aging, view=VIEW)) == (
        "expired_trigger_id"
    )
    assert error_of(lambda: client.views_open(trigger_id="123.456", view=VIEW)) == (
        "invalid_trigger_id"
    )
    too_long = {**VIEW, "title": {"type": "plain_text", "text": "Restore a customer's database"}}
    assert error_of(lambda: client.views_open(trigger_id=stub.trigger(), view=too_long)) == (
        "invalid_arguments"
    )
    assert error_of(lambda: client.views_update(view_id="VNOPE", view=VIEW)) == "not_found"


def test_a_response_url_is_good_five_times_for_thirty_minutes(stub: SlackStub) -> None:
    url = stub.response_url()
    said = [httpx.post(url, json={"text": "hi"}) for _ in range(RESPONSE_URL_USES + 1)]
    assert [r.status_code for r in said] == [200] * RESPONSE_URL_USES + [404]
    assert said[-1].text == "used_url"
    later = stub.response_url()
    stub.advance(RESPONSE_URL_TTL_S + 1)
    expired = httpx.post(later, json={"text": "hi"})
    assert (expired.status_code, expired.text) == (404, "expired_url")
    unknown = stub.response_url().rsplit("/", 1)[0] + "/never-issued"
    assert httpx.post(unknown, json={"text": "hi"}).status_code == 404
    bad = httpx.post(stub.response_url(), json={"text": "x", "blocks": [SECTION] * 51})
    assert (bad.status_code, bad.text) == (400, "invalid_blocks")


def test_slacks_errors_can_be_injected(stub: SlackStub, client: WebClient) -> None:
    for error in ("channel_not_found", "not_in_channel", "invalid_auth", "msg_too_long"):
        stub.fail_next(1, "chat.postMessage", error=error)
        with pytest.raises(SlackApiError) as refused:
            client.chat_postMessage(channel="C1234", text="x")
        assert refused.value.response.status_code == 200
        assert refused.value.response["error"] == error
    stub.fail_next(1, "chat.postMessage", retry_after=7)
    with pytest.raises(SlackApiError) as limited:
        client.chat_postMessage(channel="C1234", text="x")
    assert limited.value.response.status_code == 429
    headers = {k.lower(): v for k, v in limited.value.response.headers.items()}
    assert headers["retry-after"] in ("7", ["7"])
    assert limited.value.response["error"] == "ratelimited"
    injected = stub.find(lambda c: c.injected)
    assert len(injected) == 5 and stub.refused() == []  # injected failures are not Slack's no


def test_a_refusal_nobody_expected_fails_the_test() -> None:
    with SlackStub() as stub:
        client = WebClient(token=BOT_TOKEN, base_url=stub.base_url)
        assert error_of(lambda: client.api_call("chat.nope", json={})) == "unknown_method"
        with pytest.raises(AssertionError, match=r"refused 1 call.*unknown_method"):
            stub.check()
        stub.expect_refusals("unknown_method")
    stub.check()


def test_the_checklist_test_pattern_updates_an_existing_message(stub: SlackStub) -> None:
    ts = stub.existing("C0DBOPS")
    notifier = SlackNotifier(WebClient(token=BOT_TOKEN, base_url=stub.base_url))
    notifier.update(MessageRef("C0DBOPS", ts), Message("ticked"))
    (update,) = stub.find(lambda c: c.kind == "chat.update")
    assert update.ok
