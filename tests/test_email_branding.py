"""Customer emails speak for the operator's own business, and state the SSL the server gives.

fleet.toml's [business] (name, support address and hours, signature) signs every customer
email; without it the words are neutral, and with SMTP_URL set (production) a sender refuses to
start, saying what to add. The welcome email's SSL line and connection string follow what the
customer's own connection negotiated (a real cluster with SSL on, here) or the server's ``ssl``
in fleet.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from core import email as mail
from core.errors import DbopsError
from core.fleet import Business, Fleet, Server, parse_fleet
from core.provisioning import Provisioner, ssl_policy
from core.sandbox import DEMO_BUSINESS
from storage.events import EventLog
from tests.pgserver import free_port, throwaway_cluster
from tests.test_email import _self_signed

DBOPS = Path(sys.executable).with_name("dbops")
THE_MANUALS = ("CostPlusDB", "Jeremy", "jeremy@", "intentsolutions", "transparent pricing")
SMTP = "smtp://127.0.0.1:2525?from=dbops@example-hosting.com"
EXAMPLE = {
    "name": "Example Hosting",
    "support_email": "help@example-hosting.com",
    "support_hours": "Mon-Fri 9:00-18:00 ET",
    "signature": "Dana at Example Hosting",
}


def fleet_with(business: dict[str, Any] | None = None, **server: Any) -> Fleet:
    data: dict[str, Any] = {"servers": [{"name": "vps1", "dsn": "host=127.0.0.1", **server}]}
    if business is not None:
        data["business"] = business
    return parse_fleet(data)


def welcome(business: Business, ssl: str) -> mail.Email:
    query = "?sslmode=require" if ssl != "off" else ""
    url = f"postgresql://newco:s3cret-Pw@db1.example-hosting.com:6432/newco{query}"
    context = {
        **mail.branding(business),
        "customer": "newco", "host": "db1.example-hosting.com", "port": 6432,
        "database": "newco", "user": "newco", "password": "s3cret-Pw", "ssl": ssl,
        "connection_string": url,
    }  # fmt: skip
    return mail.render("welcome", context, to=["ops@newco.example.com"])


INCIDENT = {"customer": "acme", "incident": "inc-1", "title": "t", "started": "s",
            "status": "Resolved", "eta": "e", "note": "", "cause": "c", "resolved": "r",
            "downtime": "d"}  # fmt: skip


def test_every_customer_email_speaks_for_the_business_in_fleet_toml() -> None:
    business = fleet_with(EXAMPLE).business
    email = welcome(business, "require")
    assert email.subject == "Example Hosting: your database is ready"
    assert "Support: help@example-hosting.com (Mon-Fri 9:00-18:00 ET)\n" in email.body
    assert email.body.endswith("\n- Dana at Example Hosting\nExample Hosting\n")
    for which in mail.INCIDENT_TEMPLATES:
        got = mail.render(f"incident-{which}", {**INCIDENT, **mail.branding(business)})
        assert "write to help@example-hosting.com (Mon-Fri 9:00-18:00 ET)." in got.body, which
        assert got.body.endswith("\n- Dana at Example Hosting\nExample Hosting\n"), which
    for text in [email.subject, email.body]:
        assert not any(word in text for word in THE_MANUALS), text


def test_without_a_business_table_the_words_are_neutral() -> None:
    business = fleet_with().business
    assert not business.branded
    email = welcome(business, "prefer")
    assert email.subject == "Your database host: your database is ready"
    assert "Support: reply to this email\n" in email.body
    assert email.body.endswith("Questions? Reply to this email.\n\n- The database team\n"
                               "Your database host\n")  # fmt: skip
    update = mail.render("incident-update", {**INCIDENT, **mail.branding(business)})
    assert "Questions? Reply to this email.\n\n- The database team\n" in update.body
    for text in [email.subject, email.body, update.body]:
        assert not any(word in text for word in THE_MANUALS), text
        assert "Support: " not in text or "Support: reply to this email" in text


@pytest.mark.parametrize(
    ("ssl", "line", "query"),
    [
        ("require", "SSL: required", "?sslmode=require"),
        ("prefer", "SSL: available (sslmode=require recommended)", "?sslmode=require"),
        ("off", "SSL: not offered by this server", ""),
    ],
)
def test_the_welcome_ssl_line_says_what_the_server_does(ssl: str, line: str, query: str) -> None:
    email = welcome(fleet_with(EXAMPLE).business, ssl)
    assert f"\n{line}\n" in email.body
    assert f"@db1.example-hosting.com:6432/newco{query}\n" in email.body
    assert "Required (enforce" not in email.body


@pytest.mark.parametrize(
    ("configured", "encrypted", "expected"),
    [
        (None, True, "prefer"),  # offered; whether a hostssl-only rule applies is not readable
        (None, False, "off"),
        ("require", True, "require"),
        ("prefer", True, "prefer"),
        ("off", False, "off"),
        ("require", False, "error"),  # the file promises SSL the server does not offer
        ("prefer", False, "error"),
        ("off", True, "error"),
    ],
)
def test_ssl_policy_from_the_file_checked_against_the_connection(
    configured: str | None, encrypted: bool, expected: str
) -> None:
    server = fleet_with(ssl=configured).servers[0]
    if expected == "error":
        with pytest.raises(DbopsError, match=r"fleet.toml says ssl = '\w+' for vps1"):
            ssl_policy(server, encrypted, 6432)
    else:
        assert ssl_policy(server, encrypted, 6432) == expected


@pytest.fixture(scope="module")
def ssl_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real cluster with SSL on (a self-signed certificate) and a customer ``newco``."""
    certs = tmp_path_factory.mktemp("certs")
    _self_signed(certs)
    with throwaway_cluster() as admin:
        with psycopg.connect(admin, autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
            assert row is not None
            data = Path(row[0])
            for name, target in (("cert.pem", "server.crt"), ("key.pem", "server.key")):
                shutil.copy(certs / name, data / target)
                (data / target).chmod(0o600)
                if os.geteuid() == 0:
                    shutil.chown(data / target, "postgres", "postgres")
            conn.execute("ALTER SYSTEM SET ssl = on")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("CREATE ROLE newco LOGIN PASSWORD 'newco-pw'")
            conn.execute("CREATE DATABASE newco OWNER newco")
        yield admin


@pytest.mark.parametrize(("configured", "expected"), [(None, "prefer"), ("require", "require")])
def test_a_server_offering_ssl_is_seen_by_the_connection_test(
    ssl_cluster: str, sqlite_engine: Engine, configured: str | None, expected: str
) -> None:
    port = int(psycopg.conninfo.conninfo_to_dict(ssl_cluster)["port"] or 0)
    server = Server(name="vps1", dsn=f"host=127.0.0.1 port={port} user=postgres", ssl=configured)
    fleet = parse_fleet({"servers": [server.model_dump()], "business": EXAMPLE})
    p = Provisioner(sqlite_engine, EventLog(sqlite_engine), fleet, smtp_url=None)
    for _ in range(50):  # the reload that turned SSL on is asynchronous
        host, got_port, ssl = p._connection_test(fleet.servers[0], "newco", "newco-pw", port)
        if ssl == expected:
            break
        time.sleep(0.1)
    assert (host, got_port, ssl) == ("127.0.0.1", port, expected)
    off = fleet.model_copy(update={"servers": [fleet.servers[0].model_copy(update={"ssl": "off"})]})
    with pytest.raises(DbopsError, match="was encrypted"):
        Provisioner(sqlite_engine, EventLog(sqlite_engine), off, smtp_url=None)._connection_test(
            off.servers[0], "newco", "newco-pw", port
        )


def test_a_sender_with_smtp_but_no_business_is_refused(sqlite_engine: Engine) -> None:
    events = EventLog(sqlite_engine)
    with pytest.raises(DbopsError) as refused:
        Provisioner(sqlite_engine, events, fleet_with(), smtp_url=SMTP)
    said = str(refused.value)
    assert "SMTP_URL is set" in said and "[business] name and no support_email" in said
    assert '[business]\nname = "Example Hosting"\nsupport_email = "support@example.com"' in said
    # Only what is missing is asked for; what is there is kept.
    with pytest.raises(DbopsError, match=r"has no \[business\] support_email:") as half:
        mail.require_branding(SMTP, fleet_with({"name": "Acme DB"}).business, "/etc/fleet.toml")
    assert "Add this to fleet.toml (/etc/fleet.toml)" in str(half.value)
    assert 'name = "Acme DB"' in str(half.value)
    # Without SMTP_URL nothing is sent, so nothing is refused; with a business, all is well.
    Provisioner(sqlite_engine, events, fleet_with(), smtp_url=None)
    Provisioner(sqlite_engine, events, fleet_with(EXAMPLE), smtp_url=SMTP)
    mail.require_branding(SMTP, fleet_with(DEMO_BUSINESS).business)


@pytest.mark.parametrize(
    ("business", "error"),
    [
        ({"support_email": "support at example"}, "business.support_email: 'support at"),
        ({"name": "  "}, "business.name: cannot be empty"),
        ({"signature": "Dana\nCEO"}, "business.signature: must be one line"),
        ({"tagline": "Cheapest in town!"}, "business.tagline: unknown field"),
    ],
)
def test_a_bad_business_table_names_the_field(business: dict[str, Any], error: str) -> None:
    with pytest.raises(DbopsError, match=error.replace("(", r"\(")):
        fleet_with(business)


def test_dbops_serve_stops_at_start_up_when_emails_would_go_out_unbranded(
    tmp_path: Path,
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[servers]]\nname = "vps1"\ndsn = "host=127.0.0.1"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLACK_", "DBOPS_", "SMTP_", "DATABASE_", "STRIPE_"))}  # fmt: skip
    env |= {"DBOPS_FLEET": str(fleet), "SMTP_URL": SMTP,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'dbops.db'}"}  # fmt: skip
    argv = [str(DBOPS), "serve", "--port", str(free_port())]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "[business] name and no support_email" in done.stderr
    assert f"Add this to fleet.toml ({fleet})" in done.stderr
    # With the table added, start-up gets past the check (the shell, reading no input, ends).
    fleet.write_text(fleet.read_text() + '\n[business]\nname = "Example Hosting"\n'
                     'support_email = "help@example-hosting.com"\n')  # fmt: skip
    shell = subprocess.run([str(DBOPS), "shell"], env=env, cwd=tmp_path, input="",
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert shell.returncode == 0, shell.stderr[-2000:]
