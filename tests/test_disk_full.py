"""A backup path whose disk is full (`dbops sandbox break disk-full vps1`): the path is on a
small tmpfs of its own, filled to the last byte, so df, pg_dump and the status files meet a real
ENOSPC. health's disk_space is crit for it at once; the nightly run refuses that server's dumps
as crit before writing a byte, backs up every other server's customers, and works again after
heal. A disk that fills while a dump runs (the estimate passed; something else took the space)
leaves no partial dump behind and the failure is recorded as crit.

Mounting needs root (CAP_SYS_ADMIN): where it is refused these tests are skipped with the
reason mount gave.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

import core.backups as backups_mod
import core.backups.dump
import core.backups.server
from core import health
from core import sandbox as sandbox_mod
from core.backups import GLOBALS, Backups
from core.customers import Customer, customer_from_mapping, upsert_customers
from core.errors import DbopsError
from core.fleet import Fleet
from core.remote import LocalRunner, RunnerPool
from storage.events import EventLog
from tests.test_backups import restore_server_logs  # noqa: F401  (autouse: server logs kept)

FULL = "vps1"
Full = Callable[[str], dict[str, Any]]


def _spec(sandbox: dict[str, Any], server: str) -> dict[str, Any]:
    return next(s for s in sandbox["servers"] if s["name"] == server)


def _backup_path(sandbox: dict[str, Any], server: str) -> Path:
    return Path(_spec(sandbox, server)["backup_path"])


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the disk-full filler left out) by relative path: its sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != sandbox_mod.DISK_FULL_FILLER:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _skip_if_not_mountable(message: str) -> None:
    if "cannot mount" in message:
        pytest.skip(f"disk-full cannot mount here: {message}")


def dbops(*args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "bot", *args], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        _skip_if_not_mountable(done.stderr)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def customers(sandbox: dict[str, Any]) -> list[Customer]:
    return [customer_from_mapping(c) for c in sandbox["customers"]]


@pytest.fixture
def pool(sandbox_fleet: Fleet) -> Iterator[RunnerPool]:
    with RunnerPool(sandbox_fleet) as runners:
        yield runners


@pytest.fixture
def backups(sandbox_fleet: Fleet, sqlite_engine: Engine, pool: RunnerPool) -> Backups:
    backups = Backups(sqlite_engine, EventLog(sqlite_engine), sandbox_fleet, pool)
    backups.sleep = lambda s: pytest.fail("nothing here is worth a retry")
    return backups


@pytest.fixture
def full(sandbox_backups_kept: None, sandbox_break: Full) -> Full:
    """``full(server)`` breaks disk-full on it. Heal (sandbox_break's teardown) comes before
    sandbox_backups_kept puts the backup directories back, which it does on the real disk."""

    def breaker(server: str) -> dict[str, Any]:
        try:
            return sandbox_break("disk-full", server)
        except DbopsError as exc:
            _skip_if_not_mountable(exc.message)
            raise

    return breaker


def _disk_space(fleet: Fleet, customers: list[Customer], pool: RunnerPool, server: str) -> Any:
    (where,) = health.check_fleet(fleet, customers, pool, deadline_s=8, servers=[server])
    return next(c for c in where.checks if c.name == "disk_space")


def test_disk_full_fills_the_backup_path_and_heal_gives_it_back(
    sandbox: dict[str, Any],
    sandbox_fleet: Fleet,
    customers: list[Customer],
    pool: RunnerPool,
    sandbox_backups_kept: None,
    sandbox_break: Full,  # heals at teardown whatever happens here
) -> None:
    root = _backup_path(sandbox, FULL)
    before = _tree(root)
    assert before  # the sandbox's first backups
    _disk_space(sandbox_fleet, customers, pool, FULL)  # the runner's connection is open

    fault = dbops("sandbox", "break", "--dir", sandbox["dir"], "disk-full", FULL)
    broken_at = time.monotonic()

    assert fault["server"] == FULL and fault["mount"] == str(root) and os.path.ismount(root)
    assert os.statvfs(root).f_bavail == 0
    with pytest.raises(OSError) as nospace:
        (root / "one-more-page").write_bytes(b"x" * 4096)
    assert nospace.value.errno == errno.ENOSPC
    (root / "one-more-page").unlink(missing_ok=True)
    assert _tree(root) == before  # the backups are all there, on the full disk
    assert root.stat().st_mode & 0o777 == 0o700 and root.stat().st_uid == root.parent.stat().st_uid

    disk = _disk_space(sandbox_fleet, customers, pool, FULL)
    detected_s = time.monotonic() - broken_at
    assert disk.verdict == "crit" and disk.value == 100
    assert f"{root} 100% used" in disk.detail
    assert str(root) not in _disk_space(sandbox_fleet, customers, pool, "vps2").detail
    print(f"\ndisk-full on {FULL}: disk_space crit {detected_s:.2f} s after the break")
    assert detected_s < 8.0  # one sweep, inside its deadline

    healed = dbops("sandbox", "heal", "--dir", sandbox["dir"])

    assert [f["fault"] for f in healed] == ["disk-full"]
    assert not os.path.ismount(root) and not Path(fault["held"]).exists()
    assert _tree(root) == before and not (root / sandbox_mod.DISK_FULL_FILLER).exists()
    assert root.stat().st_mode & 0o777 == 0o700 and root.stat().st_uid == root.parent.stat().st_uid
    after = _disk_space(sandbox_fleet, customers, pool, FULL)
    assert after.value < 100 and f"{root} 100% used" not in after.detail


def test_the_nightly_run_refuses_the_full_servers_dumps_before_writing_and_backs_up_the_rest(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    customers: list[Customer],
    backups: Backups,
    full: Full,
) -> None:
    upsert_customers(sqlite_engine, customers)
    root = _backup_path(sandbox, FULL)
    on_full = sorted(c.name for c in customers if c.server == FULL)
    assert len(on_full) == 2
    full(FULL)
    before = _tree(root)
    dirs_before = sorted(p for p in root.rglob("*") if p.is_dir())

    run = backups.backup_all(parallel=True, actor="scheduler")

    by_name = {o.customer: o for o in run.outcomes}
    assert sorted(o.customer for o in run.failed) == on_full
    for name in on_full:
        refused = by_name[name]
        assert refused.verdict == "crit" and not refused.infrastructure
        assert refused.attempts == 1  # a full disk is not retried: it would fail the same way
        assert refused.error is not None
        assert refused.error.startswith(f"not enough free space on {FULL}:{root}: need ~")
        assert refused.error.endswith("have 0 B.")
        assert refused.space is not None and refused.space["free_bytes"] == 0
    # Nothing was written there: no directory, no partial dump.
    assert _tree(root) == before
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == dirs_before
    # Every other server's customers were backed up in the same run.
    others = [c for c in customers if c.server != FULL]
    for c in others:
        assert by_name[c.name].ok
        (taken,) = [b for b in backups.list_backups(c.name) if b.stamp == by_name[c.name].backup]
        assert taken.complete
    globals_by_server = {g.server: g for g in run.globals}
    assert globals_by_server[FULL].verdict == "crit" and not globals_by_server[FULL].ok
    assert globals_by_server[FULL].error is not None
    assert globals_by_server[FULL].error.startswith("not enough free space")
    assert all(g.ok for name, g in globals_by_server.items() if name != FULL)
    failed = backups.events.query(kind="backup.failed", limit=20)
    assert sorted(e.subject or "" for e in failed) == on_full
    assert all(e.payload["space"]["free_bytes"] == 0 for e in failed)
    taken_events = backups.events.query(kind="backup.taken", limit=20)
    assert sorted(e.subject or "" for e in taken_events) == sorted(c.name for c in others)

    healed = sandbox_mod.heal(Path(sandbox["dir"]))

    assert [f["fault"] for f in healed] == ["disk-full"]
    info = backups.take_backup("acme", "U_ALICE")
    assert info.complete and info.path.startswith(f"{root}/acme/")
    assert any(b.stamp == info.stamp and b.complete for b in backups.list_backups("acme"))


@pytest.mark.parametrize("when", ["during the dump", "before the dump", "before the status"])
def test_a_disk_that_fills_after_the_check_leaves_no_partial_dump_and_the_failure_is_crit(
    sandbox: dict[str, Any],
    sqlite_engine: Engine,
    customers: list[Customer],
    backups: Backups,
    full: Full,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """The estimate passes (the filler is emptied first), then the disk fills: to one page short
    of the dump before pg_dump starts (it meets ENOSPC part-way), to the last byte before it
    starts (not a byte of the dump, nor of a status file, can be written), or to the last byte
    once the dump is whole (its status file cannot be written)."""
    server = "vps2"
    globex = next(c for c in customers if c.name == "globex")
    assert globex.server == server
    upsert_customers(sqlite_engine, [globex])
    root = _backup_path(sandbox, server)
    fault = full(server)
    filler = Path(fault["filler"])
    os.truncate(filler, 0)  # room again: the check before the dump will pass
    before = _tree(root)
    dirs_before = {p for p in (root / "globex").iterdir()}
    filled: list[str] = []
    real_check, real_put = backups_mod.check_space, backups_mod.put_files

    def check_space(*args: Any, **kwargs: Any) -> Any:
        space = real_check(*args, **kwargs)
        if when in ("during the dump", "before the dump") and not filled:
            assert space.ok, space  # the estimate passed
            sandbox_mod.fill(filler)
            if when == "during the dump":
                os.truncate(filler, filler.stat().st_size - 4096)  # one page left: not enough
            filled.append(when)
        return space

    def put_files(runner: Any, directory: str, *args: Any, **kwargs: Any) -> Any:
        if when == "before the status" and not filled and directory.startswith(f"{root}/globex/"):
            sandbox_mod.fill(filler)
            filled.append(when)
        return real_put(runner, directory, *args, **kwargs)

    # Where they are looked up: write_backup's module, and write_json_last's for put_files.
    monkeypatch.setattr(core.backups.dump, "check_space", check_space)
    monkeypatch.setattr(core.backups.dump, "put_files", put_files)
    monkeypatch.setattr(core.backups.server, "put_files", put_files)

    run = backups.backup_all(parallel=True, actor="scheduler")

    assert filled == [when]
    (failed,) = run.failed
    assert failed.customer == "globex" and failed.verdict == "crit"
    assert not failed.infrastructure and failed.attempts == 1
    assert failed.error is not None and "No space left on device" in failed.error
    (event,) = backups.events.query(kind="backup.failed", limit=5)
    assert event.subject == "globex" and "No space left on device" in event.payload["error"]
    assert not event.payload["infrastructure"]
    assert {g.server for g in run.globals if g.customer == GLOBALS} == {"vps1", "vps2", "vps3"}
    if when == "before the dump":
        # Nothing could be written, a status neither: no directory is left to read as a
        # backup still running.
        assert set((root / "globex").iterdir()) == dirs_before and _tree(root) == before
        return
    # No dump left behind, whole or partial: the attempt's directory holds its failed status
    # alone (removing the dump made room for it), so health shows a failed backup.
    (new,) = set((root / "globex").iterdir()) - dirs_before
    assert [p.name for p in new.iterdir()] == ["status"]
    status = json.loads((new / "status").read_text())
    assert status["ok"] is False and "No space left on device" in status["error"]
    assert _tree(root).keys() - before.keys() == {f"globex/{new.name}/status"}
    assert [b.state for b in backups.list_backups("globex") if b.stamp == new.name] == ["failed"]


def test_the_free_space_of_a_backup_path_not_made_yet_is_that_of_its_parent(
    sandbox_fleet: Fleet, tmp_path: Path
) -> None:
    """A new server's first night: the dump makes the backup path, so the check reads the
    filesystem it will be made on, instead of failing on df's "No such file or directory"."""
    runner, server = LocalRunner("here"), sandbox_fleet.servers[0]
    total, _ = backups_mod.read_free_space(runner, server, str(tmp_path / "backups" / "new"))
    assert total > 0 and total == backups_mod.read_free_space(runner, server, str(tmp_path))[0]
    assert not (tmp_path / "backups").exists()
