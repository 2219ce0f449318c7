"""`dbops demo` (what `make demo` runs), end to end as a new user meets it: a sandbox fleet of
its own, the shell on piped input, and an outbox where its emails land (a real SMTP server).

A welcome email is the only place a new customer's password goes; in the demo it is saved in
the outbox, readable by its owner alone, and works: the customer connects with it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from email import message_from_bytes
from pathlib import Path

import psycopg

DBOPS = Path(sys.executable).with_name("dbops")


def test_the_demo_status_restore_preview_and_provisioning_with_its_outbox() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "DBOPS_", "SMTP_", "DATABASE_", "STRIPE_"))
    }
    # Under /tmp and open to others: the sandbox's clusters run as postgres (pytest's tmp_path
    # is closed to other users, which the demo refuses with a clear message).
    demo = Path(tempfile.mkdtemp(prefix="dbops-demo-"))
    demo.chmod(0o755)
    # Provisioning typed runs nothing: it says what it will do, and its button (press 1) asks
    # for a yes before it provisions.
    script = (
        "/db status acme\n"
        "/db restore acme\n"
        "/db provision newco --plan small --email ops@newco.example.com\n"
        "press 1\n"
        "yes\n"
    )
    try:
        done = subprocess.run(
            [str(DBOPS), "demo", "--dir", str(demo)],
            input=script,
            capture_output=True,
            text=True,
            env=env,
            cwd=demo,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        out = done.stdout
        assert "dbops demo: 3 sandbox servers, 15 customers" in out
        assert "acme is online on vps1" in out
        assert "--confirm acme`" in out  # the restore preview says how to go ahead
        preview, _, pressed = out.partition("Type yes to go ahead.")
        assert "creates newco's role and database (plan small) on vps" in preview
        assert "Press Provision to go ahead" in preview and "Provisioned newco" not in preview
        assert "Provisioned newco on" in pressed
        (mail,) = (demo / "outbox").glob("*.eml")
        assert f"saved in {mail}" in out
        assert stat.S_IMODE(mail.stat().st_mode) == 0o600
        assert stat.S_IMODE((demo / "outbox").stat().st_mode) == 0o700
        message = message_from_bytes(mail.read_bytes())
        assert message["To"] == "ops@newco.example.com"
        body = message.get_payload(decode=True)
        assert isinstance(body, bytes)
        url = re.search(r"postgresql://newco:([^@\s]+)@([\d.]+):(\d+)/newco", body.decode())
        assert url is not None, body.decode()[:500]
        password, host, port = url.groups()
        assert password not in out and password not in done.stderr
        conninfo = f"host={host} port={port} dbname=newco user=newco password={password}"
        with psycopg.connect(conninfo, connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("newco",)
    finally:
        subprocess.run(
            [str(DBOPS), "sandbox", "down", "--dir", str(demo / "sandbox")],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )
        shutil.rmtree(demo, ignore_errors=True)
