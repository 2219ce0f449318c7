"""`/db backups acme` lists acme's backups; `/db backup acme` (operators) takes one now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.commands.roles import Denied, Roles
from bot.commands.router import Invocation, Router, UsageError
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import Fleet
from storage.db import make_engine
from storage.migrate import upgrade
from tests.bot_kit import make_router, runtime
from tests.test_blocks_contract import check_contract


@pytest.fixture
def router(sandbox: dict[str, Any], sandbox_fleet: Fleet, tmp_path: Path) -> Router:
    engine = make_engine(f"sqlite:///{tmp_path / 'dbops.db'}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    rt = runtime(engine, sandbox_fleet, timezone="America/New_York")
    return make_router(rt, Roles(frozenset({"U_ALICE"})))


def _say(router: Router, user: str, text: str) -> Any:
    reply = router.run(Invocation(actor=user, surface="shell", text=text))
    assert reply is not None
    check_contract(text, reply)
    return reply


def test_list_then_take_a_backup(router: Router, sandbox_backups_kept: None) -> None:
    before = _say(router, "U_BOB", "backups acme")
    assert "acme:" in before.text and "complete" in before.text
    (button,) = before.buttons()
    assert button.value == "backup acme"
    with pytest.raises(Denied):
        _say(router, "U_BOB", "backup acme")
    taken = _say(router, "U_ALICE", "backup acme")
    assert taken.text.startswith("Backed up acme: ")
    stamp = taken.text.split(": ", 1)[1].split(",")[0]
    after = _say(router, "U_BOB", "backups acme")
    assert f"newest {stamp}" in after.text
    assert router.events.query(kind="auth.denied")
    with pytest.raises(UsageError):
        _say(router, "U_ALICE", "backup acme; rm -rf /")
