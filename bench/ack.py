"""Slash-command ack latency of `dbops serve`, against a bare Bolt AsyncApp and the floor.

N signed `/db status acme` requests at concurrency C, in one run, against:
  floor       a plain Starlette endpoint that only checks the Slack signature
  bolt-bare   a Bolt AsyncApp on Starlette whose /db listener only acks (Bolt's defaults)
  bolt-bare*  the same with process_before_response=True (ack inline, no 10 ms ack polling)
  dbops       `dbops serve` on a sandbox fleet, doing the real work after each ack
  dbops-hung  the same while acme's server hangs (a socket that accepts and never answers)
All are one uvicorn worker on loopback, started once; rounds interleave them so that a busy
moment of a shared machine is spread over all. The Slack stub (auth.test, response_url) runs in
a process of its own at low priority: it stands in for Slack's servers, which are not on this
machine. The load comes from aiohttp (lighter than httpx, so the client takes less of the CPU).
Prints p50/p99/max per server (median over rounds), the ratios, and the server process's CPU
per request, the work after the ack included.

    .venv/bin/python bench/ack.py [-n 500] [-c 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.slack_stub import BOT_TOKEN, SIGNING_SECRET, sign, slash_body  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the servers compared (run as subprocesses of this script) -------------------------------


def serve_floor(port: int) -> None:
    import uvicorn
    from slack_sdk.signature import SignatureVerifier
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    verifier = SignatureVerifier(SIGNING_SECRET)

    async def events(request: Request) -> Response:
        body = await request.body()
        ok = verifier.is_valid_request(body, dict(request.headers))
        return Response(status_code=200 if ok else 401)

    app = Starlette(routes=[Route("/slack/events", events, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_bare(port: int, stub: str, before_response: bool) -> None:
    import uvicorn
    from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
    from slack_bolt.async_app import AsyncAck, AsyncApp
    from slack_sdk.web.async_client import AsyncWebClient
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    bolt = AsyncApp(
        signing_secret=SIGNING_SECRET,
        client=AsyncWebClient(token=BOT_TOKEN, base_url=stub),
        process_before_response=before_response,
    )

    @bolt.command("/db")
    async def db(ack: AsyncAck) -> None:
        await ack()

    handler = AsyncSlackRequestHandler(bolt)

    async def events(request: Request) -> Response:
        return await handler.handle(request)

    app = Starlette(routes=[Route("/slack/events", events, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_stub(port_file: str) -> None:
    from tests.slack_stub import SlackStub

    os.nice(10)  # it stands in for Slack's servers, which are not on this machine

    stub = SlackStub().start()
    Path(port_file).write_text(str(stub.port))
    threading.Event().wait()


# --- running them ----------------------------------------------------------------------------


@contextlib.contextmanager
def process(
    argv: list[str], env: dict[str, str], health: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=env, cwd=tempfile.gettempdir())
    try:
        if health:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.post(health, content=b"", timeout=1).status_code in (200, 401):
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv} did not start")
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hang_server() -> int:
    """A socket that accepts connections and never answers (a hung VPS)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def hung_fleet(fleet: Path, server: str, port: int) -> Path:
    """A copy of the fleet file where ``server``'s SSH and PostgreSQL ports hang."""
    text = fleet.read_text()
    start = text.index(f'name = "{server}"')
    end = text.find("[[servers]]", start)
    end = len(text) if end == -1 else end
    block = text[start:end]
    block = re.sub(r"ssh_port = \d+", f"ssh_port = {port}", block)
    block = re.sub(r"port=\d+", f"port={port}", block)
    out = fleet.with_name("fleet-hung.toml")
    out.write_text(text[:start] + block + text[end:])
    return out


async def load(
    url: str, n: int, concurrency: int, stub: str, text: str = "status acme"
) -> list[float]:
    # response_urls the stub issued (it answers 404 to any other, as Slack does)
    urls = httpx.get(stub.replace("/api/", "/_stub/response_urls"), params={"n": n}).json()
    bodies = [slash_body(text, response_url=str(u)) for u in urls]
    signed = [(b, sign(b)) for b in bodies]  # signed up front: not part of what is measured
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(signed)
    # aiohttp: a lighter client than httpx, so the load generator takes less of the machine.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def worker() -> None:
            for body, headers in queue:
                started = time.perf_counter()
                async with client.post(url, data=body.encode(), headers=headers) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - started)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if set(statuses) != {200}:
        raise RuntimeError(f"{url}: statuses {statuses}")
    return latencies


