"""Four processes appending at once never fork the chain, leave gaps or store a duplicate."""

from __future__ import annotations

import multiprocessing as mp

from sqlalchemy import Engine, text

from storage.db import make_engine
from storage.events import EventLog

PROCESSES = 4
PER_PROCESS = 2000


def _writer(url: str, worker: int, start: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    engine = make_engine(url)
    log = EventLog(engine)
    start.wait()
    for i in range(PER_PROCESS):
        log.append(
            "load", f"w{worker}", {"worker": worker, "i": i}, source=f"w{worker}", source_id=str(i)
        )
        if i == PER_PROCESS // 2:
            # Every process delivers the same webhook once: it must be stored once.
            log.append(
                "stripe.event", "cus_1", {"from": worker}, source="stripe", source_id="evt_shared"
            )
    engine.dispose()


def test_four_processes_append_2000_each(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, w, start)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"

    log = EventLog(engine)
    total = PROCESSES * PER_PROCESS + 1
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM events ORDER BY id"))]
        shared = conn.execute(
            text("SELECT count(*) FROM events WHERE source = 'stripe' AND source_id = 'evt_shared'")
        ).scalar_one()
        per_worker = dict(
            conn.execute(
                text("SELECT subject, count(*) FROM events WHERE kind = 'load' GROUP BY subject")
            ).all()
        )
    assert ids == list(range(1, total + 1)), "ids have gaps or duplicates"
    assert shared == 1
    assert per_worker == {f"w{w}": PER_PROCESS for w in range(PROCESSES)}
    verdict = log.verify()
    assert verdict.ok, str(verdict)
    assert verdict.checked == total
