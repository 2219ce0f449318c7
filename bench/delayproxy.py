"""A TCP proxy that adds latency: each direction's bytes arrive ``delay`` later, in order.

With 25 ms each way a round trip costs 50 ms more, as a VPS in another region would. Bytes are
not held back behind each other: a chunk read at t is written at t + delay, so throughput is
unchanged and only latency grows (a queue and a writer per direction).

    python bench/delayproxy.py --delay-ms 25 127.0.0.1:5432 127.0.0.1:22

listens on a free loopback port for each target, prints {"127.0.0.1:5432": 40123, ...} as one
JSON line, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(target: tuple[str, int], delay: float) -> asyncio.Server:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(
                _pump(client_r, server_w, delay),
                _pump(server_r, client_w, delay),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            # Shutting down: drop the connection quietly instead of logging each one.
            client_w.close()
            server_w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _main(targets: list[str], delay: float) -> None:
    servers = {}
    for spec in targets:
        host, _, port = spec.rpartition(":")
        servers[spec] = await _serve((host, int(port)), delay)
    ports = {spec: s.sockets[0].getsockname()[1] for spec, s in servers.items()}
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers.values():
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=25.0, help="added each way (ms)")
    parser.add_argument("targets", nargs="+", help="host:port to forward to")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.targets, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
