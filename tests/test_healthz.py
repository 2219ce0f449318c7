"""`GET /healthz` tells a load balancer whether to send traffic (the HTTP status) and a person
whether dbops can still reach them in Slack (``status`` and ``reasons``).

The app is built in-process against the strict Slack stub: a revoked bot token, an ops channel
the bot was never invited to, a dead Socket Mode connection and a post the notifier lost all
show as "degraded" with a reason; none of them is found by calling Slack while /healthz answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import bot.slack.health
from bot.runtime import Runtime
from bot.slack.health import NOTICED
from bot.web.asgi import build_asgi
from core.notify import Message, NotifyError
from storage.migrate import upgrade
from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, SlackStub

if TYPE_CHECKING:
    from starlette.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

FLEET = """
[[servers]]
name = "vps1"
host = "10.0.0.11"
dsn = "host=10.0.0.11 user=dbops_monitor dbname=postgres"

[oncall]
primary = "U_ALICE"
escalation_channel = "#db-escalations"
"""


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    NOTICED.clear()
    with SlackStub() as s:
        yield s
    NOTICED.clear()


def app_for(tmp_path: Path, stub: SlackStub, **settings: Any) -> Any:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'dbops.db'}",
        dbops_fleet=str(fleet),
        slack_bot_token=BOT_TOKEN,
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=stub.base_url,
        **settings,
    )
    upgrade(ctx.engine)
    return build_asgi(ctx)


def serving(app: Any) -> TestClient:
    """The app in-process, its lifespan (the checks at start) run on entering."""
    from starlette.testclient import TestClient  # imported here: it warns on import

    return TestClient(app)


def health(client: TestClient) -> dict[str, Any]:
    resp = client.get("/healthz")
    assert resp.status_code == 200  # degraded or not, this process serves
    body: dict[str, Any] = resp.json()
    return body


def test_all_fine_is_ok_and_checks_the_ops_and_escalation_channels(
    tmp_path: Path, stub: SlackStub
) -> None:
    with serving(app_for(tmp_path, stub)) as client:
        body = health(client)
    assert body["status"] == "ok" and body["reasons"] == [] and body["ok"] is True
    assert [c.kind for c in stub.find(lambda c: c.kind == "auth.test")] == ["auth.test"]
    looked_at = {c.body.get("channel") for c in stub.find(lambda c: c.kind == "conversations.info")}
    assert looked_at == {stub.channel_id("#db-ops"), stub.channel_id("#db-escalations")}
    assert stub.find(lambda c: c.kind.startswith("chat.")) == []  # checked without posting


def test_a_revoked_token_is_degraded_with_the_reason(tmp_path: Path, stub: SlackStub) -> None:
    stub.tokens.discard(BOT_TOKEN)
    stub.expect_refusals("invalid_auth")
    with serving(app_for(tmp_path, stub)) as client:
        body = health(client)
    assert body["status"] == "degraded"
    assert "SLACK_BOT_TOKEN refused by Slack: invalid_auth" in body["reasons"]


def test_a_private_ops_channel_without_the_bot_is_degraded(tmp_path: Path, stub: SlackStub) -> None:
    private = stub.add_channel("db-ops-private", private=True, member=False)
    with serving(app_for(tmp_path, stub, ops_channel=private)) as client:
        body = health(client)
    assert body["status"] == "degraded"
    assert body["reasons"] == [f"cannot post in {private}: not_in_channel"]


def test_a_private_ops_channel_named_but_not_visible_is_degraded(
    tmp_path: Path, stub: SlackStub
) -> None:
    """By name: Slack lists a private channel only to its members, so it is not found."""
    stub.add_channel("db-ops-private", private=True, member=False)
    with serving(app_for(tmp_path, stub, ops_channel="#db-ops-private")) as client:
        body = health(client)
    assert body["status"] == "degraded"
    assert body["reasons"][0].startswith("cannot post in #db-ops-private: channel_not_found")


def test_healthz_makes_no_slack_call_on_the_request_path(tmp_path: Path, stub: SlackStub) -> None:
    with serving(app_for(tmp_path, stub)) as client:
        health(client)
        before = len(stub.calls)
        for _ in range(20):
            assert health(client)["status"] == "ok"
        assert len(stub.calls) == before


def test_the_checks_refresh_in_the_background(
    tmp_path: Path, stub: SlackStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.slack.health, "REFRESH_S", 0.05)
    stub.expect_refusals("invalid_auth")
    revoked = "SLACK_BOT_TOKEN refused by Slack: invalid_auth"
    with serving(app_for(tmp_path, stub)) as client:
        assert health(client)["status"] == "ok"
        stub.tokens.discard(BOT_TOKEN)  # revoked while running
        assert revoked in eventually(client, lambda b: b["status"] == "degraded")["reasons"]
        stub.tokens.add(BOT_TOKEN)  # a new install's token
        assert eventually(client, lambda b: b["status"] == "ok")["reasons"] == []


def eventually(
    client: TestClient, pred: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = health(client)
        if pred(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def test_a_permanent_error_the_notifier_met_shows_until_a_later_send_works(
    tmp_path: Path, stub: SlackStub
) -> None:
    from bot.notifiers import SlackNotifier, web_client

    app = app_for(tmp_path, stub)
    notifier = SlackNotifier(
        web_client(
            Runtime.load(
                slack_bot_token=BOT_TOKEN, slack_api_url=stub.base_url, database_url="sqlite://"
            ).settings
        )
    )
    with serving(app) as client:
        stub.fail_next(1, "chat.postMessage", error="not_in_channel")
        with pytest.raises(NotifyError) as lost:
            notifier.post("#db-ops", Message("the morning report"))
        assert lost.value.permanent
        body = health(client)
        assert body["status"] == "degraded"
        assert body["reasons"] == ["cannot post in #db-ops: not_in_channel"]
        notifier.post("#db-ops", Message("the morning report, again"))
        assert health(client)["status"] == "ok"


def test_socket_mode_not_connected_is_degraded(tmp_path: Path, stub: SlackStub) -> None:
    """The stub offers no websocket: slack_sdk keeps trying, and /healthz says so meanwhile."""
    with serving(app_for(tmp_path, stub, slack_app_token="xapp-1-test-token")) as client:
        body = health(client)
    assert body["slack"] == "socket" and body["status"] == "degraded"
    assert "Socket Mode not connected to Slack" in body["reasons"]


def test_an_old_schema_is_still_503(tmp_path: Path, stub: SlackStub) -> None:
    ctx = Runtime.load(
        database_url=f"sqlite:///{tmp_path / 'empty.db'}",
        slack_bot_token=BOT_TOKEN,
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=stub.base_url,
    )
    with serving(build_asgi(ctx)) as client:
        resp = client.get("/healthz")
    assert resp.status_code == 503 and resp.json()["status"] == "down"
