"""Emails: rendered from templates/email/<name>-subject.j2 and <name>-body.txt.j2, sent over SMTP.

Templates go through Jinja's sandboxed environment with StrictUndefined, since they see text
that people typed (an update note, a root cause): a missing value is an error, never a blank or
a ``[Customer]`` left in a customer's inbox.

``SMTP_URL``: ``smtp://[user:password@]host[:port]`` (port 25; STARTTLS when the server offers
it, then login when a user is given) or ``smtps://...`` (TLS from the start, port 465). Query
parameters: ``from=`` the sender address; ``starttls=require`` refuses a server that does not
offer STARTTLS. Nothing secret crosses a network in clear: without TLS (smtps:// or STARTTLS)
dbops neither logs in nor sends an email that carries a password (the welcome email), unless
the server is on loopback (the demo's outbox, a local Postfix relay).

Every email sent is an event ``email.sent`` with who it went to, its subject and template, and
never its body: a welcome email carries a password.

Whose emails they are comes from fleet.toml's ``[business]`` (``branding``): the company name,
support address and hours, the signature. Neutral words stand in when it is absent, which is
fine for a preview and wrong for a customer's inbox, so wherever a sender is built from
settings and the fleet, ``require_branding`` refuses SMTP_URL without a business name and
support address.
"""

from __future__ import annotations

import ipaddress
import json
import re
import smtplib
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from jinja2 import FileSystemLoader, StrictUndefined, TemplateNotFound, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from core.errors import DbopsError
from core.fleet import Business
from storage.events import EventLog
from storage.spool import record as record_event

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "email"
INCIDENT_TEMPLATES = ("investigating", "update", "resolved")
DEFAULT_ETA = "Restoring within 30 minutes"
# What emails say for a fleet without [business]: neutral, no one's name, no marketing.
DEFAULT_COMPANY = "Your database host"
DEFAULT_SIGNATURE = "The database team"
SMTP_TIMEOUT_S = 15.0
# What a template left unrendered looks like: Jinja syntax, or the SOP's [Placeholder] style
# ("[Customer]", "[secure_password]"; not a subject tag such as "[INCIDENT]").
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{%|%\}|\[(?:[A-Z][a-z]|[a-z])[A-Za-z_ ]{0,30}\]")
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")


@dataclass(frozen=True)
class Email:
    to: tuple[str, ...]
    subject: str
    body: str
    template: str
    # The body carries a secret (the welcome email's password): it never crosses a network
    # in clear (``send``).
    secret: bool = False

    def preview(self) -> str:
        """The email as a person checks it before pressing Send."""
        return f"To: {', '.join(self.to)}\nSubject: {self.subject}\n\n{self.body}"

    def as_json(self) -> dict[str, Any]:
        return {"to": list(self.to), "subject": self.subject, "template": self.template}


def branding(business: Business) -> dict[str, str]:
    """The values every email template signs with (``[business]``, or neutral defaults)."""
    return {
        "company": business.name or DEFAULT_COMPANY,
        "support_email": business.support_email or "",
        "support_hours": business.support_hours or "",
        "signature": business.signature or DEFAULT_SIGNATURE,
    }


def require_branding(smtp_url: str | None, business: Business, fleet_file: str = "") -> None:
    """Refuse to build a sender that would mail customers in someone else's name: with
    SMTP_URL set (production), fleet.toml's [business] needs a name and a support address."""
    if not smtp_url or business.branded:
        return
    where = f"fleet.toml ({fleet_file})" if fleet_file else "fleet.toml"
    missing = [f for f in ("name", "support_email") if getattr(business, f) is None]
    table = "\n".join(
        [
            "[business]",
            f"name = {json.dumps(business.name or 'Example Hosting')}",
            f"support_email = {json.dumps(business.support_email or 'support@example.com')}",
            '# optional: support_hours = "Mon-Fri 9:00-18:00 ET", signature = "The Example team"',
        ]
    )
    raise DbopsError(
        f"SMTP_URL is set, so customer emails go out, but {where} has no [business] "
        f"{' and no '.join(missing)}: the emails would not say whose they are.",
        hint=f"Add this to {where}, with your own values, and start again:\n{table}",
    )


@lru_cache(maxsize=4)
def environment(directory: str = str(TEMPLATES)) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        loader=FileSystemLoader(directory),
        autoescape=False,  # plain-text email
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(
    name: str,
    context: Mapping[str, Any],
    *,
    to: Sequence[str] = (),
    directory: Path = TEMPLATES,
    secret: bool = False,
) -> Email:
    """Render ``name`` (e.g. ``incident-investigating``) with ``context``.

    A value the template needs and ``context`` lacks, or anything left looking like a
    placeholder, is a DbopsError: such an email must not go out.
    """
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", name):
        raise DbopsError(f"{name[:40]!r} is not an email template name.")
    subject, body = _render_pair(name, context, directory)
    # The placeholder check reads the template's own words: rendered again with every text
    # value blanked, so a note that happens to contain "{{" or "[Note]" is not mistaken for one.
    plain = {k: ("v" if isinstance(v, str) and v else v) for k, v in context.items()}
    for part, text in zip(("subject", "body"), _render_pair(name, plain, directory), strict=True):
        left = _PLACEHOLDER.search(text)
        if left:
            raise DbopsError(
                f"the email {name!r} has an unrendered placeholder in its {part}: {left.group(0)!r}"
            )
    bad = [a for a in to if not _ADDRESS.fullmatch(a)]
    if bad:
        raise DbopsError(f"{bad[0][:60]!r} is not an email address.")
    return Email(tuple(to), subject, body, name, secret=secret)


