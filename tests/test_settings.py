"""Settings: every variable typed; a bad value names the variable and what it expects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.errors import DbopsError
from core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_match_the_design() -> None:
    s = load_settings()
    assert s.database_url == "sqlite:///dbops.db"
    assert s.timezone == "America/New_York"
    assert s.slack_bot_token is None


@pytest.mark.parametrize(
    ("var", "value", "expect"),
    [
        ("DBOPS_OPERATORS", "U1ALICE,not a user", "DBOPS_OPERATORS: 'not a user' is not a Slack"),
        ("TIMEZONE", "Mars/Olympus", "TIMEZONE: expected an IANA time zone"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL: expected sqlite:///path or postgresql"),
        ("SMTP_URL", "http://mail", "SMTP_URL: expected smtp://"),
        ("SLACK_API_URL", "not a url", "SLACK_API_URL"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expect: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(DbopsError) as exc:
        load_settings()
    assert expect in str(exc.value)


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-very-secret")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_secret")
    s = load_settings()
    assert "very-secret" not in repr(s) and "sk_test_secret" not in str(s.model_dump())
    assert s.slack_bot_token is not None
    assert s.slack_bot_token.get_secret_value() == "xoxb-very-secret"


def test_env_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPS_CHANNEL=#ops-test\nDBOPS_ADMINS=U_CAROL\n")
    s = load_settings()
    assert s.ops_channel == "#ops-test"
    assert s.dbops_admins == ["U_CAROL"]


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assert {name.upper() for name in Settings.model_fields} <= listed
