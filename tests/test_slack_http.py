"""`dbops serve` over real HTTP: a uvicorn subprocess, signed requests, our Slack stub.

Alice (an operator) types `/db status acme` in #db-ops; the app acks at once and the reply
arrives on her response_url. Forged and stale requests are refused with 401 and run nothing; a
retried delivery is acked and dropped; a 429 from Slack is waited out and retried.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.customers import customer_from_mapping, upsert_customers
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.slack_stub import (
    BOT_TOKEN,
    DROP,
    SIGNING_SECRET,
    SlackStub,
    action_body,
    sign,
    slash_body,
)

ALICE, BOB = "U_ALICE", "U_BOB"  # alice the operator, bob the viewer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s


@pytest.fixture(scope="module")
def db_url(sandbox: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('http') / 'dbops.db'}"
    engine = make_engine(url)
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def events(db_url: str) -> EventLog:
    return EventLog(make_engine(db_url))


@contextlib.contextmanager
def serving(cwd: Path, **settings: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`dbops serve` in a subprocess, run in ``cwd`` (its log: cwd/serve.log) with these
    settings over an environment holding none of dbops's own (a .env in ``cwd`` still counts);
    yields its base URL once /healthz answers, and the process."""
    from core.settings import Settings

    port = free_port()
    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("SLACK_")}
    env.update(settings)
    log = open(cwd / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((cwd / "serve.log").read_text())
            time.sleep(0.05)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def server(
    sandbox: dict[str, Any], stub: SlackStub, db_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`dbops serve` in a subprocess; yields its base URL once /healthz answers."""
    with serving(
        tmp_path_factory.mktemp("serve"),  # no stray .env
        DATABASE_URL=db_url,
        DBOPS_FLEET=sandbox["fleet"],
        SLACK_BOT_TOKEN=BOT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=stub.base_url,
        DBOPS_OPERATORS=ALICE,
        DBOPS_ADMINS="U_CAROL",
        DBOPS_LOG_LEVEL="WARNING",
    ) as (base, _):
        yield base


def post(
    base: str, body: str, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = httpx.post(
        f"{base}/slack/events", content=body, headers=headers or sign(body), timeout=5
    )
    return resp, time.monotonic() - started


def wait_events(events: EventLog, kind: str, pred: Any, timeout: float = 10) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events.query(kind=kind, limit=10_000) if pred(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_healthz_reports_schema(server: str) -> None:
    resp = httpx.get(f"{server}/healthz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["ok"] is True and body["schema"]["ok"] is True and body["slack"] == "http"


def test_status_acks_at_once_replies_on_response_url_and_drops_a_retry(
    server: str, stub: SlackStub, events: EventLog
) -> None:
    token = uuid.uuid4().hex
    body = slash_body("status acme", user=ALICE, response_url=stub.response_url(token))
    resp, took = post(server, body)
    assert resp.status_code == 200
    assert took < 1.0, f"ack took {took:.2f}s"

    reply = stub.wait_for(lambda c: c.path == f"/response/{token}", timeout=15)
    assert reply.body["response_type"] == "in_channel"
    assert "acme" in reply.body["text"] and "vps1" in reply.body["text"]
    assert any(b["type"] == "actions" for b in reply.body["blocks"])

    # Slack's retry: the same body, a fresh timestamp and signature, X-Slack-Retry-Num.
    retry_headers = {**sign(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    resp, _ = post(server, body, retry_headers)
    assert resp.status_code == 200
    trigger = dict(x.split("=", 1) for x in body.split("&"))["trigger_id"]
    dropped = wait_events(events, "delivery.repeated", lambda e: trigger in e.payload["delivery"])
    assert len(dropped) == 1
    assert len(stub.replies_to(token)) == 1
    commands = events.query(kind="command", limit=10_000)
    assert sum(1 for e in commands if e.source_id and trigger in e.source_id) == 1


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(
            lambda body: {**sign(body), "X-Slack-Signature": "v0=" + "0" * 64}, id="forged"
        ),
        pytest.param(lambda body: sign(body, ts=int(time.time()) - 6 * 60), id="six-minutes-old"),
        pytest.param(lambda body: sign(body, secret="not-our-secret"), id="wrong-secret"),
    ],
)
def test_unsigned_requests_get_401_and_run_nothing(
    server: str, stub: SlackStub, events: EventLog, headers: Any
) -> None:
    token = uuid.uuid4().hex
    body = slash_body("status acme", user=ALICE, response_url=stub.response_url(token))
    resp, _ = post(server, body, headers(body))
    assert resp.status_code == 401
    # A good request sent after it has its answer; the bad one still has none, and no event.
    probe = uuid.uuid4().hex
    post(server, slash_body("help", response_url=stub.response_url(probe)))
    stub.wait_for(lambda c: c.path == f"/response/{probe}")
    assert stub.replies_to(token) == []
    trigger = dict(x.split("=", 1) for x in body.split("&"))["trigger_id"]
    assert not [e for e in events.query(limit=10_000) if e.source_id and trigger in e.source_id]


HOSTILE = [
    "status acme; rm -rf /",
    "status $(reboot)",
    "status `id`",
    "status acme|nc",
    "status ../../etc/passwd",
    "status 'acme' --help",
    "status ünïcødé_ñame",
    "status <!channel>",
    "status " + "x" * 10_240,
    "log inc-99999999999",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_text_gets_a_clear_reply_and_runs_nothing(
    server: str, stub: SlackStub, events: EventLog, text: str
) -> None:
    before = len(events.query(kind="remote.command", limit=100_000))
    token = uuid.uuid4().hex
    resp, took = post(server, slash_body(text, user=BOB, response_url=stub.response_url(token)))
    assert resp.status_code == 200 and took < 1.0
    reply = stub.wait_for(lambda c: c.path == f"/response/{token}")
    assert reply.body["response_type"] == "ephemeral"
    shown = reply.body["text"]
    assert any(
        phrase in shown
        for phrase in ("not a valid", "Too many", "characters", "no option", "incident id")
    ), shown
    assert len(shown) < 1000 and "<!channel>" not in json.dumps(reply.body)
    assert len(events.query(kind="remote.command", limit=100_000)) == before


def test_a_button_press_runs_its_command(server: str, stub: SlackStub) -> None:
    token = uuid.uuid4().hex
    body = action_body("db_log", "log acme", user=BOB, response_url=stub.response_url(token))
    resp, took = post(server, body)
    assert resp.status_code == 200 and took < 1.0
    reply = stub.wait_for(lambda c: c.path == f"/response/{token}")
    assert "Log of acme" in reply.body["text"]


def test_a_button_whose_value_is_another_command_is_refused(server: str, stub: SlackStub) -> None:
    token = uuid.uuid4().hex
    body = action_body("db_log", "report", user=BOB, response_url=stub.response_url(token))
    assert post(server, body)[0].status_code == 200
    reply = stub.wait_for(lambda c: c.path == f"/response/{token}")
    assert "does not match" in reply.body["text"]


def test_429_on_response_url_is_retried_after_retry_after(server: str, stub: SlackStub) -> None:
    token = uuid.uuid4().hex
    stub.fail_next(1, f"/response/{token}", retry_after=1)
    post(server, slash_body("help", response_url=stub.response_url(token)))
    ok = stub.wait_for(lambda c: c.path == f"/response/{token}" and c.status == 200, timeout=15)
    (limited,) = stub.find(lambda c: c.path == f"/response/{token}" and c.status == 429)
    assert ok.at - limited.at >= 0.9
    assert "what I can do" in ok.body["text"]


def test_a_dropped_connection_to_response_url_is_retried(server: str, stub: SlackStub) -> None:
    token = uuid.uuid4().hex
    stub.fail_next(1, f"/response/{token}", status=DROP)
    post(server, slash_body("help", response_url=stub.response_url(token)))
    ok = stub.wait_for(lambda c: c.path == f"/response/{token}" and c.status == 200, timeout=15)
    assert stub.find(lambda c: c.path == f"/response/{token}" and c.status == DROP)
    assert "what I can do" in ok.body["text"]


def test_429_on_chat_post_message_is_retried(server: str, stub: SlackStub) -> None:
    # No response_url (as from some surfaces): the reply goes out with chat.postMessage.
    channel = "C" + uuid.uuid4().hex[:10].upper()
    stub.fail_next(1, "chat.postMessage", retry_after=1)
    post(server, slash_body("status acme", user=ALICE, channel=channel))
    ok = stub.wait_for(
        lambda c: (
            c.kind == "chat.postMessage" and c.status == 200 and c.body.get("channel") == channel
        ),
        timeout=20,
    )
    limited = stub.find(lambda c: c.kind == "chat.postMessage" and c.status == 429)
    assert limited and ok.at - limited[-1].at >= 0.9
    assert "acme" in ok.body["text"]
    assert ok.headers["authorization"] == f"Bearer {BOT_TOKEN}"


# --- in-process: the app's edges ----------------------------------------------------------------


def _ctx(tmp_path: Any, stub: SlackStub, **settings: Any) -> Any:
    from bot.runtime import Runtime

    values = {
        "database_url": f"sqlite:///{tmp_path / 'dbops.db'}",
        "slack_bot_token": BOT_TOKEN,
        "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": stub.base_url,
        **settings,
    }
    return Runtime.load(**values)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_healthz_is_503_on_an_old_schema_and_serve_needs_a_signing_secret(
    tmp_path: Any, stub: SlackStub
) -> None:
    from starlette.testclient import TestClient

    from bot.web.asgi import build_asgi
    from core.errors import DbopsError

    with TestClient(build_asgi(_ctx(tmp_path, stub))) as client:  # an empty database
        resp = client.get("/healthz")
    assert resp.status_code == 503
    assert resp.json()["ok"] is False and resp.json()["schema"]["current"] is None
    with pytest.raises(DbopsError, match="SLACK_SIGNING_SECRET"):
        build_asgi(_ctx(tmp_path, stub, slack_signing_secret=None))


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_socket_mode_when_an_app_token_is_set(tmp_path: Any, stub: SlackStub) -> None:
    """No /slack/events then; Socket Mode opens its connection through SLACK_API_URL with the
    app token, in the background (the stub offers no websocket: slack_sdk keeps retrying),
    while /healthz answers."""
    from starlette.testclient import TestClient

    from bot.web.asgi import build_asgi
    from storage.migrate import upgrade

    ctx = _ctx(tmp_path, stub, slack_app_token="xapp-1-test-token")
    upgrade(ctx.engine)
    app = build_asgi(ctx)
    assert [r.path for r in app.routes] == ["/healthz"]  # type: ignore[attr-defined]
    with TestClient(app) as client:
        assert client.get("/healthz").json()["slack"] == "socket"
        opened = stub.wait_for(lambda c: c.kind == "apps.connections.open")
        assert client.post("/slack/events").status_code == 404
    assert opened.headers["authorization"] == "Bearer xapp-1-test-token"


def test_an_unexpected_error_shows_only_a_correlation_id(
    tmp_path: Any, stub: SlackStub, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from slack_bolt.request.async_request import AsyncBoltRequest

    from bot.commands.catalog import build_registry
    from bot.commands.roles import Roles
    from bot.commands.router import Router, Spec
    from bot.slack.app import create_app
    from bot.slack.background import build_services
    from storage.migrate import upgrade

    def boom(call: Any) -> Any:
        raise RuntimeError("connect to postgresql://dbops:hunter2@10.0.0.5/prod failed")

    registry = build_registry()
    registry.add(Spec("boom", "fails", boom))
    ctx = _ctx(tmp_path, stub)
    upgrade(ctx.engine)
    router = Router(ctx, roles=Roles(), registry=registry)
    body = slash_body("boom", response_url=stub.response_url("boom"))

    async def scenario() -> int:
        services = build_services(ctx, router=router)
        app = create_app(services)
        resp = await app.async_dispatch(AsyncBoltRequest(body=body, headers=sign(body)))
        await services.aclose()
        return resp.status

    assert asyncio.run(scenario()) == 200
    (reply,) = stub.replies_to("boom")
    text = json.dumps(reply.body)
    assert "hunter2" not in text and "10.0.0.5" not in text and "Traceback" not in text
    cid = text.split("reference ")[1][:8]
    logged = [r for r in caplog.records if cid in r.getMessage()]
    assert logged and logged[0].exc_info is not None


def test_the_work_after_an_ack_waits_for_a_burst_of_acks_to_pass() -> None:
    import asyncio

    from bot.slack.background import Quiet

    async def scenario() -> tuple[float, float]:
        quiet = Quiet(quiet_s=0.05, max_defer_s=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with quiet.busy():  # a request being acked
            waiter = asyncio.create_task(quiet.wait())
            await asyncio.sleep(0.1)
            assert not waiter.done()
        await waiter  # starts quiet_s after the last request
        after_burst = loop.time() - started
        started = loop.time()
        with quiet.busy():  # requests that never stop: the work goes ahead after max_defer_s
            await quiet.wait()
        return after_burst, loop.time() - started

    after_burst, under_load = asyncio.run(scenario())
    assert 0.15 <= after_burst < 0.3
    assert 0.3 <= under_load < 0.5
