"""A Slack Web API stub as strict as Slack, on 127.0.0.1 and a free port, for offline tests.

Every test that sends to Slack sends here, and what Slack would refuse is refused here, with
Slack's own answer (HTTP 200, ``ok: false`` and the error code; the reasons in
``response_metadata.messages``), so a message that real Slack would drop cannot pass a test:

- Web API methods (``/api/<method>``): auth.test, apps.connections.open, chat.postMessage,
  chat.update, chat.postEphemeral, chat.delete, conversations.open, conversations.info,
  conversations.list, conversations.history, conversations.replies, views.open, views.update,
  views.push, views.publish; anything else is ``unknown_method``. A bot token is needed
  (``not_authed``, ``invalid_auth``; Socket Mode's app token for apps.connections.open only).
- Messages and views go through ``bot.slack.rules`` (the checker the Block Kit tests use):
  ``invalid_blocks``, ``msg_too_long``, ``msg_blocks_too_long``, ``no_text``, and
  ``invalid_arguments`` for a view.
- Channels: names ("#db-ops") are taken by chat.postMessage and answered with the channel's id;
  conversations.info (ids only) and conversations.list describe the workspace's channels
  (``add_channel``: private or not, the bot a member or not; any other id is a public channel
  the bot is in, and a few names exist from the start, ``CHANNELS``);
  a user id posts to that user's DM. chat.update and chat.delete take ids only
  (``channel_not_found``) and a message that was posted (``message_not_found``);
  conversations.open answers a ``D...`` id.
- ``response_url`` (``/response/<token>``, made by ``response_url()``): five uses within 30
  minutes, then HTTP 404 ``used_url`` / ``expired_url``; a bad message is HTTP 400 with the error.
- ``trigger_id`` (made by ``issue_trigger()``, which slash_body/action_body use, or
  ``SlackStub.trigger()``): views.open/views.push take it once, within 3 seconds
  (``expired_trigger_id``, ``exchanged_trigger_id``, ``invalid_trigger_id``).
- ``fail_next`` injects Slack's failures: 429 ``ratelimited`` with Retry-After (the default), a
  dropped connection (``DROP``), or any error code with HTTP 200 (``channel_not_found``,
  ``not_in_channel``, ``invalid_auth``, ``msg_too_long``, ``invalid_blocks``...);
  ``rate_limit(seconds)`` answers 429 with the Retry-After left until that much stub time has
  passed (``advance`` moves it); ``hold_next`` keeps a call's answer (or the call itself) back
  until released, for a client killed mid-call.
- Files, as slack_sdk's ``files_upload_v2`` sends them: files.getUploadURLExternal (``filename``
  and ``length`` required, ``invalid_arguments`` otherwise; a length of 1 byte to
  ``file_limit_bytes``, Slack's 1 GB unless a test lowers it, else
  ``file_upload_size_restricted``; ``alt_txt`` up to 1,000 characters, ``alt_txt_too_large``)
  answers an ``upload_url`` on this stub (``/upload/v1/<ticket>``) and a ``file_id``; the POST
  of the bytes there (raw, or multipart's one file part) must carry exactly the declared
  length (HTTP 400 otherwise, 404 for a ticket unknown or already completed);
  files.completeUploadExternal takes ``files`` (a JSON array of ``{id, title}``), ``channel_id``,
  ``thread_ts`` and ``initial_comment``, and refuses a file id it never issued, one whose bytes
  never arrived and one completed before (``file_not_found``, the reason in
  ``response_metadata``), a channel name or a deleted channel (``channel_not_found``) and a
  channel the bot is not in (``not_in_channel``). Stricter than Slack on one point: Slack keeps
  a file completed without a channel as a private file nobody sees; here that is
  ``invalid_arguments``, since dbops never means to upload a file nobody sees. Both methods need
  ``files:write`` (``missing_scope``). ``files()`` returns the completed uploads, bytes and
  all.
- Message metadata (``metadata``: ``event_type`` and ``event_payload``, refused otherwise with
  ``invalid_metadata_format`` / ``invalid_metadata_schema``) is kept with the message and shown
  by conversations.history and conversations.replies only with ``include_all_metadata``; those
  need the history scope of the channel's type (``missing_scope``), the bot in the channel
  (``not_in_channel``) and a channel id; ``remove_channel`` deletes a channel
  (``channel_not_found`` from then on).

It records every call (``calls``; ``Call.ok`` and ``Call.error`` say how it was answered) and
lets a test wait for a call with a deadline instead of sleeping. The pattern is bolt-python's
mock_web_api_server.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlparse

from bot.slack.rules import check_message, check_view

DROP = 0  # a "status" for fail_next: close the connection without answering
BOT_USER = "U0DBOPSBOT"
TEAM = "T0DBOPS"
SIGNING_SECRET = "test-signing-secret-0123456789abcdef"
BOT_TOKEN = "xoxb-test-0000-dbops"
RESPONSE_URL_USES = 5
RESPONSE_URL_TTL_S = 30 * 60
TRIGGER_TTL_S = 3.0
_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")
_USER_ID = re.compile(r"^[UW][A-Z0-9_]{2,}$")
_JSON_FIELDS = ("blocks", "attachments", "view", "metadata")
CHANNELS = ("db-ops", "db-escalations", "esc", "general")  # public, with the bot in them
SCOPES = (
    "commands,chat:write,chat:write.public,im:write,im:history,channels:read,groups:read,"
    "channels:history,groups:history,files:write"
)
FILE_MAX_BYTES = 1 << 30  # Slack takes files of up to 1 GB
ALT_TXT_MAX = 1000
# The scope conversations.history / .replies need, by the first letter of the channel id.
HISTORY_SCOPES = {"C": "channels:history", "G": "groups:history", "D": "im:history"}
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_]{1,255}$")
METHODS = {
    "auth.test",
    "apps.connections.open",
    "chat.postMessage",
    "chat.update",
    "chat.postEphemeral",
    "chat.delete",
    "conversations.open",
    "conversations.info",
    "conversations.list",
    "conversations.history",
    "conversations.replies",
    "views.open",
    "views.update",
    "views.push",
    "views.publish",
    "files.getUploadURLExternal",
    "files.completeUploadExternal",
}

# Triggers issued in this process (trigger_id -> when, time.monotonic): Slack issues one per
# slash command or button press; the stub that receives views.open checks it.
_triggers: dict[str, float] = {}
_triggers_lock = threading.Lock()


def issue_trigger(age_s: float = 0.0) -> str:
    """A trigger_id as Slack issues one with a request, ``age_s`` seconds old already."""
    trigger = f"{uuid.uuid4().int % 10**13}.{uuid.uuid4().int % 10**13}.{uuid.uuid4().hex[:16]}"
    with _triggers_lock:
        _triggers[trigger] = time.monotonic() - age_s
    return trigger


def _stable_id(prefix: str, name: str) -> str:
    return prefix + hashlib.sha256(name.encode()).hexdigest()[:10].upper()


def dm_channel(user: str) -> str:
    """The id of the bot's DM with ``user``, as conversations.open answers it (``D...``)."""
    return _stable_id("D", user)


