"""Customer emails (SOP-201): rendered from templates, delivered to a real SMTP server.

aiosmtpd listens on loopback in the test; acme's address is ops@acme.example.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message as MailMessage
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine

from core import email as mail
from core.customers import Customer, upsert_customers
from core.errors import DbopsError
from core.fleet import Business, parse_fleet
from core.incidents import Incidents
from storage.events import EventLog
from tests.pgserver import free_port

ALICE = "U0ALICE"
NY = ZoneInfo("America/New_York")
T0 = datetime(2026, 3, 2, 14, 5, tzinfo=UTC)  # 09:05 in New York
LEFTOVER = ("{{", "}}", "{%", "[Customer]", "[Time]", "Undefined")
BUSINESS = {
    "name": "Example Hosting",
    "support_email": "help@example-hosting.com",
    "support_hours": "Mon-Fri 9:00-18:00 ET",
    "signature": "Dana at Example Hosting",
}


@dataclass
class Inbox:
    """What the SMTP server received."""

    messages: list[MailMessage] = field(default_factory=list)
    envelopes: list[Any] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.messages.append(message_from_bytes(envelope.original_content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, str]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, f"smtp://127.0.0.1:{port}?from=jeremy@costplusdb.example"
    finally:
        controller.stop()


@pytest.fixture
def desk(engine: Engine) -> Incidents:
    upsert_customers(
        engine,
        [
            Customer("acme", "vps1", "acme", "acme", "small", "ops@acme.example"),
            Customer("globex", "vps1", "globex", "globex", "small"),  # no address on record
        ],
    )
    fleet = parse_fleet(
        {"servers": [{"name": "vps1", "dsn": "host=127.0.0.1"}], "business": BUSINESS}
    )
    return Incidents(engine, EventLog(engine), fleet, tz=NY)


def body_of(msg: MailMessage) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode().replace("\r\n", "\n")  # SMTP's line ends


def test_the_investigating_email_reaches_the_customer(
    desk: Incidents, smtp: tuple[Inbox, str]
) -> None:
    inbox, url = smtp
    inc = desk.open("acme's database down", "P0", actor=ALICE, customers=["acme", "globex"], now=T0)
    (preview,) = desk.email_preview(inc.id, "investigating")
    assert preview.to == ("ops@acme.example",), "globex has no address: nothing to send it"
    sent = desk.email_send(inc.id, "investigating", url, actor=ALICE)
    assert sent[0]["delivered"] == ["ops@acme.example"]

    (msg,) = inbox.messages
    assert msg["Subject"] == "[INCIDENT] Database outage - investigating"
    assert msg["To"] == "ops@acme.example" and msg["From"] == "jeremy@costplusdb.example"
    body = body_of(msg)
    assert body == preview.body
    for line in (
        "Hi acme,",
        "We detected that your database is currently down.",
        "Status: Investigating",
        "Started: 2026-03-02 09:05 EST",
        "ETA: Restoring within 30 minutes",
        "every 15 minutes until resolved.",
        "Questions? Reply to this email or write to help@example-hosting.com"
        " (Mon-Fri 9:00-18:00 ET).",
        "- Dana at Example Hosting\nExample Hosting\n",
    ):
        assert line in body
    assert not any(left in body for left in LEFTOVER)

    (event,) = [e for e in desk.timeline(inc.id) if e.kind == "email.sent"]
    assert event.actor == ALICE
    assert event.payload["to"] == ["ops@acme.example"]
    assert event.payload["template"] == "incident-investigating"
    assert event.payload["subject"] == msg["Subject"]
    assert "body" not in event.payload and "We detected" not in str(event.payload)


def test_update_and_resolved_emails(desk: Incidents, smtp: tuple[Inbox, str]) -> None:
    inbox, url = smtp
    inc = desk.open("acme's database down", "P0", actor=ALICE, customers=["acme"], now=T0)
    note = "The disk filled up; we are moving WAL to a bigger volume. {{ not a template }}"
    desk.email_send(inc.id, "update", url, actor=ALICE, note=note)
    with pytest.raises(DbopsError, match="not resolved yet"):
        desk.email_preview(inc.id, "resolved")
    desk.resolve(inc.id, "WAL filled the disk after archiving failed", actor=ALICE,
                 now=T0 + timedelta(minutes=75))  # fmt: skip
    desk.email_send(inc.id, "resolved", url, actor=ALICE)

    update, resolved = inbox.messages
    assert update["Subject"] == "[INCIDENT] Database outage - update"
    assert note in body_of(update), "the operator's words arrive as written, never evaluated"
    assert resolved["Subject"] == "[RESOLVED] Database outage - resolved"
    body = body_of(resolved)
    for line in (
        "Your database is back online",
        "Started: 2026-03-02 09:05 EST",
        "Resolved: 2026-03-02 10:20 EST",
        "Downtime: 75m",
        "Root cause:\nWAL filled the disk after archiving failed",
    ):
        assert line in body
    assert not any(left in body for left in LEFTOVER)


@pytest.mark.parametrize("which", mail.INCIDENT_TEMPLATES)
def test_no_template_leaves_a_placeholder(which: str) -> None:
    context = {
        "customer": "acme", "incident": "inc-1", "title": "t", "started": "s", "status": "Resolved",
        "eta": "e", "note": "n", "cause": "c", "resolved": "r", "downtime": "d",
        **mail.branding(Business()),
    }  # fmt: skip
    email = mail.render(f"incident-{which}", context, to=["ops@acme.example"])
    assert not any(left in email.subject + email.body for left in LEFTOVER)


def test_a_missing_value_stops_the_email() -> None:
    with pytest.raises(DbopsError, match="needs a value it was not given"):
        mail.render("incident-investigating", {"customer": "acme"}, to=["ops@acme.example"])


def test_a_template_that_keeps_the_sops_placeholder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x-subject.j2").write_text("Hello")
    (tmp_path / "x-body.txt.j2").write_text("Hi [Customer],\n")
    with pytest.raises(DbopsError, match=r"placeholder in its body: '\[Customer\]'"):
        mail.render("x", {}, directory=tmp_path)


def test_the_sandbox_keeps_templates_in_their_lane(tmp_path: Path) -> None:
    (tmp_path / "x-subject.j2").write_text("s")
    (tmp_path / "x-body.txt.j2").write_text("{{ customer.__class__.__mro__ }}")
    with pytest.raises(Exception, match=r"unsafe|__class__"):
        mail.render("x", {"customer": "acme"}, directory=tmp_path)


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


def test_starttls_then_login(tmp_path: Path, engine: Engine) -> None:
    server_tls, client_tls = _self_signed(tmp_path)
    inbox, port = Inbox(), free_port()
    logins: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth: Any) -> Any:
        assert isinstance(auth, LoginPassword)
        logins.append((auth.login.decode(), auth.password.decode()))
        return AuthResult(success=auth.password == b"p@ss word", handled=False)

    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_tls,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    controller.start()
    events = EventLog(engine)
    email = mail.render(
        "incident-investigating",
        {"customer": "acme", "started": "now", "eta": "soon", **mail.branding(Business())},
        to=["ops@acme.example"],
    )
    try:
        url = f"smtp://relay:p%40ss%20word@127.0.0.1:{port}?from=ops@costplusdb.example"
        out = mail.send(email, url, events=events, actor=ALICE, subject="acme",
                        ssl_context=client_tls)  # fmt: skip
        bad = url.replace("p%40ss", "wrong")
        with pytest.raises(DbopsError, match="535"):
            mail.send(email, bad, events=events, actor=ALICE, subject="acme",
                      ssl_context=client_tls)  # fmt: skip
    finally:
        controller.stop()
    assert logins[0] == ("relay", "p@ss word")
    assert len(inbox.messages) == 1 and out["delivered"] == ["ops@acme.example"]
    sent, failed = events.query(kind="email.sent"), events.query(kind="email.failed")
    assert len(sent) == 1 and len(failed) == 1
    assert "word" not in str(sent[0].payload) + str(failed[0].payload), "no password in the log"


def test_an_unreachable_server_is_a_clear_error_and_an_event(engine: Engine) -> None:
    events = EventLog(engine)
    email = mail.render(
        "incident-investigating",
        {"customer": "acme", "started": "now", "eta": "soon", **mail.branding(Business())},
        to=["ops@acme.example"],
    )
    with pytest.raises(DbopsError, match="could not send 'incident-investigating'"):
        mail.send(email, f"smtp://127.0.0.1:{free_port()}", events=events, actor=ALICE, timeout=2)
    (failed,) = events.query(kind="email.failed")
    assert failed.payload["to"] == ["ops@acme.example"]
    with pytest.raises(DbopsError, match="SMTP_URL"):
        mail.send(email, None, events=events, actor=ALICE)
