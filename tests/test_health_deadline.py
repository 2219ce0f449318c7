"""A server that hangs costs the report nothing but that server: the report comes back by its
deadline, the hung server is crit, every other server reads as it is.

"Hangs" is a socket that accepts the connection and then never says a word, put in place of one
server's SSH port (or PostgreSQL port) in a copy of the sandbox fleet.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from core.customers import Customer, customer_from_mapping
from core.fleet import Fleet, parse_fleet
from core.remote import RunnerPool
from core.report import build_report
from tests.pgserver import free_port

# Long enough for the healthy servers' cold SSH connects and commands on a busy 2-core machine
# (2 s was not, once, with another suite running beside this one); the hung one waits it out.
DEADLINE = 3.0
# What assembling the answer may add to the deadline on a slow, busy test machine.
SLACK = 0.5

# Its claim is about time: a healthy server answers within the deadline while another hangs.
# Run alone after the parallel run (make test), where another worker's CPU cannot steal it.
pytestmark = pytest.mark.solo


class SilentServer:
    """Accepts TCP connections and never answers (a hung sshd, a stopped postmaster)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def customers(sandbox: dict[str, Any]) -> list[Customer]:
    return [customer_from_mapping(c) for c in sandbox["customers"]]


def replaced(fleet: Fleet, name: str, **changes: Any) -> Fleet:
    data = fleet.model_dump(exclude={"base_dir"})
    for server in data["servers"]:
        if server["name"] == name:
            server.update(changes)
    return parse_fleet(data, base_dir=fleet.base_dir)


def timed_report(fleet: Fleet, customers: list[Customer]) -> tuple[dict[str, Any], float]:
    pool = RunnerPool(fleet)
    started = time.monotonic()
    report = build_report(fleet, customers, pool, deadline_s=DEADLINE)
    took = time.monotonic() - started
    # Closing waits for a connect still stuck on the silent server: not this test's business.
    threading.Thread(target=pool.close, daemon=True).start()
    return report, took


def entry(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["servers"] if s["name"] == name)


def verdicts(checks: list[dict[str, Any]]) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in checks}


def others_healthy(report: dict[str, Any], hung: str) -> None:
    for server in report["servers"]:
        if server["name"] == hung:
            continue
        assert server["reachable"] and server["postgres"] == "up", server
        bad = {k: v for k, v in verdicts(server["checks"]).items() if v in ("warn", "crit")}
        assert not bad, (server["name"], bad)
    for db in report["databases"]:
        if db["server"] != hung:
            assert db["online"], db
            assert verdicts(db["checks"])["backup_age"] == "ok", db


def test_hung_sshd_is_crit_and_the_report_is_on_time(
    sandbox_fleet: Fleet, customers: list[Customer], silent: SilentServer
) -> None:
    fleet = replaced(sandbox_fleet, "vps2", transport="ssh", ssh_port=silent.port)
    report, took = timed_report(fleet, customers)
    assert took < DEADLINE + SLACK, took
    vps2 = entry(report, "vps2")
    assert not vps2["reachable"]
    assert vps2["postgres"] == "up"  # PostgreSQL itself still answers
    got = verdicts(vps2["checks"])
    assert got["disk_space"] == "crit" and got["logfile"] == "crit"
    assert got["connection"] == "ok"
    for db in report["databases"]:
        if db["server"] == "vps2":
            assert verdicts(db["checks"])["backup_age"] == "crit"
    others_healthy(report, "vps2")
    assert report["summary"]["servers_up"] == 2
    assert report["summary"]["verdict"] == "crit"


def test_hung_postgres_is_crit_and_the_report_is_on_time(
    sandbox_fleet: Fleet, customers: list[Customer], silent: SilentServer
) -> None:
    dsn = f"host=127.0.0.1 port={silent.port} user=dbops_monitor dbname=postgres"
    fleet = replaced(sandbox_fleet, "vps3", dsn=dsn)
    report, took = timed_report(fleet, customers)
    assert took < DEADLINE + SLACK, took
    vps3 = entry(report, "vps3")
    assert vps3["reachable"] and vps3["postgres"] == "down"
    assert verdicts(vps3["checks"])["connection"] == "crit"
    for db in report["databases"]:
        if db["server"] == "vps3":
            assert not db["online"]
    others_healthy(report, "vps3")
    assert report["summary"]["databases_online"] == report["summary"]["databases_total"] - 2


def test_refused_ssh_is_crit_at_once(sandbox_fleet: Fleet, customers: list[Customer]) -> None:
    fleet = replaced(sandbox_fleet, "vps1", transport="ssh", ssh_port=free_port())
    report, took = timed_report(fleet, customers)
    assert took < DEADLINE
    vps1 = entry(report, "vps1")
    assert not vps1["reachable"]
    disk = next(c for c in vps1["checks"] if c["name"] == "disk_space")
    assert disk["verdict"] == "crit" and "refused" in disk["detail"]
    others_healthy(report, "vps1")