@dataclass
class Call:
    kind: str  # the Web API method ("chat.postMessage") or "response"
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    at: float = field(default_factory=time.monotonic)
    ok: bool = True  # how it was answered: Slack took it
    error: str | None = None  # else Slack's error code
    answer: Any = None  # the JSON (or text) answered
    injected: bool = False  # answered by fail_next, not by Slack's rules

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
    error: str


@dataclass
class _ResponseUrl:
    issued: float
    uses: int = 0


@dataclass
class _Window:
    """Every call matching ``match`` is rate limited until ``until`` (the stub's clock)."""

    match: str
    until: float


@dataclass
class Hold:
    """A call kept back (``hold_next``): ``reached`` is set when it arrives; ``release`` lets it
    go on. With ``accept`` the call is done first and only its answer is kept back (Slack took
    it; the caller does not know); without, the call is dropped unanswered on release."""

    match: str
    accept: bool
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    taken: bool = False

    def release(self) -> None:
        self.released.set()


@dataclass
class UploadedFile:
    """One file through files.getUploadURLExternal: its bytes once posted to its URL, and where
    files.completeUploadExternal shared it."""

    id: str
    filename: str
    length: int
    ticket: str
    alt_txt: str | None = None
    data: bytes | None = None  # posted to the upload URL
    completed: bool = False
    title: str | None = None
    channel: str | None = None
    thread_ts: str | None = None
    initial_comment: str | None = None