def figures(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[max(0, round(0.99 * len(ordered)) - 1)]
    return {
        "p50": statistics.median(ordered) * 1000,
        "p99": p99 * 1000,
        "max": ordered[-1] * 1000,
    }


def stub_stats(stub: str) -> dict[str, Any]:
    return dict(httpx.get(stub.replace("/api/", "/_stub/stats")).json())


def wait_replies(stub: str, want: int, timeout: float) -> tuple[int, float | None]:
    deadline = time.monotonic() + timeout
    while True:
        stats = stub_stats(stub)
        if stats["responses"] >= want or time.monotonic() > deadline:
            return stats["responses"], stats["last_at"]
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("-c", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", choices=["floor", "bare", "bare-pbr", "stub"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--stub")
    args = parser.parse_args()
    if args.serve == "floor":
        return serve_floor(args.port)
    if args.serve in ("bare", "bare-pbr"):
        return serve_bare(args.port, args.stub, args.serve == "bare-pbr")
    if args.serve == "stub":
        return serve_stub(args.stub)
    run(args.n, args.c, args.rounds)
    return None


def run(n: int, concurrency: int, rounds: int) -> None:
    from core import sandbox

    work = Path(tempfile.mkdtemp(prefix="dbops-bench-"))
    work.chmod(0o755)  # the sandbox clusters run as postgres
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "DBOPS_"))}
    env["PYTHONPATH"] = str(ROOT)
    port_file = work / "stub.port"
    print(f"sandbox: 3 servers, 15 customers in {work} ...", flush=True)
    state = sandbox.up(work / "sandbox", servers=3, customers=15, ssh=True)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in SERVERS}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(process([*ME, "--serve", "stub", "--stub", str(port_file)], env))
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            stub = f"http://127.0.0.1:{port_file.read_text()}/api/"
            urls = {name: start_server(name, stack, work, state, env, stub) for name in SERVERS}
            for name, url in urls.items():  # warm-up: connections, auth.test, SSH sessions
                measure(name, url, 50, concurrency, stub)
            # Rounds interleave the servers, so a busy moment of this machine is shared out.
            for r in range(rounds):
                for name in SERVERS[r % len(SERVERS) :] + SERVERS[: r % len(SERVERS)]:
                    f, note = measure(name, urls[name], n, concurrency, stub)
                    rows[name].append(f)
                    print(f"  round {r + 1} {name:10} {fmt(f)}{note}", flush=True)
    finally:
        sandbox.down(work / "sandbox", remove=True)
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        name: {k: statistics.median(f[k] for f in found) for k in ("p50", "p99", "cpu")}
        | {"max": max(f["max"] for f in found)}
        for name, found in rows.items()
    }
    floor, bare = summary["floor"], summary["bolt-bare"]
    print(
        f"\n{n} signed `/db status acme` per round, concurrency {concurrency}, {rounds} rounds; "
        "ack latency in ms (median of the rounds' p50 and p99; max of all):"
    )
    print("| server | p50 | p99 | max | p99 / floor | p99 / bolt-bare | CPU ms/request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, f in summary.items():
        print(
            f"| {name} | {f['p50']:.1f} | {f['p99']:.1f} | {f['max']:.1f} "
            f"| {f['p99'] / floor['p99']:.2f} | {f['p99'] / bare['p99']:.2f} | {f['cpu']:.2f} |"
        )


SERVERS = ["floor", "bolt-bare", "bolt-bare*", "dbops", "dbops-hung"]
ME = [sys.executable, str(Path(__file__).resolve())]


def start_server(
    name: str,
    stack: contextlib.ExitStack,
    work: Path,
    state: dict[str, Any],
    env: dict[str, str],
    stub: str,
) -> tuple[str, int]:
    from core.customers import customer_from_mapping, upsert_customers
    from storage.db import make_engine
    from storage.migrate import upgrade

    port = free_port()
    url = f"http://127.0.0.1:{port}/slack/events"
    if not name.startswith("dbops"):
        mode = {"floor": "floor", "bolt-bare": "bare", "bolt-bare*": "bare-pbr"}[name]
        proc = stack.enter_context(
            process([*ME, "--serve", mode, "--port", str(port), "--stub", stub], env, url)
        )
        return url, proc.pid
    fleet = Path(state["fleet"])
    if name == "dbops-hung":
        fleet = hung_fleet(fleet, "vps1", hang_server())  # acme's server
    db = work / f"{name}.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in state["customers"]])
    engine.dispose()
    server_env = {
        **env,
        "DATABASE_URL": f"sqlite:///{db}",
        "DBOPS_FLEET": str(fleet),
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": stub,
        "DBOPS_LOG_LEVEL": "CRITICAL",
    }
    argv = [sys.executable, "-m", "bot", "serve", "--port", str(port)]
    proc = stack.enter_context(process(argv, server_env, url))
    return url, proc.pid


def measure(
    name: str, server: tuple[str, int], n: int, concurrency: int, stub: str
) -> tuple[dict[str, float], str]:
    """One load run; for dbops, also waits until every reply has arrived at the stub.

    ``cpu`` is the server process's CPU time per request, the work after the ack included (not
    the sandbox's PostgreSQL and sshd): on a shared machine it is steadier than latency.
    """
    url, pid = server
    before = stub_stats(stub)["responses"]
    cpu = cpu_seconds(pid)
    started = time.monotonic()
    found = figures(asyncio.run(load(url, n, concurrency, stub)))
    note = ""
    if name.startswith("dbops"):
        got, last = wait_replies(stub, before + n, 60)
        done = (last - started) if last else float("nan")
        note = f"   replies {got - before}/{n}, the last {done:.1f}s after the first request"
    found["cpu"] = (cpu_seconds(pid) - cpu) * 1000 / n
    return found, note


def fmt(f: dict[str, float]) -> str:
    return (
        f"p50 {f['p50']:6.1f} ms  p99 {f['p99']:6.1f} ms  max {f['max']:6.1f} ms"
        f"  cpu {f['cpu']:5.2f} ms/req"
    )


if __name__ == "__main__":
    main()
