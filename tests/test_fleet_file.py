"""fleet.toml: a good file loads with Debian defaults; a bad one names the field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from core.errors import DbopsError, NotFound
from core.fleet import load_fleet

GOOD = """
[[servers]]
name = "vps1"
host = "10.0.0.11"
dsn = "host=10.0.0.11 user=dbops_monitor dbname=postgres"

[[servers]]
name = "vps2"
host = "10.0.0.12"
dsn = "host=10.0.0.12 user=dbops_monitor dbname=postgres"
restart_command = "systemctl restart postgresql@15-main"

[plans.small]
ram_mb = 1024
storage_gb = 10
connection_limit = 20
price_usd_month = 29

[thresholds.backends]
warn = "80%"

[oncall]
primary = "U_ALICE"
secondary = "U_CAROL"

[escalation]
ack_timeout = "5m"
channel_after = "15m"
repeat = 2
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_good_file_loads_with_defaults(tmp_path: Path) -> None:
    fleet = load_fleet(_write(tmp_path, GOOD))
    vps1 = fleet.server("vps1")
    assert vps1.restart_command == "pg_ctlcluster 15 main restart"
    assert vps1.argv(fleet.server("vps2").restart_command) == [
        "systemctl",
        "restart",
        "postgresql@15-main",
    ]
    assert fleet.threshold("backends") == {"warn": "80%", "crit": "95%"}
    assert fleet.escalation.ack_timeout == timedelta(minutes=5)
    assert fleet.plan("small").connection_limit == 20


def test_unknown_server_suggests_the_closest(tmp_path: Path) -> None:
    fleet = load_fleet(_write(tmp_path, GOOD))
    with pytest.raises(NotFound, match=r"no server 'vps3'.*'vps1'"):
        fleet.server("vps3")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (('name = "vps2"', 'name = "vps1"'), "repeated: vps1"),
        (("repeat = 2", 'repeat = "often"'), "escalation.repeat"),
        (('ack_timeout = "5m"', 'ack_timeout = "soon"'), "escalation.ack_timeout: 'soon' is not"),
        (("ram_mb = 1024", "ram_mb = -1"), "plans.small.ram_mb"),
        (('host = "10.0.0.12"', 'hots = "10.0.0.12"'), "servers[1].hots: unknown field"),
        (('name = "vps1"', 'name = "VPS 1; rm -rf /"'), "servers[0].name"),
        (
            (
                'restart_command = "systemctl restart postgresql@15-main"',
                'restart_command = "echo \'unterminated"',
            ),
            "servers[1].restart_command",
        ),
    ],
)
def test_bad_file_names_the_field(tmp_path: Path, patch: tuple[str, str], message: str) -> None:
    with pytest.raises(DbopsError) as exc:
        load_fleet(_write(tmp_path, GOOD.replace(*patch, 1)))
    assert message in str(exc.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(DbopsError, match="DBOPS_FLEET"):
        load_fleet(tmp_path / "nope.toml")
    with pytest.raises(DbopsError, match="not valid TOML"):
        load_fleet(_write(tmp_path, "[[servers]\nname="))
