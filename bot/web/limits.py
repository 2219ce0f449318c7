"""What a client can make `dbops serve` hold: body size, read deadlines, connections.

Two layers, each where it sees what it needs:

* ``BodyLimits``, a pure ASGI middleware around every route: a declared Content-Length over
  MAX_BODY_BYTES is a 413 before the app runs (nothing reads the body, and ``Expect:
  100-continue`` clients never send it); a chunked body is counted as the app reads it and
  cut off at MAX_BODY_BYTES + 1 byte with a 413; the whole body must arrive within
  BODY_TIMEOUT_S of the headers, else 408. A response sent before its body was read (a 404,
  an endpoint that is off) closes the connection rather than drain what is left.
* ``ShedSlowClients``, uvicorn's h11 protocol with a deadline on the request line and headers
  (uvicorn has none: a client that sends half a request line is held for ever) and a cap on the
  connections waiting for one; at the cap, the one that has waited longest is closed. Waiting
  clients therefore never reach uvicorn's ``limit_concurrency`` (whose answer is a 503) on
  their own, and a complete request such as Slack's, whose headers come in its first packet,
  is served through a flood of them.

The figures are below, each with its reason; README's "HTTP limits" has them for operators.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dbops.http")

# Slack's payloads are a few KB (a modal's state tens); Stripe's events and Alertmanager's
# groups tens of KB. DESIGN.md: "HTTP endpoints refuse bodies over 1 MB before parsing them".
MAX_BODY_BYTES = 1 << 20
# Slack, Stripe and Alertmanager send the request line and headers in one packet: 5 s is a
# thousand times what they need, and what a half-sent request can hold a connection for.
HEADER_TIMEOUT_S = 5.0
# The whole body, from the end of the headers: 1 MB at 100 KB/s, Slack's few KB at once.
BODY_TIMEOUT_S = 10.0
# Connections waiting for a request's headers (new ones, and idle kept-alive ones). Below
# LIMIT_CONCURRENCY so that at least LIMIT_CONCURRENCY - MAX_WAITING requests can be in flight
# whatever the number of slow clients.
MAX_WAITING = 400
# uvicorn's limit_concurrency: connections and requests in flight, beyond which a request is
# answered 503. 600 sockets stay inside a default 1024 file descriptors with room for the event
# log's, the SSH sessions' and PostgreSQL's.
LIMIT_CONCURRENCY = 600
# h11_max_incomplete_event_size: the request line and headers; Slack's are about 1 KB.
MAX_HEADER_BYTES = 16 * 1024
# An idle kept-alive connection is closed after this (Slack reuses its connections).
KEEP_ALIVE_S = 30


class _Refused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def _declared(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(Content-Length, chunked) as the client declared them."""
    length: int | None = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:  # h11 refuses these first; a bad one is no body we will read
                length = 0
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


async def _answer(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # What is left of the body is not read: the connection ends with the answer.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    """A size cap and a read deadline on every request body (see the module's docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_BODY_BYTES,
        timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"body over {self.max_bytes} bytes"
        length, chunked = _declared(scope["headers"])
        if length is not None and length > self.max_bytes:
            await _answer(send, 413, too_large)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        read = 0
        done = not chunked and not length  # no body to wait for
        refused: _Refused | None = None
        started = False

        async def limited() -> Message:
            nonlocal read, done, refused
            if refused is not None:
                raise refused
            if done:
                return await receive()  # http.disconnect, for apps that listen for it
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                refused = _Refused(408, f"body not received within {self.timeout_s:g} s")
                raise refused from None
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    refused = _Refused(413, too_large)
                    raise refused
                done = not message.get("more_body", False)
            return message

        async def closing_early(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not done:  # answered before the body was read: do not drain the rest
                    message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
            await send(message)

        try:
            await self.app(scope, limited, closing_early)
        except _Refused as exc:
            if started:
                raise
            await _answer(send, exc.status, exc.error)


_CLOSE = (b"connection", b"close")


class ShedSlowClients(H11Protocol):
    """uvicorn's h11 protocol with a deadline on a request's line and headers, and at most
    ``max_waiting`` connections waiting for them (the longest waiting is closed to make room).

    A subclass per server (``shedding_protocol``) holds the waiting connections, oldest first.
    """

    header_timeout_s: ClassVar[float] = HEADER_TIMEOUT_S
    max_waiting: ClassVar[int] = MAX_WAITING
    waiting: ClassVar[dict[ShedSlowClients, None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait()
        self._arm()

    def data_received(self, data: bytes) -> None:
        # A kept-alive connection's next request: its headers' deadline runs from its first byte.
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: a request, not a wait
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait()  # kept alive for the next request (timeout_keep_alive closes it idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _wait(self) -> None:
        waiting = type(self).waiting
        waiting.pop(self, None)
        waiting[self] = None
        while len(waiting) > self.max_waiting:
            oldest = next(iter(waiting))
            log.debug("closing a connection that waited longest for its headers (at the cap)")
            oldest._shed()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._shed)

    def _stop_waiting(self) -> None:
        type(self).waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _shed(self) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()


def shedding_protocol(
    header_timeout_s: float = HEADER_TIMEOUT_S, max_waiting: int = MAX_WAITING
) -> type[ShedSlowClients]:
    """A ShedSlowClients of its own for one server (its own set of waiting connections)."""
    attrs: dict[str, Any] = {
        "header_timeout_s": header_timeout_s,
        "max_waiting": max_waiting,
        "waiting": {},
    }
    return type("ShedSlowClients", (ShedSlowClients,), attrs)
