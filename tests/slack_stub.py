"""A small Slack Web API stub of our own, on 127.0.0.1 and a free port, for offline tests.

It answers ``/api/<method>`` (auth.test, chat.postMessage, chat.update, chat.postEphemeral,
views.open, anything else with ok) and ``/response/<token>`` (response_url posts), records every
call, can answer the next N matching calls with 429 + Retry-After, and lets a test wait for a
call with a deadline instead of sleeping. The pattern is bolt-python's mock_web_api_server.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

DROP = 0  # a "status" for fail_next: close the connection without answering
BOT_USER = "U0DBOPSBOT"
TEAM = "T0DBOPS"


@dataclass
class Call:
    kind: str  # the Web API method ("chat.postMessage") or "response"
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    at: float = field(default_factory=time.monotonic)

    @property
    def text(self) -> str:
        """Everything a person would read: the fallback text and every block, as JSON."""
        blocks = self.body.get("blocks")
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        return str(self.body.get("text", "")) + "\n" + json.dumps(blocks or [], ensure_ascii=False)


@dataclass
class _Failure:
    match: str
    remaining: int
    status: int
    retry_after: int | None


class SlackStub:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._failures: list[_Failure] = []
        self._cond = threading.Condition()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                stub._handle(self)

            def do_GET(self) -> None:
                stub._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- set-up ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self, token: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port}/response/{token or uuid.uuid4().hex}"

    def start(self) -> SlackStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SlackStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(
        self, n: int, match: str = "", *, status: int = 429, retry_after: int | None = 1
    ) -> None:
        """Answer the next ``n`` calls whose path contains ``match`` with ``status`` (DROP: close
        the connection with no answer)."""
        with self._cond:
            self._failures.append(_Failure(match, n, status, retry_after))

    def reset(self) -> None:
        with self._cond:
            self.calls.clear()
            self._failures.clear()

    # -- reading -----------------------------------------------------------------------------

    def find(self, predicate: Callable[[Call], bool]) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if predicate(c)]

    def wait_for(self, predicate: Callable[[Call], bool], timeout: float = 10.0) -> Call:
        """The first recorded call matching ``predicate``, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for call in self.calls:
                    if predicate(call):
                        return call
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [c.kind for c in self.calls]
                    raise AssertionError(f"no matching call within {timeout}s; got {kinds}")
                self._cond.wait(left)

    def replies_to(self, token: str) -> list[Call]:
        return self.find(lambda c: c.path == f"/response/{token}" and c.status == 200)

    @contextmanager
    def quiet_for(self, token: str) -> Iterator[None]:
        """Asserts after the block that nothing was posted to the response_url ``token``."""
        yield
        assert self.replies_to(token) == []

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        ctype = req.headers.get("Content-Type", "")
        body: dict[str, Any]
        body = json.loads(raw or b"{}") if "json" in ctype else dict(parse_qsl(raw.decode("utf-8")))
        path = req.path.split("?")[0]
        if path == "/_stub/stats":  # for a benchmark in another process: counts, unrecorded
            self._send(req, 200, self.stats(), {})
            return
        kind = "response" if path.startswith("/response/") else path.removeprefix("/api/")
        status, payload, headers = self._answer(path, kind, body)
        call = Call(kind, path, {k.lower(): v for k, v in req.headers.items()}, body, status)
        if status == DROP:  # hang up without an answer, as a dropped connection does
            req.close_connection = True
        else:
            self._send(req, status, payload, headers)
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def _send(
        self, req: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str]
    ) -> None:
        data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        req.send_response(status)
        req.send_header("Content-Type", "application/json; charset=utf-8")
        req.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(data)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            replies = [c for c in self.calls if c.kind == "response" and c.status == 200]
            return {
                "calls": len(self.calls),
                "responses": len(replies),
                "last_at": max((c.at for c in replies), default=None),
            }

    def _answer(
        self, path: str, kind: str, body: dict[str, Any]
    ) -> tuple[int, Any, dict[str, str]]:
        with self._cond:
            for rule in self._failures:
                if rule.remaining > 0 and rule.match in path:
                    rule.remaining -= 1
                    headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after else {}
                    return rule.status, {"ok": False, "error": "ratelimited"}, headers
        if kind == "response":
            return 200, b"ok", {}
        if kind == "auth.test":
            return (
                200,
                {
                    "ok": True,
                    "url": "https://dbops-test.slack.com/",
                    "team": "dbops test",
                    "user": "dbops",
                    "team_id": TEAM,
                    "user_id": BOT_USER,
                    "bot_id": "B0DBOPSBOT",
                },
                {},
            )
        if kind == "apps.connections.open":  # Socket Mode: a URL that is no websocket here
            return 200, {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket-mode"}, {}
        if kind in ("chat.postMessage", "chat.update", "chat.postEphemeral"):
            ts = f"{time.time():.6f}"
            return 200, {"ok": True, "channel": body.get("channel"), "ts": ts}, {}
        if kind in ("views.open", "views.update", "views.push"):
            view = body.get("view")
            view = json.loads(view) if isinstance(view, str) else dict(view or {})
            view_id = body.get("view_id") or f"V{uuid.uuid4().hex[:10].upper()}"
            return 200, {"ok": True, "view": {**view, "id": view_id, "hash": uuid.uuid4().hex}}, {}
        return 200, {"ok": True}, {}


# --- requests as Slack sends them ---------------------------------------------------------------

SIGNING_SECRET = "test-signing-secret-0123456789abcdef"
BOT_TOKEN = "xoxb-test-0000-dbops"


def sign(body: str, *, secret: str = SIGNING_SECRET, ts: int | None = None) -> dict[str, str]:
    """The headers Slack adds: a v0 signature over ``v0:<timestamp>:<body>``."""
    import hashlib
    import hmac

    stamp = str(int(time.time()) if ts is None else ts)
    digest = hmac.new(secret.encode(), f"v0:{stamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": "application/x-www-form-urlencoded",
    }


def slash_body(
    text: str,
    *,
    user: str = "U_ALICE",
    response_url: str | None = None,
    trigger_id: str | None = None,
    channel: str = "C0DBOPS",
) -> str:
    from urllib.parse import urlencode

    fields = {
        "token": "legacy-verification-token",
        "team_id": TEAM,
        "team_domain": "dbops-test",
        "channel_id": channel,
        "channel_name": "db-ops",
        "user_id": user,
        "user_name": user.lower(),
        "command": "/db",
        "text": text,
        "api_app_id": "A0DBOPS",
        "trigger_id": trigger_id or f"{uuid.uuid4().int % 10**13}.{uuid.uuid4().hex[:12]}",
    }
    if response_url is not None:
        fields["response_url"] = response_url
    return urlencode(fields)


def view_submission_body(
    view: dict[str, Any],
    values: dict[str, dict[str, dict[str, Any]]],
    *,
    user: str = "U_ALICE",
    view_id: str | None = None,
) -> str:
    """A modal's submit as Slack sends it: the view we opened, with the state typed into it."""
    from urllib.parse import urlencode

    payload = {
        "type": "view_submission",
        "team": {"id": TEAM, "domain": "dbops-test"},
        "user": {"id": user, "username": user.lower(), "team_id": TEAM},
        "api_app_id": "A0DBOPS",
        "token": "legacy-verification-token",
        "trigger_id": f"{uuid.uuid4().int % 10**13}.{uuid.uuid4().hex[:12]}",
        "view": {
            **view,
            "id": view_id or view.get("id") or f"V{uuid.uuid4().hex[:10].upper()}",
            "team_id": TEAM,
            "state": {"values": values},
        },
        "response_urls": [],
    }
    return urlencode({"payload": json.dumps(payload)})


def action_body(
    action_id: str,
    value: str,
    *,
    user: str = "U_ALICE",
    response_url: str | None = None,
    channel: str = "C0DBOPS",
) -> str:
    from urllib.parse import urlencode

    payload = {
        "type": "block_actions",
        "team": {"id": TEAM, "domain": "dbops-test"},
        "user": {"id": user, "username": user.lower(), "team_id": TEAM},
        "api_app_id": "A0DBOPS",
        "token": "legacy-verification-token",
        "trigger_id": f"{uuid.uuid4().int % 10**13}.{uuid.uuid4().hex[:12]}",
        "channel": {"id": channel, "name": "db-ops"},
        "container": {"type": "message", "message_ts": "1.000001", "channel_id": channel},
        "response_url": response_url,
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "b1",
                "value": value,
                "text": {"type": "plain_text", "text": "x"},
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)})
