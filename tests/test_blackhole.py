"""The fault proxy itself (tests/blackhole.py), against a plain TCP echo server: it forwards,
black-holes without a word either way, refuses, and heals, on command or by itself."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.blackhole import Blackhole


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[Blackhole]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Blackhole(server.server_address) as p:  # type: ignore[arg-type]
            yield p
    finally:
        server.shutdown()
        server.server_close()


def connect(proxy: Blackhole) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    s.settimeout(0.5)
    return s


def echoes(s: socket.socket) -> bool:
    s.sendall(b"ping")
    try:
        return s.recv(16) == b"ping"
    except TimeoutError:
        return False


def test_it_forwards(proxy: Blackhole) -> None:
    with connect(proxy) as s:
        assert echoes(s) and echoes(s)


def test_a_black_hole_swallows_open_and_new_connections_and_a_heal_resets_them(
    proxy: Blackhole,
) -> None:
    before = connect(proxy)
    assert echoes(before)
    proxy.blackhole()
    during = connect(proxy)  # still accepted: the hole answers nothing after that
    assert not echoes(before)
    assert not echoes(during)
    proxy.heal()
    for s in (before, during):  # their streams lost bytes: closed, not resumed
        s.settimeout(2)
        try:
            got = s.recv(16)
        except ConnectionResetError:
            got = b""
        assert got == b""
        s.close()
    with connect(proxy) as after:
        assert echoes(after)


def test_refusing_resets_open_connections_and_refuses_new_ones(proxy: Blackhole) -> None:
    s = connect(proxy)
    assert echoes(s)
    proxy.refuse()
    s.settimeout(2)
    assert s.recv(16) == b""
    s.close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.heal()
    with connect(proxy) as again:
        assert echoes(again)


def test_a_fault_heals_itself_after_its_seconds(proxy: Blackhole) -> None:
    proxy.refuse(seconds=0.3)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    assert proxy.wait_healed(timeout=2)
    assert proxy.mode == "forward"
    assert time.monotonic() - proxy.changed_at < 2
    with connect(proxy) as s:
        assert echoes(s)
