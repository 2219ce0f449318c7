"""A TCP proxy that cuts the line on demand: black-hole, refuse, heal.

It stands in front of one real server (the event log's PostgreSQL in tests/event_outage.py) and
forwards bytes both ways until told otherwise:

- ``blackhole(seconds)``: a dropped route or a hung host. New connections are still accepted
  (the kernel's handshake) and everything sent is read, but nothing is forwarded either way and
  no close is passed on: clients wait for their own timeouts, and the server's backend keeps
  whatever it held (a lock, an open transaction) as it would behind a real black hole.
- ``refuse(seconds)``: the server is down or restarting. The port stops listening, so new
  connections are refused, and open ones are reset.
- ``heal()``: forwarding again. Connections that lived through a black hole are reset on both
  sides (bytes were swallowed, so their streams mean nothing any more); new ones forward.

With ``seconds`` the fault heals itself that long after it began. The proxy runs an asyncio loop
on a daemon thread; every method may be called from any thread but that one, and returns once
the change is in force.

    with Blackhole(("127.0.0.1", 5432)) as proxy:
        connect to 127.0.0.1:proxy.port ...
        proxy.blackhole(30)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

Mode = Literal["forward", "blackhole", "refuse"]
T = TypeVar("T")


class _Link:
    """One client connection and, when it got that far, its connection to the server."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.swallowing = False
        self.done = asyncio.Event()

    def reset(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()
        self.done.set()


class Blackhole:
    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self.mode: Mode = "forward"
        self.accepted = 0  # connections accepted so far
        self.changed_at = time.monotonic()  # when the mode last changed
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._heal: asyncio.TimerHandle | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="blackhole", daemon=True
        )

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> Blackhole:
        self._thread.start()
        self._call(self._listen)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Blackhole:
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ---------------------------------------------------------------------------

    def blackhole(self, seconds: float | None = None) -> None:
        """Swallow everything, on open connections and new ones; heal after ``seconds``."""
        self._call(lambda: self._set("blackhole", seconds))

    def refuse(self, seconds: float | None = None) -> None:
        """Stop listening and reset every open connection; heal after ``seconds``."""
        self._call(lambda: self._set("refuse", seconds))

    def heal(self) -> None:
        """Forward again; connections that went through a black hole are reset."""
        self._call(lambda: self._set("forward", None))

    def wait_healed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.mode != "forward":
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- the loop's side --------------------------------------------------------------------

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("Blackhole methods are for other threads than its own")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout=10)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self._set("refuse", None)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _set(self, mode: Mode, seconds: float | None) -> None:
        if self._heal is not None:
            self._heal.cancel()
            self._heal = None
        self.mode, self.changed_at = mode, time.monotonic()
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
            for link in list(self._links):
                link.reset()
        elif mode == "blackhole":
            await self._listen()
            for link in self._links:
                link.swallowing = True
        else:
            await self._listen()
            for link in list(self._links):
                if link.swallowing:
                    link.reset()
        if seconds is not None and mode != "forward":
            loop = asyncio.get_running_loop()
            self._heal = loop.call_later(
                seconds, lambda: loop.create_task(self._set("forward", None))
            )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            if self.mode != "forward":
                link.swallowing = True
                await self._pump(reader, None, link)
                return
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            link.server = server_w
            await asyncio.gather(
                self._pump(reader, server_w, link),
                self._pump(server_r, writer, link),
                return_exceptions=True,
            )
        finally:
            self._links.discard(link)
            link.reset()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, link: _Link
    ) -> None:
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, OSError):
                data = b""
            if link.swallowing or writer is None:
                if not data:
                    # A black hole passes on no close: the other side stays as it is until
                    # a heal resets the link.
                    await link.done.wait()
                    return
                continue
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()
                return
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                return
