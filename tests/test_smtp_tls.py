"""SMTP never carries a login or a password across a network in clear. An SMTP server on this
machine's own non-loopback address (a real network interface) that offers no STARTTLS gets no
login and no welcome email: a clear error and an event instead. A relay on loopback (the demo's
outbox, a local Postfix) may stay plain."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy import Engine

from core import email as mail
from core.errors import DbopsError
from core.fleet import Business, Fleet
from core.remote import RunnerPool
from storage.events import EventLog
from tests.pgserver import free_port
from tests.test_provisioning import (  # noqa: F401  (fixtures)
    CAROL,
    Inbox,
    newcomer,
    pool,
    provisioner,
    sandbox_customers,
    server_state,
    smtp,
)


def _network_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for word in out:
        try:
            addr = ipaddress.ip_address(word)
        except ValueError:
            continue
        if addr.version == 4 and not addr.is_loopback:
            return word
    return None


@dataclass
class PlainServer:
    """What a plain (no STARTTLS) SMTP server saw: logins and messages."""

    host: str
    port: int
    inbox: Inbox
    logins: list[tuple[str, str]] = field(default_factory=list)

    def url(self, user: str | None = None) -> str:
        auth = f"{user}:hunter2@" if user else ""
        return f"smtp://{auth}{self.host}:{self.port}?from=ops@example-hosting.com"


@pytest.fixture
def plain_server() -> Iterator[PlainServer]:
    host = _network_address()
    if host is None:
        pytest.skip("this machine has no non-loopback IPv4 address to listen on")
    server = PlainServer(host, free_port(), Inbox())

    def authenticator(srv: Any, session: Any, envelope: Any, mechanism: str, auth: Any) -> Any:
        assert isinstance(auth, LoginPassword)
        server.logins.append((auth.login.decode(), auth.password.decode()))
        return AuthResult(success=True, handled=False)

    controller = Controller(
        server.inbox,
        hostname=host,
        port=server.port,
        authenticator=authenticator,
        auth_require_tls=False,  # it would take a password in clear: dbops must not offer one
    )
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


def _email(*, secret: bool) -> mail.Email:
    name, context = "incident-investigating", {"customer": "acme", "started": "now", "eta": "soon"}
    return mail.render(
        name, {**context, **mail.branding(Business())}, to=["ops@acme.example"], secret=secret
    )


def test_no_login_across_the_network_without_tls(
    plain_server: PlainServer, sqlite_engine: Engine
) -> None:
    events = EventLog(sqlite_engine)
    with pytest.raises(DbopsError, match="offers no STARTTLS and it would log in without TLS"):
        mail.send(
            _email(secret=False), plain_server.url("relay"), events=events, actor=CAROL,
            subject="acme",
        )  # fmt: skip
    assert plain_server.logins == [] and plain_server.inbox.messages == []
    (failed,) = events.query(kind="email.failed")
    assert "STARTTLS" in failed.payload["error"] and "hunter2" not in str(failed.payload)


def test_an_email_without_secrets_or_login_may_go_plain(
    plain_server: PlainServer, sqlite_engine: Engine
) -> None:
    out = mail.send(
        _email(secret=False), plain_server.url(), events=EventLog(sqlite_engine), actor=CAROL,
        subject="acme",
    )  # fmt: skip
    assert out["delivered"] == ["ops@acme.example"] and len(plain_server.inbox.messages) == 1


def test_a_password_never_crosses_the_network_in_clear(
    plain_server: PlainServer, sqlite_engine: Engine
) -> None:
    with pytest.raises(DbopsError, match="carries a password"):
        mail.send(
            _email(secret=True), plain_server.url(), events=EventLog(sqlite_engine),
            actor=CAROL, subject="acme",
        )  # fmt: skip
    assert plain_server.inbox.messages == []


def test_a_loopback_relay_may_stay_plain(
    smtp: tuple[Inbox, str],  # noqa: F811
    sqlite_engine: Engine,
) -> None:
    inbox, url = smtp
    mail.send(_email(secret=True), url, events=EventLog(sqlite_engine), actor=CAROL, subject="acme")
    assert len(inbox.messages) == 1
    assert mail.is_loopback("127.0.0.1") and mail.is_loopback("::1")
    assert mail.is_loopback("localhost") and not mail.is_loopback("192.0.2.2")


def test_the_welcome_email_is_refused_rather_than_sent_in_clear(
    plain_server: PlainServer,
    sqlite_engine: Engine,
    sandbox_fleet: Fleet,
    pool: RunnerPool,  # noqa: F811
    newcomer: str,  # noqa: F811
    sandbox: dict[str, Any],
) -> None:
    prov = provisioner(sqlite_engine, sandbox_fleet, pool, plain_server.url())
    with pytest.raises(DbopsError, match="stopped at welcome") as refused:
        prov.provision(newcomer, "small", "vps1", email="dba@newco.example.com", actor=CAROL)
    assert "carries a password" in str(refused.value) or "STARTTLS" in str(refused.value)
    assert plain_server.inbox.messages == []
    job = prov.job(newcomer)
    assert job is not None and job.welcome == "failed"
    failed = EventLog(sqlite_engine).query(kind="email.failed")
    assert failed and "STARTTLS" in failed[-1].payload["error"]
