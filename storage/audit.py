"""An audit export of the event log that verifies on its own: ``dbops events export`` and
``dbops events verify --file``.

An export is JSON lines: a header (what was asked), then every event from the first to the last
in the time range, oldest first, and on to the checkpoint that closes it, then the checkpoints.
An event that the range or a ``--customer`` / ``--incident`` filter leaves out is a *stub*: its
id, hashes, seal and (when keyed) the sha256 of its body, nothing of what it says; the chain is
checked across it all the same. The export ends at a signed checkpoint, a published one (from
DBOPS_CHECKPOINTS) or one made for it, so an auditor holding only the public key (``dbops events
keys``) can check every event it shows, and one holding the keyring can check every seal too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy import func, select

from storage.chain import (
    CHECKPOINT_TYPE,
    SEGMENT_KIND,
    ChainCheck,
    Checkpoint,
    Stub,
    Verdict,
    body_digest,
    canonical,
    iso,
    row_body,
)
from storage.eventkeys import Keyring
from storage.events import EventLog, StoredEvent
from storage.models import Event

EXPORT_TYPE = "dbops.export"
_T = Event.__table__  # type: ignore[attr-defined]


def concerns(ev: StoredEvent, customer: str | None, incident: str | None) -> bool:
    """Whether ``ev`` is about ``customer`` (its subject, or the customer(s) its payload names)
    and about ``incident`` (an incident ref such as inc-12: its subject or payload)."""
    p = ev.payload
    if customer is not None:
        named = p.get("customers")
        if not (
            ev.subject == customer
            or p.get("customer") == customer
            or (isinstance(named, list) and customer in named)
        ):
            return False
    return incident is None or ev.subject == incident or p.get("incident") == incident


@dataclass(frozen=True)
class ExportSummary:
    events: int
    stubs: int
    first_id: int | None
    last_id: int | None
    closing: Checkpoint | None


def export(
    log: EventLog,
    out: TextIO,
    *,
    since: datetime,
    until: datetime,
    customer: str | None = None,
    incident: str | None = None,
    published: Sequence[Checkpoint] = (),
    seal: Callable[[], Checkpoint] | None = None,
    now: datetime,
) -> ExportSummary:
    """Write the export of events with ``since <= ts < until`` (and the filters) to ``out``.

    ``published``: the checkpoints already published; the first at or after the range's last
    event closes the export, else ``seal()`` makes one of the head now.
    """
    with log.engine.connect() as conn:
        first_id, last_id = conn.execute(
            select(func.min(_T.c.id), func.max(_T.c.id)).where(_T.c.ts >= since, _T.c.ts < until)
        ).one()
    header: dict[str, Any] = {
        "type": EXPORT_TYPE,
        "v": 1,
        "from": iso(since),
        "to": iso(until),
        "customer": customer,
        "incident": incident,
        "exported_at": iso(now),
        "first_id": first_id,
        "last_id": last_id,
        # The public halves of the keys (compare their ids with the operator's own copy): an
        # auditor's DBOPS_EVENTS_KEY is a file of these evp_ lines.
        "public_keys": [
            {"key_id": k.id, "public_key": k.public_text}
            for k in (log.keys.keys if log.keys else ())
        ],
        "verify": "DBOPS_EVENTS_KEY=<file of evp_ keys> dbops events verify --file <this file>",
    }
    if first_id is None or last_id is None:
        out.write(canonical(header) + "\n")
        return ExportSummary(0, 0, None, None, None)
    closing = next((c for c in sorted(published, key=lambda c: c.id) if c.id >= last_id), None)
    if closing is None and seal is not None:
        closing = seal()
    end_id = closing.id if closing is not None else last_id
    header["closing_checkpoint"] = closing.id if closing is not None else None
    out.write(canonical(header) + "\n")
    shown = stubs = 0
    filtered = customer is not None or incident is not None
    for ev in _rows(log, first_id, end_id):
        in_range = ev.id <= last_id and (not filtered or since <= ev.ts < until)
        if ev.kind == SEGMENT_KIND or (in_range and concerns(ev, customer, incident)):
            out.write(canonical({"type": "event", **ev.as_json()}) + "\n")
            shown += 1
        else:
            out.write(canonical(_stub(ev)) + "\n")
            stubs += 1
    for cp in sorted(published, key=lambda c: c.id):
        if first_id <= cp.id <= end_id and cp != closing:
            out.write(cp.line() + "\n")
    if closing is not None:
        out.write(closing.line() + "\n")
    return ExportSummary(shown, stubs, first_id, last_id, closing)


def _rows(log: EventLog, first_id: int, end_id: int) -> Iterator[StoredEvent]:
    after = first_id - 1
    while after < end_id:
        page = log.query(after_id=after, limit=2000)
        if not page:
            return
        for ev in page:
            if ev.id > end_id:
                return
            yield ev
        after = page[-1].id


def _stub(ev: StoredEvent) -> dict[str, Any]:
    return {
        "type": "stub",
        "id": ev.id,
        "prev_hash": ev.prev_hash,
        "hash": ev.hash,
        "key_id": ev.key_id,
        "mac": ev.mac,
        "digest": body_digest(row_body(ev)) if ev.key_id is not None else None,
    }


# -- reading an export back -------------------------------------------------------------------


def _event(data: dict[str, Any]) -> StoredEvent:
    return StoredEvent(
        id=int(data["id"]),
        ts=datetime.fromisoformat(str(data["ts"]).replace("Z", "+00:00")),
        kind=str(data["kind"]),
        actor=data.get("actor"),
        subject=data.get("subject"),
        payload=dict(data["payload"]),
        source=str(data["source"]),
        source_id=data.get("source_id"),
        prev_hash=str(data["prev_hash"]),
        hash=str(data["hash"]),
        key_id=data.get("key_id"),
        mac=data.get("mac"),
    )


def _stub_row(data: dict[str, Any]) -> Stub:
    return Stub(
        int(data["id"]),
        str(data["prev_hash"]),
        str(data["hash"]),
        data.get("key_id"),
        data.get("mac"),
        data.get("digest"),
    )


@dataclass(frozen=True)
class ExportFile:
    header: dict[str, Any]
    rows: list[StoredEvent | Stub]
    checkpoints: list[Checkpoint]


def read_export(lines: Iterable[str], name: str = "export") -> ExportFile:
    """The lines of an export; ValueError naming the line that is not one."""
    header: dict[str, Any] | None = None
    rows: list[StoredEvent | Stub] = []
    checkpoints: list[Checkpoint] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == EXPORT_TYPE and header is None and n == 1:
                header = data
            elif kind == "event":
                rows.append(_event(data))
            elif kind == "stub":
                rows.append(_stub_row(data))
            elif kind == CHECKPOINT_TYPE:
                checkpoints.append(Checkpoint.from_json(data, f"{name}:{n}"))
            else:
                raise ValueError("not a line of a dbops export")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{name}:{n}: {exc}") from None
    if header is None:
        raise ValueError(f"{name}: no dbops export header on its first line")
    return ExportFile(header, rows, checkpoints)


def verify_export(
    export_file: ExportFile, keys: Keyring | None, more: Sequence[Checkpoint] = ()
) -> Verdict:
    """Check an export on its own: every event shown matches its hash (and seal, with the
    keyring), the chain links across the stubs, and it ends at the checkpoint that closes it,
    whose signature is checked (with ``more`` published checkpoints besides)."""
    rows, own = export_file.rows, export_file.checkpoints
    check = ChainCheck(keys, [*own, *more], first_prev=None, whole=False)
    verdict = check.feed_all(rows)
    if not verdict.ok or not rows:
        return verdict
    closing_id = export_file.header.get("closing_checkpoint")
    last = rows[-1].id
    if closing_id is None or not own:
        return Verdict(
            False,
            verdict.checked,
            last,
            "the export ends at no checkpoint: nothing vouches for its last events",
        )
    if closing_id != last or max(c.id for c in own) != last:
        return Verdict(
            False,
            verdict.checked,
            last + 1,
            f"the export stops at event {last}, before the checkpoint that closes it "
            f"(event {max(closing_id, max(c.id for c in own))}): it was cut",
        )
    return verdict
