"""Shell metacharacters, quotes, unicode and 10 KB strings as customer or server names: a clear
error, and nothing run (no remote command, no query) — against the real sandbox fleet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.customers import customer_from_mapping, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.ops import Ops
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade

# What an injected command would leave behind: a path of this run's own, so a /tmp/x some other
# tool made cannot fail the test (nor hide a real injection).
MARKER = f"/tmp/dbops-hostile-{os.getpid()}"

HOSTILE = st.one_of(
    st.text(min_size=1, max_size=80),
    st.sampled_from(
        [
            "acme; rm -rf /",
            "acme' OR '1'='1",
            f"$(touch {MARKER})",
            "`id`",
            "acme\n",
            "ácme",
            "\uff21\uff23\uff2d\uff25",
            "acme\x00",
            "x" * 10_000,
            "../../etc/passwd",
            "\u00b9",
            "inc-\u0663",
            "acme -v",
        ]
    ),
    st.text(alphabet="$`;|&<>'\"\\ (){}*?!~#\n\t", min_size=1, max_size=30).map(lambda s: "a" + s),
)


@pytest.fixture(scope="module")
def ops(
    sandbox: dict[str, Any], sandbox_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Ops:
    path = tmp_path_factory.mktemp("hostile") / "dbops.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    return Ops(sandbox_fleet, engine, EventLog(engine))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=HOSTILE)
def test_hostile_customer_or_server_names_run_nothing(ops: Ops, name: str) -> None:
    known = {c.name for c in ops.customers()} | {s.name for s in ops.fleet.servers}
    if name in known:
        return
    before = ops.events.count()
    for call in (ops.status, ops.fleet.server, ops.log):
        with pytest.raises(DbopsError) as exc:
            call(name)
        message = str(exc.value)
        assert len(message) < 300, "the error echoes the whole input"
        assert "Traceback" not in message
    assert ops.events.count() == before, "a rejected name reached a runner"
    assert not Path(MARKER).exists()