class SlackStub:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.tokens = {BOT_TOKEN}  # bot tokens Slack knows; remove one to revoke it
        self._failures: list[_Failure] = []
        self._cond = threading.Condition()
        self._urls: dict[str, _ResponseUrl] = {}
        self._used_triggers: set[str] = set()
        self._messages: dict[tuple[str, str], dict[str, Any]] = {}
        self._views: dict[str, dict[str, Any]] = {}
        self._last_ts = 0.0
        self._windows: list[_Window] = []
        self._holds: list[Hold] = []
        self.scopes = set(SCOPES.split(","))  # what auth.test reports; remove one to test
        self.latency_s = 0.0  # how long each Web API answer takes (a slow network)
        self.file_limit_bytes = FILE_MAX_BYTES  # lower it: the team restricts large uploads
        self._uploads: dict[str, UploadedFile] = {}  # by file id
        self._expected: set[str] = set()
        self._channels: dict[str, dict[str, Any]] = {}
        for name in CHANNELS:
            self.add_channel(name)
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
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # -- set-up ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self, token: str | None = None) -> str:
        """A response_url as Slack sends with a command or a press: five uses, 30 minutes."""
        token = token or uuid.uuid4().hex
        with self._cond:
            self._urls.setdefault(token, _ResponseUrl(self._now()))
        return f"http://127.0.0.1:{self.port}/response/{token}"

    def trigger(self, age_s: float = 0.0) -> str:
        """A trigger_id as Slack sends with a command or a press (see ``issue_trigger``)."""
        return issue_trigger(age_s)

    def advance(self, seconds: float) -> None:
        """Age every response_url and trigger issued so far by ``seconds``; nothing sleeps."""
        with self._cond:
            for url in self._urls.values():
                url.issued -= seconds
            for window in self._windows:
                window.until -= seconds
        with _triggers_lock:
            for trigger in _triggers:
                _triggers[trigger] -= seconds

    def channel_id(self, channel: str) -> str:
        """The id Slack gives ``channel`` (a name, with or without #, or an id)."""
        if _CHANNEL_ID.fullmatch(channel):
            return channel
        if _USER_ID.fullmatch(channel):
            return dm_channel(channel)
        name = channel.removeprefix("#").lower()
        with self._cond:
            for info in self._channels.values():
                if info["name"] == name:
                    return str(info["id"])
        return _stable_id("C", name)

    def dm_channel(self, user: str) -> str:
        """The id of the bot's DM with ``user`` (what conversations.open answers)."""
        return dm_channel(user)

    def add_channel(self, name: str, *, private: bool = False, member: bool = True) -> str:
        """A channel in the workspace (``name`` without #); its id. A private channel's id
        starts with G, and conversations.list shows it only when the bot is in it."""
        name = name.removeprefix("#").lower()
        channel_id = _stable_id("G" if private else "C", name)
        with self._cond:
            self._channels[channel_id] = {
                "id": channel_id,
                "name": name,
                "is_channel": not private,
                "is_group": private,
                "is_private": private,
                "is_archived": False,
                "is_member": member,
            }
        return channel_id

    def remove_channel(self, name: str) -> None:
        """The channel is deleted: posts, info and history answer ``channel_not_found``."""
        channel_id = self.channel_id(name)
        with self._cond:
            info = self._channels.get(channel_id)
            if info is None:
                self.add_channel(name.removeprefix("#"))
                info = self._channels[channel_id]
            info["deleted"] = True

    def existing(
        self,
        channel: str,
        text: str = "posted before the test",
        *,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """A message already in ``channel`` (posted by the bot earlier): its ts."""
        ts = self._next_ts()
        body: dict[str, Any] = {"text": text}
        if metadata is not None:
            body["metadata"] = metadata
        with self._cond:
            self._messages[(self.channel_id(channel), ts)] = body
        return ts

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        """Every message in Slack now (``channel``, ``ts`` and the body), oldest first."""
        with self._cond:
            found = sorted(self._messages.items(), key=lambda kv: float(kv[0][1]))
        return [
            {**body, "channel": ch, "ts": ts}
            for (ch, ts), body in found
            if channel is None or ch == self.channel_id(channel)
        ]

    def start(self) -> SlackStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def expect_refusals(self, *errors: str) -> None:
        """Slack errors this test provokes on purpose (``expired_trigger_id``...)."""
        with self._cond:
            self._expected.update(errors)

    def check(self) -> None:
        """Raise if Slack would have refused anything sent here that the test did not expect:
        a refused message is a lost message, whether or not the code under test noticed."""
        with self._cond:
            expected = set(self._expected)
        lost = [c for c in self.refused() if c.error not in expected]
        if lost:
            said = "; ".join(f"{c.kind} {c.path} {c.error} {_said(c.answer)}" for c in lost[:5])
            raise AssertionError(f"Slack would have refused {len(lost)} call(s): {said}")

    def __enter__(self) -> SlackStub:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is None:
            self.check()

    def fail_next(
        self,
        n: int,
        match: str = "",
        *,
        status: int | None = None,
        retry_after: int | None = 1,
        error: str = "ratelimited",
    ) -> None:
        """Answer the next ``n`` calls whose path contains ``match`` as Slack answers a failure:
        ``ratelimited`` with HTTP 429 and ``Retry-After`` (the default), any other ``error``
        (``channel_not_found``, ``not_in_channel``, ``invalid_auth``...) with HTTP 200 and
        ``ok: false``, or ``status=DROP``: the connection closed with no answer."""
        if status is None:
            status = 429 if error == "ratelimited" else 200
        with self._cond:
            self._failures.append(_Failure(match, n, status, retry_after, error))

    def rate_limit(self, seconds: float, match: str = "chat.") -> None:
        """Answer every call whose path contains ``match`` with 429 ``ratelimited`` and the
        Retry-After left, until ``seconds`` of stub time have passed (``advance`` moves it)."""
        with self._cond:
            self._windows.append(_Window(match, self._now() + seconds))

    def hold_next(self, match: str, *, accept: bool = True) -> Hold:
        """Keep back the next call whose path contains ``match`` (see ``Hold``)."""
        hold = Hold(match, accept)
        with self._cond:
            self._holds.append(hold)
        return hold

    def reset(self) -> None:
        with self._cond:
            self.calls.clear()
            self._failures.clear()
            self._windows.clear()

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

    def files(self, channel: str | None = None) -> list[UploadedFile]:
        """Every file completed (shared) so far, oldest first; in ``channel`` only if given."""
        with self._cond:
            done = [f for f in self._uploads.values() if f.completed]
        return [f for f in done if channel is None or f.channel == self.channel_id(channel)]

    def replies_to(self, token: str) -> list[Call]:
        return self.find(lambda c: c.path == f"/response/{token}" and c.status == 200)

    def refused(self) -> list[Call]:
        """Every call Slack would have refused (not a failure a test injected)."""
        return self.find(
            lambda c: (
                not c.ok
                and not c.injected
                and c.path.startswith(("/api/", "/response/", "/upload/"))
            )
        )

    @contextmanager
    def quiet_for(self, token: str) -> Iterator[None]:
        """Asserts after the block that nothing was posted to the response_url ``token``."""
        yield
        assert self.replies_to(token) == []

    # -- serving -----------------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic()

    def _next_ts(self) -> str:
        with self._cond:
            self._last_ts = max(self._last_ts + 0.000001, time.time())
            return f"{self._last_ts:.6f}"

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        ctype = req.headers.get("Content-Type", "")
        url = urlparse(req.path)
        path = url.path
        if path.startswith("/upload/"):  # a file's bytes, not a form
            self._upload(req, path, ctype, raw)
            return
        body: dict[str, Any]
        try:
            if "json" in ctype:
                body = json.loads(raw or b"{}")
            else:
                body = dict(parse_qsl(raw.decode("utf-8")))
        except ValueError:
            body = {}
        if path.startswith("/_stub/"):  # for a benchmark in another process: unrecorded
            self._send(req, 200, self._control(path, parse_qs(url.query)), {})
            return
        kind = "response" if path.startswith("/response/") else path.removeprefix("/api/")
        if kind != "response" and (req.command == "GET" or url.query):
            # Slack reads arguments from the query string too, with a POST as with a GET
            # (AsyncWebClient sends files.getUploadURLExternal's there).
            body = {**dict(parse_qsl(url.query)), **body}
        headers = {k.lower(): v for k, v in req.headers.items()}
        hold = self._hold(path)
        if hold is not None and not hold.accept:
            hold.reached.set()
            hold.released.wait(60)
            call = Call(kind, path, headers, body, DROP, ok=False, error="dropped", injected=True)
            with self._cond:
                self.calls.append(call)
                self._cond.notify_all()
            req.close_connection = True
            return
        if self.latency_s and kind != "response":
            time.sleep(self.latency_s)
        status, payload, extra, injected = self._answer(path, kind, body, headers)
        call = Call(kind, path, headers, body, status, injected=injected, answer=payload)
        if isinstance(payload, dict):
            call.ok = bool(payload.get("ok"))
            call.error = None if call.ok else str(payload.get("error"))
        else:  # a response_url's answer, or a path that is no Web API: a word and a status
            call.ok = status == 200
            call.error = None if call.ok else payload.decode()
        if status == DROP:
            call.ok, call.error = False, "dropped"
        with self._cond:  # recorded before the answer: a caller that has it finds the call
            self.calls.append(call)
            self._cond.notify_all()
        if hold is not None:  # done; the answer waits (its caller may be killed meanwhile)
            hold.reached.set()
            hold.released.wait(60)
        if status == DROP:  # hang up without an answer, as a dropped connection does
            req.close_connection = True
        else:
            self._send(req, status, payload, extra)

    def _hold(self, path: str) -> Hold | None:
        with self._cond:
            for hold in self._holds:
                if not hold.taken and hold.match in path:
                    hold.taken = True
                    return hold
        return None

    def _send(
        self, req: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str]
    ) -> None:
        try:
            self._write(req, status, payload, headers)
        except OSError:  # the caller hung up (killed) before its answer
            req.close_connection = True

    def _write(
        self, req: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str]
    ) -> None:
        data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        req.send_response(status)
        ctype = "text/plain" if isinstance(payload, bytes) else "application/json"
        req.send_header("Content-Type", f"{ctype}; charset=utf-8")
        req.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(data)

    def _control(self, path: str, query: dict[str, list[str]]) -> Any:
        if path == "/_stub/response_urls":  # response_urls for another process to use
            n = min(int((query.get("n") or ["1"])[0]), 100_000)
            return [self.response_url() for _ in range(n)]
        return self.stats()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            replies = [c for c in self.calls if c.kind == "response" and c.status == 200]
            return {
                "calls": len(self.calls),
                "responses": len(replies),
                "last_at": max((c.at for c in replies), default=None),
            }

    def _injected(self, path: str, kind: str) -> tuple[int, Any, dict[str, str]] | None:
        with self._cond:
            now = self._now()
            for window in self._windows:
                if window.match in path and now < window.until:
                    left = str(max(1, int(-(-(window.until - now) // 1))))
                    return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": left}
            for rule in self._failures:
                if rule.remaining > 0 and rule.match in path:
                    rule.remaining -= 1
                    headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after else {}
                    if rule.status != 429:
                        headers = {}
                    if kind == "response":
                        status = rule.status
                        if status not in (DROP, 429) and status < 400:
                            status = 400  # a response_url says no with an HTTP error
                        return status, rule.error.encode(), headers
                    return rule.status, {"ok": False, "error": rule.error}, headers
        return None

    def _answer(
        self, path: str, kind: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, Any, dict[str, str], bool]:
        injected = self._injected(path, kind)
        if injected is not None:
            return (*injected, True)
        if not path.startswith(("/api/", "/response/")):  # e.g. Socket Mode's websocket
            return 404, b"not_found", {}, False
        if kind == "response":
            status, text = self._respond(path.removeprefix("/response/"), body)
            return status, text.encode(), {}, False
        if kind not in METHODS:
            return 200, {"ok": False, "error": "unknown_method", "req_method": kind}, {}, False
        token = (headers.get("authorization") or "").removeprefix("Bearer ").strip()
        token = token or str(body.get("token") or "")
        if not token:
            return 200, {"ok": False, "error": "not_authed"}, {}, False
        if kind == "apps.connections.open":
            if not token.startswith("xapp-"):
                return 200, {"ok": False, "error": "not_allowed_token_type"}, {}, False
            return 200, {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket-mode"}, {}, False
        if token not in self.tokens:
            error = "not_allowed_token_type" if token.startswith("xapp-") else "invalid_auth"
            return 200, {"ok": False, "error": error}, {}, False
        answer = self._method(kind, _decoded(body))
        extra = {"X-OAuth-Scopes": ",".join(sorted(self.scopes))} if kind == "auth.test" else {}
        return 200, answer, extra, False

    def _method(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "auth.test":
            return {
                "ok": True,
                "url": "https://dbops-test.slack.com/",
                "team": "dbops test",
                "user": "dbops",
                "team_id": TEAM,
                "user_id": BOT_USER,
                "bot_id": "B0DBOPSBOT",
            }
        if kind == "conversations.info":
            channel = str(body.get("channel") or "")
            if not _CHANNEL_ID.fullmatch(channel) or channel.startswith("D"):
                return _error("channel_not_found")
            with self._cond:
                info = self._channels.get(channel)
            if info is not None and info.get("deleted"):
                return _error("channel_not_found")
            if info is None:  # like chat.postMessage: any other id is a channel we are in
                info = {"id": channel, "name": channel.lower(), "is_member": True}
                info |= {"is_private": False, "is_archived": False}
            return {"ok": True, "channel": dict(info)}
        if kind == "conversations.list":
            with self._cond:
                shown = [
                    dict(c)
                    for c in self._channels.values()
                    if not c.get("deleted") and (not c["is_private"] or c["is_member"])
                ]
            return {"ok": True, "channels": shown, "response_metadata": {"next_cursor": ""}}
        if kind == "conversations.open":
            users = str(body.get("users") or "")
            if body.get("channel"):
                return {"ok": True, "channel": {"id": self.channel_id(str(body["channel"]))}}
            if not users:
                return _error("users_list_not_supplied")
            if any(not _USER_ID.fullmatch(u.strip()) for u in users.split(",")):
                return _error("user_not_found")
            return {"ok": True, "channel": {"id": self.dm_channel(users)}}
        if kind in ("conversations.history", "conversations.replies"):
            return self._history(kind, body)
        if kind.startswith("files."):
            if "files:write" not in self.scopes:
                provided = ",".join(sorted(self.scopes))
                return {**_error("missing_scope"), "needed": "files:write", "provided": provided}
            if kind == "files.getUploadURLExternal":
                return self._upload_url(body)
            return self._complete_upload(body)
        if kind in ("chat.postMessage", "chat.postEphemeral"):
            return self._post(kind, body)
        if kind in ("chat.update", "chat.delete"):
            return self._change(kind, body)
        return self._view(kind, body)

    def _post(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        channel = str(body.get("channel") or "")
        if not channel:
            return _error("channel_not_found")
        if kind == "chat.postEphemeral" and not body.get("user"):
            return _error("user_not_found")
        refused = _refusal(check_message(body)) or _metadata_refusal(body)
        if refused is not None:
            return refused
        channel_id = self.channel_id(channel)
        with self._cond:
            info = self._channels.get(channel_id)
        if info is not None and info.get("deleted"):
            return _error("channel_not_found")
        if info is not None and info["is_private"] and not info["is_member"]:
            return _error("not_in_channel")
        ts = self._next_ts()
        if kind == "chat.postEphemeral":
            return {"ok": True, "message_ts": ts}
        with self._cond:
            self._messages[(channel_id, ts)] = body
        return {"ok": True, "channel": channel_id, "ts": ts, "message": {**body, "ts": ts}}

    def _change(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(body.get("channel") or ""), str(body.get("ts") or "")
        if not _CHANNEL_ID.fullmatch(channel):  # ids only here: a name is not found
            return _error("channel_not_found")
        with self._cond:
            known = (channel, ts) in self._messages
        if not known:
            return _error("message_not_found")
        if kind == "chat.delete":
            with self._cond:
                self._messages.pop((channel, ts), None)
            return {"ok": True, "channel": channel, "ts": ts}
        refused = _refusal(check_message(body)) or _metadata_refusal(body)
        if refused is not None:
            return refused
        with self._cond:
            old = self._messages[(channel, ts)]
            kept: dict[str, Any] = {k: old[k] for k in ("thread_ts", "metadata") if k in old}
            self._messages[(channel, ts)] = {**kept, **body}
        return {"ok": True, "channel": channel, "ts": ts, "text": body.get("text", "")}

    def _history(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """conversations.history (a channel's top-level messages, newest first) and
        conversations.replies (a thread: its parent, then the replies, oldest first)."""
        channel = str(body.get("channel") or "")
        if not _CHANNEL_ID.fullmatch(channel):
            return _error("channel_not_found")
        with self._cond:
            info = self._channels.get(channel)
        if info is not None and info.get("deleted"):
            return _error("channel_not_found")
        needed = HISTORY_SCOPES[channel[0]]
        if needed not in self.scopes:
            return {**_error("missing_scope"), "needed": needed, "provided": ",".join(self.scopes)}
        if info is not None and not info["is_member"]:
            return _error("not_in_channel")
        try:
            oldest = float(body.get("oldest") or 0)
            latest = float(body.get("latest") or 10**10)
            limit = int(body.get("limit") or 100)
            start = int(body.get("cursor") or 0)
        except ValueError:
            return _error("invalid_arguments")
        if not 1 <= limit <= 999:
            return _error("invalid_limit")
        inclusive = str(body.get("inclusive", "")).lower() in ("1", "true")
        metadata = str(body.get("include_all_metadata", "")).lower() in ("1", "true")
        with self._cond:
            mine = [(ts, b) for (ch, ts), b in self._messages.items() if ch == channel]
        if kind == "conversations.replies":
            parent = str(body.get("ts") or "")
            if not any(ts == parent for ts, _ in mine):
                return _error("thread_not_found")
            found = [(ts, b) for ts, b in mine if ts == parent or b.get("thread_ts") == parent]
            found.sort(key=lambda m: float(m[0]))
        else:
            found = [(ts, b) for ts, b in mine if b.get("thread_ts") in (None, ts)]
            found.sort(key=lambda m: -float(m[0]))
        found = [
            (ts, b)
            for ts, b in found
            if (oldest <= float(ts) if inclusive else oldest < float(ts)) and float(ts) <= latest
        ]
        page = found[start : start + limit]
        more = start + limit < len(found)
        shown = []
        for ts, b in page:
            message = {"type": "message", "user": BOT_USER, "bot_id": "B0DBOPSBOT", "ts": ts}
            message |= {k: b[k] for k in ("text", "blocks", "thread_ts") if k in b}
            if metadata and "metadata" in b:
                message["metadata"] = b["metadata"]
            shown.append(message)
        return {
            "ok": True,
            "messages": shown,
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    def _view(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind in ("views.open", "views.push"):
            problem = self._use_trigger(str(body.get("trigger_id") or ""))
            if problem is not None:
                return _error(problem)
        view = body.get("view")
        if kind == "views.update":
            view_id = str(body.get("view_id") or "")
            external = body.get("external_id")
            with self._cond:
                known = view_id in self._views or (
                    external is not None
                    and any(v.get("external_id") == external for v in self._views.values())
                )
            if not known:
                return _error("not_found")
        elif kind == "views.publish" and not _USER_ID.fullmatch(str(body.get("user_id") or "")):
            return _error("invalid_arguments")
        refusal = check_view(view)
        if refusal is not None:
            return _refusal(refusal) or _error("invalid_arguments")
        assert isinstance(view, dict)
        view_id = str(body.get("view_id") or f"V{uuid.uuid4().hex[:10].upper()}")
        shown = {**view, "id": view_id, "hash": uuid.uuid4().hex}
        with self._cond:
            self._views[view_id] = shown
        return {"ok": True, "view": shown}

    def _upload_url(self, body: dict[str, Any]) -> dict[str, Any]:
        """files.getUploadURLExternal: a ticket for one file of ``length`` bytes."""
        filename = str(body.get("filename") or "")
        length_arg = body.get("length")
        given = (("filename", filename), ("length", length_arg))
        missing = [name for name, value in given if value in (None, "")]
        if missing:
            return _error(
                "invalid_arguments", tuple(f"[ERROR] missing required field: {n}" for n in missing)
            )
        try:
            length = int(str(length_arg))
        except ValueError:
            return _error("invalid_arguments", ("[ERROR] invalid type for field: length",))
        if length < 1:
            return _error("invalid_arguments", ("[ERROR] length must be at least 1 byte",))
        if length > self.file_limit_bytes:
            return _error("file_upload_size_restricted")
        alt = body.get("alt_txt")
        if alt is not None and len(str(alt)) > ALT_TXT_MAX:
            return _error("alt_txt_too_large")
        upload = UploadedFile(
            id=f"F{uuid.uuid4().hex[:10].upper()}",
            filename=filename,
            length=length,
            ticket=uuid.uuid4().hex,
            alt_txt=None if alt is None else str(alt),
        )
        with self._cond:
            self._uploads[upload.id] = upload
        url = f"http://127.0.0.1:{self.port}/upload/v1/{upload.ticket}"
        return {"ok": True, "upload_url": url, "file_id": upload.id}

    def _upload(self, req: BaseHTTPRequestHandler, path: str, ctype: str, raw: bytes) -> None:
        """The POST of a file's bytes to its upload_url: HTTP 200 when they are all there."""
        headers = {k.lower(): v for k, v in req.headers.items()}
        ticket = path.removeprefix("/upload/v1/")
        data = _file_part(ctype, raw)
        injected = self._injected(path, "response")  # an upload says no with an HTTP status
        found: UploadedFile | None = None
        if injected is not None:
            status, answer, extra = injected
        else:
            extra = {}
            with self._cond:
                found = next((f for f in self._uploads.values() if f.ticket == ticket), None)
                if found is None or found.completed:
                    status, answer = 404, b"not_found"  # no such ticket, or it is used up
                elif data is None:
                    status, answer = 400, b"invalid_form_data"  # a multipart body, no file
                elif len(data) != found.length:
                    status, answer = 400, f"length_mismatch: {len(data)} != {found.length}".encode()
                else:
                    found.data = data
                    status, answer = 200, f"OK - {len(data)}".encode()
        body = {"filename": found.filename if found else None, "length": len(data or b"")}
        call = Call("upload", path, headers, body, status, answer=answer)
        call.ok = status == 200
        call.error = None if call.ok else answer.decode().split(":")[0]
        call.injected = injected is not None
        if status == DROP:
            call.ok, call.error = False, "dropped"
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()
        if status == DROP:
            req.close_connection = True
        else:
            self._send(req, status, answer, extra)

    def _complete_upload(self, body: dict[str, Any]) -> dict[str, Any]:
        """files.completeUploadExternal: share uploaded files in one channel (or thread)."""
        files = body.get("files")
        if isinstance(files, str):
            try:
                files = json.loads(files)
            except ValueError:
                return _error("invalid_arguments", ("[ERROR] invalid JSON for field: files",))
        if not files:
            return _error("invalid_arguments", ("[ERROR] missing required field: files",))
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("id"), str) for f in files
        ):
            return _error("invalid_arguments", ("[ERROR] files: an array of {id, title}",))
        targets = [str(body.get("channel_id") or "")] if body.get("channel_id") else []
        targets += [c for c in str(body.get("channels") or "").split(",") if c]
        if not targets:
            # Slack keeps such a file private, shared nowhere: dbops never means that.
            return _error(
                "invalid_arguments",
                ("[ERROR] channel_id: without one the file is shared nowhere",),
            )
        thread = str(body.get("thread_ts") or "") or None
        if thread is not None and len(targets) > 1:
            return _error("invalid_arguments", ("[ERROR] thread_ts takes a single channel",))
        shared = []
        for target in targets:
            if _USER_ID.fullmatch(target):
                shared.append(self.dm_channel(target))
                continue
            if not _CHANNEL_ID.fullmatch(target):  # ids only: a name is not found
                return _error("channel_not_found")
            with self._cond:
                info = self._channels.get(target)
            if info is not None and info.get("deleted"):
                return _error("channel_not_found")
            if info is not None and not info["is_member"]:
                return _error("not_in_channel")
            shared.append(target)
        with self._cond:
            for f in files:
                upload = self._uploads.get(f["id"])
                why = (
                    "no upload has this id"
                    if upload is None
                    else "already completed: a file is completed once"
                    if upload.completed
                    else "nothing was posted to its upload_url"
                    if upload.data is None
                    else None
                )
                if why is not None:
                    return _error("file_not_found", (f"[ERROR] {str(f['id'])[:20]}: {why}",))
            done = []
            for f in files:
                upload = self._uploads[f["id"]]
                upload.completed = True
                upload.title = str(f.get("title") or upload.filename)
                upload.channel = shared[0]
                upload.thread_ts = thread
                upload.initial_comment = body.get("initial_comment")
                done.append(
                    {
                        "id": upload.id,
                        "name": upload.filename,
                        "title": upload.title,
                        "size": upload.length,
                    }
                )
        return {"ok": True, "files": done}

    def _use_trigger(self, trigger: str) -> str | None:
        with _triggers_lock:
            issued = _triggers.get(trigger)
        if issued is None:
            return "invalid_trigger_id"
        with self._cond:
            if trigger in self._used_triggers:
                return "exchanged_trigger_id"
            if self._now() - issued > TRIGGER_TTL_S:
                return "expired_trigger_id"
            self._used_triggers.add(trigger)
        return None

    def _respond(self, token: str, body: dict[str, Any]) -> tuple[int, str]:
        """A post to a response_url: Slack answers with a status and a word."""
        with self._cond:
            url = self._urls.get(token)
            if url is None:
                return 404, "invalid_token"
            if self._now() - url.issued > RESPONSE_URL_TTL_S:
                return 404, "expired_url"
            if url.uses >= RESPONSE_URL_USES:
                return 404, "used_url"
        if not body.get("delete_original"):
            refusal = check_message(_decoded(body))
            if refusal is not None:
                return 400, refusal.error
        with self._cond:
            url.uses += 1
        return 200, "ok"


def _metadata_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """Slack's answer to bad message metadata, or None: an object with a word for
    ``event_type`` and an object for ``event_payload``."""
    if "metadata" not in body:
        return None
    meta = body["metadata"]
    if not isinstance(meta, dict):
        return _error("invalid_metadata_format")
    event_type, payload = meta.get("event_type"), meta.get("event_payload")
    if not isinstance(event_type, str) or not _EVENT_TYPE.fullmatch(event_type):
        return _error("invalid_metadata_schema", ("event_type must be a word of 1-255",))
    if not isinstance(payload, dict):
        return _error("invalid_metadata_schema", ("event_payload must be an object",))
    return None


def _said(answer: Any) -> str:
    text = answer.decode() if isinstance(answer, bytes) else json.dumps(answer)
    return text[:400]


def _decoded(body: dict[str, Any]) -> dict[str, Any]:
    """The body with its JSON fields (blocks, view) parsed, as a form-encoded call sends them."""
    out = dict(body)
    for key in _JSON_FIELDS:
        if isinstance(out.get(key), str):
            try:
                out[key] = json.loads(out[key])
            except ValueError:
                out[key] = None if key == "view" else out[key]
    return out


def _file_part(ctype: str, raw: bytes) -> bytes | None:
    """The bytes of an upload: the body itself, or a multipart body's file part (None if it
    has none); Slack takes either."""
    if not ctype.lower().startswith("multipart/form-data"):
        return raw
    from email.parser import BytesParser
    from email.policy import HTTP

    head = f"Content-Type: {ctype}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + raw)
    for part in message.iter_parts():
        if part.get_filename() is not None:
            payload = part.get_payload(decode=True)
            return payload if isinstance(payload, bytes) else None
    return None


def _error(code: str, messages: tuple[str, ...] = ()) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": False, "error": code}
    if messages:
        answer["response_metadata"] = {"messages": list(messages)}
    return answer


def _refusal(refusal: Any) -> dict[str, Any] | None:
    return None if refusal is None else _error(refusal.error, refusal.messages)


# --- requests as Slack sends them ---------------------------------------------------------------


def sign(body: str, *, secret: str = SIGNING_SECRET, ts: int | None = None) -> dict[str, str]:
    """The headers Slack adds: a v0 signature over ``v0:<timestamp>:<body>``."""
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
        "trigger_id": trigger_id or issue_trigger(),
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
        "trigger_id": issue_trigger(),
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
    block_id: str = "b1",
) -> str:
    from urllib.parse import urlencode

    payload = {
        "type": "block_actions",
        "team": {"id": TEAM, "domain": "dbops-test"},
        "user": {"id": user, "username": user.lower(), "team_id": TEAM},
        "api_app_id": "A0DBOPS",
        "token": "legacy-verification-token",
        "trigger_id": issue_trigger(),
        "channel": {"id": channel, "name": "db-ops"},
        "container": {"type": "message", "message_ts": "1.000001", "channel_id": channel},
        "response_url": response_url,
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": block_id,
                "value": value,
                "text": {"type": "plain_text", "text": "x"},
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)})