def _render_pair(name: str, context: Mapping[str, Any], directory: Path) -> tuple[str, str]:
    env = environment(str(directory))
    try:
        subject = env.get_template(f"{name}-subject.j2").render(**context)
        body = env.get_template(f"{name}-body.txt.j2").render(**context)
    except TemplateNotFound as exc:
        raise DbopsError(f"no email template {exc.name!r} in {directory}.") from None
    except UndefinedError as exc:
        raise DbopsError(
            f"the email {name!r} needs a value it was not given: {exc.message}"
        ) from None
    return " ".join(subject.split()), body


@dataclass(frozen=True)
class SmtpTarget:
    secure: bool  # smtps: TLS from the first byte
    host: str
    port: int
    user: str | None
    password: str | None
    sender: str | None
    require_starttls: bool


def parse_smtp_url(url: str) -> SmtpTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise DbopsError("SMTP_URL must look like smtp://host:port or smtps://user:pass@host:port.")
    query = parse_qs(parts.query)
    try:
        port = parts.port or (465 if parts.scheme == "smtps" else 25)
    except ValueError:
        raise DbopsError("SMTP_URL has a port that is not a number.") from None
    return SmtpTarget(
        secure=parts.scheme == "smtps",
        host=parts.hostname,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        sender=query["from"][0] if query.get("from") else None,
        require_starttls=(query.get("starttls") or [""])[0] == "require",
    )


def is_loopback(host: str) -> bool:
    """A relay on this machine (the demo's outbox, a local Postfix): nothing leaves it in clear."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _cleartext_refusal(target: SmtpTarget, email: Email) -> str | None:
    """Why this send must not go on without TLS, or None when plain SMTP is acceptable."""
    if target.secure or is_loopback(target.host):
        return None
    if target.user:
        return "it would log in without TLS"
    if email.secret:
        return f"the {email.template} email carries a password"
    return None


def _message(email: Email, sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(email.to)
    msg["Subject"] = email.subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=sender.rsplit("@", 1)[-1])
    msg.set_content(email.body)
    return msg


def send(
    email: Email,
    smtp_url: str | None,
    *,
    events: EventLog,
    actor: str,
    subject: str | None = None,
    sender: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = SMTP_TIMEOUT_S,
    source: str = "dbops",
    source_id: str | None = None,
) -> dict[str, Any]:
    """Send ``email``; record ``email.sent`` (or ``email.failed``) about ``subject`` (an incident
    ref or a customer). A failure is a DbopsError saying what the server answered.

    ``source_id`` makes the email one of a kind (a maintenance notice per window, phase and
    customer): its ``email.sent`` event carries it, and an email whose event is already in the
    log is not sent again (returned as ``{"already_sent": True, ...}``)."""
    if source_id is not None:
        before = events.get(source, source_id)
        if before is not None and before.kind == "email.sent":
            return {**before.payload, "already_sent": True}
    if not smtp_url:
        raise DbopsError("no SMTP server configured.", hint="Set SMTP_URL, e.g. smtp://host:587.")
    if not email.to:
        raise DbopsError("the email has no recipient.")
    target = parse_smtp_url(smtp_url)
    from_addr = sender or target.sender or f"dbops@{socket.getfqdn()}"
    context = ssl_context or ssl.create_default_context()
    record = {**email.as_json(), "server": f"{target.host}:{target.port}"}
    try:
        smtp: smtplib.SMTP
        if target.secure:
            smtp = smtplib.SMTP_SSL(target.host, target.port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(target.host, target.port, timeout=timeout)
        with smtp:
            smtp.ehlo()
            if not target.secure:
                if smtp.has_extn("starttls"):
                    smtp.starttls(context=context)
                    smtp.ehlo()
                elif target.require_starttls:
                    raise DbopsError(f"{target.host} does not offer STARTTLS (starttls=require).")
                elif (why := _cleartext_refusal(target, email)) is not None:
                    raise DbopsError(
                        f"{target.host} offers no STARTTLS and {why}: not sent in clear. "
                        "Use smtps://, a server that offers STARTTLS, or a relay on this "
                        "machine (smtp://127.0.0.1)."
                    )
            if target.user:
                smtp.login(target.user, target.password or "")
            refused = smtp.send_message(_message(email, from_addr))
    except (smtplib.SMTPException, OSError, DbopsError) as exc:
        reason = _smtp_error(exc)
        record_event(events, "email.failed", subject, {**record, "error": reason}, actor=actor)
        raise DbopsError(
            f"could not send {email.template!r} to {', '.join(email.to)}: {reason}"
        ) from None
    delivered = [a for a in email.to if a not in refused]
    out = {**record, "delivered": delivered, "refused": sorted(refused)}
    # Best effort (storage.spool): the email went, whatever the event log does now.
    record_event(
        events, "email.sent", subject, out, actor=actor, source=source, source_id=source_id
    )
    return out


def _smtp_error(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        text = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        return f"{exc.smtp_code} {text}"[:300]
    if isinstance(exc, DbopsError):
        return exc.message[:300]
    return (str(exc) or type(exc).__name__)[:300]
