"""Every setting dbops reads, in one typed object.

Values come from the environment, then from ``.env`` when present. Secrets are ``SecretStr`` so
they print as ``**********``. ``load_settings`` turns a bad value into a DbopsError that names the
variable and what it expects, so start-up stops with one readable line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.errors import DbopsError
from storage.eventkeys import BadEventKey, Keyring

SLACK_USER_ID = r"^[UW][A-Z0-9_]{2,}$"


def _user_ids(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    # A variable set to the empty string counts as unset: a copied .env.example leaves many
    # empty (`SLACK_APP_TOKEN=` must not turn on Socket Mode with an empty token).
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        case_sensitive=False,
    )

    database_url: str = Field(
        "sqlite:///dbops.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    dbops_fleet: Path | None = Field(None, description="path of fleet.toml")
    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_api_url: AnyHttpUrl = Field(AnyHttpUrl("https://slack.com/api/"))
    ops_channel: str = "#db-ops"
    dbops_operators: Annotated[list[str], NoDecode] = Field(default_factory=list)
    dbops_admins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    stripe_api_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: AnyHttpUrl | None = None
    alerts_token: SecretStr | None = None
    smtp_url: str | None = Field(None, description="smtp://user:pass@host:port or smtps://...")
    timezone: str = "America/New_York"
    dbops_events_key: SecretStr | None = Field(
        None, description="the event log's key (evk_...), or the path of a file of keys"
    )
    dbops_checkpoints: Path | None = Field(
        None, description="file that event-log checkpoints are appended to"
    )
    dbops_spool: Path | None = Field(
        None, description="file that events are kept in while the event log is down"
    )

    @field_validator("dbops_operators", "dbops_admins", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        ids = _user_ids(value)
        for uid in ids or []:
            if not re.fullmatch(SLACK_USER_ID, uid):
                raise ValueError(
                    f"{uid!r} is not a Slack user id; expected ids like U012ABCDEF, comma-separated"
                )
        return ids

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql+psycopg://", "postgresql://")):
            raise ValueError("expected sqlite:///path or postgresql+psycopg://user@host/db")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("expected an IANA time zone such as America/New_York") from exc
        return value

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp(cls, value: str | None) -> str | None:
        if value and not value.startswith(("smtp://", "smtps://")):
            raise ValueError("expected smtp://host:port or smtps://user:pass@host:port")
        return value

    @field_validator("dbops_events_key")
    @classmethod
    def _check_events_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                Keyring.load(value.get_secret_value())
            except BadEventKey as exc:  # its message never holds key material
                raise ValueError(
                    f"{exc}; expected a key made by `dbops events keygen` (evk_...), or the path "
                    "of a file of such keys, one a line, oldest first"
                ) from None
        return value

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def spool_path(self) -> Path:
        """Where events wait while the event log is down (storage/spool.py): DBOPS_SPOOL, else
        beside a SQLite DATABASE_URL's file (``dbops.db`` -> ``dbops.db.spool``), else in the
        user's state directory (``$XDG_STATE_HOME/dbops``, default ``~/.local/state/dbops``),
        one file per database so two dbops never flush into each other's log."""
        if self.dbops_spool is not None:
            return self.dbops_spool
        url = urlsplit(self.database_url)
        if url.scheme.startswith("sqlite"):
            path = unquote(url.path)[1:]  # sqlite:///rel.db -> rel.db, sqlite:////abs -> /abs
            if path and path != ":memory:":
                return Path(path).with_name(Path(path).name + ".spool")
            name = "events-spool-memory.sqlite"
        else:
            database = re.sub(r"[^A-Za-z0-9_.-]", "_", url.path.strip("/"))[:40] or "db"
            where = f"{url.username or ''}@{url.hostname or ''}:{url.port or ''}{url.path}"
            tag = hashlib.sha256(where.encode()).hexdigest()[:8]
            name = f"events-spool-{database}-{tag}.sqlite"
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "dbops" / name

    def events_keyring(self) -> Keyring | None:
        """The event log's keys (storage/eventkeys.py), or None when the log is unkeyed."""
        if self.dbops_events_key is None:
            return None
        try:
            return Keyring.load(self.dbops_events_key.get_secret_value())
        except BadEventKey as exc:  # the file changed since start-up
            raise DbopsError(f"Bad configuration: DBOPS_EVENTS_KEY: {exc}") from None


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, or raise a DbopsError naming each bad variable and what it expects."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            var = str(err["loc"][0]).upper() if err["loc"] else "?"
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{var}: {msg}")
        raise DbopsError("Bad configuration: " + "; ".join(problems)) from None
