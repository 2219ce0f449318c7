"""What an event's hash and seal are, what a checkpoint is, and how a run of events is checked.

An unkeyed event's ``hash`` is sha256 over the previous hash and the canonical JSON of the row
(its ``body``). A keyed event's hash is sha256 over the previous hash and sha256 of its body (so
an export can show an event by its digest alone and still be checked), and its ``mac`` is
HMAC-SHA256 of that hash under the key named by ``key_id`` (storage/eventkeys.py): without the
key nobody can make a row that verifies, and since each hash covers the one before, nobody can
edit, insert, delete, reorder or replace rows either. A change of key starts a segment with an
``events.key`` event, sealed by the new key and naming the one before it.

A checkpoint publishes the head (event id, hash, count, time), signed with the key's Ed25519
half, to places the database's owner cannot rewrite (DBOPS_CHECKPOINTS, the ops channel): a log
cut back past it, or cut and written again, no longer matches it.

``ChainCheck`` is the one checker: ``dbops events verify`` feeds it the table, ``verify --file``
an export.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from storage.eventkeys import EventKey, Keyring

GENESIS = "0" * 64
SEGMENT_KIND = "events.key"
CHECKPOINT_TYPE = "dbops.checkpoint"


def iso(ts: datetime) -> str:
    """UTC ISO-8601 with microseconds and a Z; a naive datetime is taken to be UTC already."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_str = json.encoder.encode_basestring  # the C encoder json.dumps uses with ensure_ascii=False


def canonical(obj: Any) -> str:
    """JSON with sorted keys, no whitespace, UTF-8 as is, and no NaN or infinity."""
    return _ENCODER.encode(obj)


def _opt(value: str | None) -> str:
    return "null" if value is None else _str(value)


def body(
    id_: int,
    ts_iso: str,
    kind: str,
    actor: str | None,
    subject: str | None,
    payload_json: str,
    source: str,
    source_id: str | None,
) -> str:
    """Exactly canonical() of the row without its hashes, spelled out because it is the hot
    path of append_many; test_events_append checks that the two agree."""
    return (
        f'{{"actor":{_opt(actor)},"id":{int(id_)},"kind":{_str(kind)},'
        f'"payload":{payload_json},"source":{_str(source)},'
        f'"source_id":{_opt(source_id)},"subject":{_opt(subject)},"ts":{_str(ts_iso)}}}'
    )


def sha_unkeyed(prev_hash: str, body_text: str) -> str:
    return hashlib.sha256((prev_hash + body_text).encode("utf-8")).hexdigest()


def body_digest(body_text: str) -> str:
    return hashlib.sha256(body_text.encode("utf-8")).hexdigest()


def sha_keyed(prev_hash: str, digest: str) -> str:
    return hashlib.sha256((prev_hash + digest).encode("ascii")).hexdigest()


def row_body(row: Any) -> str:
    """The body of a row given as a mapping or as an object with the event's fields."""
    get = row.__getitem__ if isinstance(row, Mapping) else lambda k: getattr(row, k)
    return body(
        get("id"),
        iso(get("ts")),
        get("kind"),
        get("actor"),
        get("subject"),
        canonical(get("payload")),
        get("source"),
        get("source_id"),
    )


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """sha256 of the previous hash followed by the canonical JSON of the row (unkeyed)."""
    return sha_unkeyed(prev_hash, row_body(row))


class Row(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...
    @property
    def key_id(self) -> str | None: ...
    @property
    def mac(self) -> str | None: ...


@dataclass(frozen=True)
class Stub:
    """An event an export shows by its digest only (another customer's, say): enough to carry
    the chain across it, nothing of what it says. ``digest`` is None for an unkeyed event,
    whose hash needs the whole row."""

    id: int
    prev_hash: str
    hash: str
    key_id: str | None = None
    mac: str | None = None
    digest: str | None = None


# -- checkpoints -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The head of the log at a moment, signed by the current key (unsigned when unkeyed)."""

    id: int
    hash: str
    count: int
    ts: str
    key_id: str | None = None
    signature: str | None = None
    public_key: str | None = None
    origin: str = ""  # where it was read (file:line), for messages only

    def signed_fields(self) -> dict[str, Any]:
        return {
            "type": CHECKPOINT_TYPE,
            "v": 1,
            "id": self.id,
            "hash": self.hash,
            "count": self.count,
            "ts": self.ts,
            "key_id": self.key_id,
        }

    def message(self) -> bytes:
        return b"dbops checkpoint\n" + canonical(self.signed_fields()).encode("utf-8")

    @classmethod
    def make(
        cls, id_: int, hash_: str, count: int, at: datetime, key: EventKey | None
    ) -> Checkpoint:
        unsigned = cls(id_, hash_, count, iso(at), key.id if key else None)
        if key is None:
            return unsigned
        return cls(
            id_,
            hash_,
            count,
            unsigned.ts,
            key.id,
            key.sign(unsigned.message()),
            key.public_text,
        )

    def as_json(self) -> dict[str, Any]:
        out = self.signed_fields()
        if self.signature is not None:
            out["signature"] = self.signature
            out["public_key"] = self.public_key
        return out

    def line(self) -> str:
        return canonical(self.as_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str = "") -> Checkpoint:
        if data.get("type") != CHECKPOINT_TYPE or data.get("v") != 1:
            raise ValueError("not a dbops checkpoint")
        try:
            return cls(
                int(data["id"]),
                str(data["hash"]),
                int(data["count"]),
                str(data["ts"]),
                data.get("key_id"),
                data.get("signature"),
                data.get("public_key"),
                origin,
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError("a dbops checkpoint with missing or bad fields") from None

    @property
    def where(self) -> str:
        return f" ({self.origin})" if self.origin else ""


def parse_checkpoints(text: str, name: str = "") -> list[Checkpoint]:
    """Checkpoints from a DBOPS_CHECKPOINTS file, or from text copied out of the ops channel:
    every line holding one. A line that names a checkpoint but does not parse is an error (a
    damaged witness is not silently skipped)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if CHECKPOINT_TYPE not in line:
            continue
        start, end = line.find("{"), line.rfind("}")
        origin = f"{name}:{n}" if name else f"line {n}"
        try:
            data = json.loads(line[start : end + 1]) if 0 <= start < end else None
            if not isinstance(data, dict):
                raise ValueError("no JSON object")
            out.append(Checkpoint.from_json(data, origin))
        except ValueError as exc:
            raise ValueError(f"{origin}: not a readable checkpoint ({exc})") from None
    return out


# -- the check -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    bad_id: int | None = None
    reason: str | None = None
    notes: tuple[str, ...] = ()
    sealed: int = 0  # events whose seal was checked with the key
    checkpoints: int = 0  # checkpoints the log matched

    def __str__(self) -> str:
        if not self.ok:
            return f"event log tampered at event {self.bad_id}: {self.reason}"
        text = f"event log intact: {self.checked} events, chain verified"
        if self.sealed:
            text += f", {self.sealed} seals checked"
        if self.checkpoints:
            text += f", {self.checkpoints} checkpoint(s) matched"
        return "\n".join([text, *self.notes])


class _Bad(Exception):
    def __init__(self, bad_id: int | None, reason: str) -> None:
        super().__init__(reason)
        self.bad_id, self.reason = bad_id, reason


@dataclass
class ChainCheck:
    """Feed it events in id order; it stops at the first that does not fit.

    ``keys``: the operator's keyring (None: no DBOPS_EVENTS_KEY, order only). ``first_prev``:
    the hash the first event must follow (GENESIS for a whole log; None for an export, whose
    first event's link is covered by the checkpoint after it). ``whole``: the rows are the whole
    log, so a checkpoint past its end means it was cut back.
    """

    keys: Keyring | None
    checkpoints: Sequence[Checkpoint] = ()
    first_prev: str | None = GENESIS
    whole: bool = True
    _prev: str | None = field(init=False, default=None)
    _next_id: int | None = field(init=False, default=None)
    _segment: str | None = field(init=False, default=None)
    _segment_from: int | None = field(init=False, default=None)
    _first: int | None = field(init=False, default=None)
    _checked: int = field(init=False, default=0)
    _keyed: int = field(init=False, default=0)
    _sealed: int = field(init=False, default=0)
    _stubs_unchecked: int = field(init=False, default=0)
    _matched: int = field(init=False, default=0)
    _last_signed_match: int | None = field(init=False, default=None)
    _pending: dict[int, list[Checkpoint]] = field(init=False, default_factory=dict)
    _failed: Verdict | None = field(init=False, default=None)
    _notes: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._prev = self.first_prev
        self._next_id = 1 if self.first_prev == GENESIS else None
        try:
            self._check_signatures()
        except _Bad as bad:
            self._failed = Verdict(False, 0, bad.bad_id, bad.reason)
        seen: set[tuple[int, str, str | None]] = set()
        for cp in self.checkpoints:  # the same one from two witnesses counts once
            if (cp.id, cp.hash, cp.signature) not in seen:
                seen.add((cp.id, cp.hash, cp.signature))
                self._pending.setdefault(cp.id, []).append(cp)

    def _check_signatures(self) -> None:
        unchecked = 0
        for cp in self.checkpoints:
            if cp.key_id is None:
                continue
            key = self.keys.get(cp.key_id) if self.keys else None
            if self.keys is None:
                unchecked += 1
            elif key is None:
                raise _Bad(
                    cp.id,
                    f"the checkpoint{cp.where} is signed with key {cp.key_id}, which is not one "
                    "of DBOPS_EVENTS_KEY's: it was not published by this dbops",
                )
            elif cp.signature is None or not key.signature_ok(cp.message(), cp.signature):
                raise _Bad(
                    cp.id,
                    f"the checkpoint{cp.where} does not carry a valid signature of key "
                    f"{cp.key_id}: it was not published by this dbops, or was altered",
                )
        if unchecked:
            self._notes.append(
                f"{unchecked} checkpoint signature(s) not checked: DBOPS_EVENTS_KEY is not set."
            )

    def feed_all(self, rows: Iterable[Row]) -> Verdict:
        for row in rows:
            if self.feed(row) is not None:
                break
        return self.finish()

    def feed(self, row: Row) -> Verdict | None:
        """The failing verdict if ``row`` does not fit (and every later call returns it)."""
        if self._failed is not None:
            return self._failed
        try:
            self._feed(row)
        except _Bad as bad:
            self._failed = Verdict(False, self._checked, bad.bad_id, bad.reason)
        return self._failed

    def _feed(self, row: Row) -> None:
        rid = row.id
        if self._first is None:
            self._first = rid
            if self.first_prev is None:  # part of a log: it starts inside a segment
                payload = getattr(row, "payload", None)
                if getattr(row, "kind", None) == SEGMENT_KIND and isinstance(payload, dict):
                    self._segment = payload.get("after")
                else:
                    self._segment = row.key_id
                self._segment_from = rid
        expected = self._next_id if self._next_id is not None else rid
        if rid != expected:
            if rid > expected:
                gap = f"{expected}" if rid == expected + 1 else f"{expected}-{rid - 1}"
                raise _Bad(rid, f"event(s) {gap} missing before it (deleted)")
            raise _Bad(expected, "ids out of order")
        if self._prev is not None and row.prev_hash != self._prev:
            raise _Bad(
                rid,
                "its prev_hash does not match the event before it "
                "(rows re-ordered, swapped, inserted or replaced)",
            )
        self._check_content(row)
        self._check_seal(row)
        for cp in self._pending.pop(rid, []):
            if cp.hash != row.hash:
                raise _Bad(
                    rid,
                    f"it is not the event the checkpoint{cp.where} published at {cp.ts} "
                    "(its hash differs): the log was cut back and written again, or replaced",
                )
            self._matched += 1
            if cp.signature is not None and self.keys is not None:
                self._last_signed_match = rid
        self._prev, self._next_id = row.hash, rid + 1
        self._checked += 1

    def _check_content(self, row: Row) -> None:
        if isinstance(row, Stub):
            if row.key_id is None or row.digest is None:
                self._stubs_unchecked += 1
                return
            computed = sha_keyed(row.prev_hash, row.digest)
        elif row.key_id is None:
            computed = sha_unkeyed(row.prev_hash, row_body(row))
        else:
            computed = sha_keyed(row.prev_hash, body_digest(row_body(row)))
        if computed != row.hash:
            raise _Bad(row.id, "its contents do not match its hash (edited)")

    def _check_seal(self, row: Row) -> None:
        kid = row.key_id
        if kid is None:
            if self._segment is not None:
                raise _Bad(
                    row.id,
                    f"it carries no seal, though the log is sealed from event "
                    f"{self._segment_from} on (written without the key)",
                )
            return
        if kid != self._segment:
            self._start_segment(row, kid)
        self._keyed += 1
        if self.keys is None:
            return
        key = self.keys.get(kid)
        if key is None:
            raise _Bad(
                row.id,
                f"it is sealed with key {kid}, which is not one of DBOPS_EVENTS_KEY's "
                "(a log written under another key)",
            )
        if not key.has_secret:
            return
        if not key.seal_ok(row.hash, row.mac):
            raise _Bad(
                row.id,
                f"its seal does not match (it was written or rewritten without key {kid})",
            )
        self._sealed += 1

    def _start_segment(self, row: Row, kid: str) -> None:
        if self.keys is not None:
            rank = self.keys.rank(kid)
            if rank < 0:
                raise _Bad(
                    row.id,
                    f"it is sealed with key {kid}, which is not one of DBOPS_EVENTS_KEY's "
                    "(a log written under another key)",
                )
            if self._segment is not None and rank < self.keys.rank(self._segment):
                raise _Bad(
                    row.id,
                    f"it is sealed with key {kid}, retired when the log moved to key "
                    f"{self._segment} at event {self._segment_from}",
                )
        payload = getattr(row, "payload", None)
        if (
            getattr(row, "kind", None) != SEGMENT_KIND
            or not isinstance(payload, dict)
            or payload.get("key_id") != kid
            or payload.get("after") != self._segment
        ):
            after = f"key {self._segment}" if self._segment else "unkeyed events"
            raise _Bad(
                row.id,
                f"it is sealed with key {kid} after {after}, but no change of key to it "
                f"was recorded before it (an {SEGMENT_KIND} event)",
            )
        self._segment, self._segment_from = kid, row.id

    def finish(self) -> Verdict:
        if self._failed is not None:
            return self._failed
        last = (self._next_id - 1) if self._next_id is not None else 0
        if self.whole and self._pending:
            beyond = min(self._pending)
            cp = self._pending[beyond][0]
            return Verdict(
                False,
                self._checked,
                last + 1,
                f"the log ends at event {last}, but the checkpoint{cp.where} published at "
                f"{cp.ts} covers events up to {beyond}: events {last + 1}-{beyond} were cut off",
            )
        keyed_ring = self.keys is not None and self.keys.current is not None
        if keyed_ring and self._checked and self._keyed == 0:
            return Verdict(
                False,
                self._checked,
                self._first,
                "no event is sealed, though DBOPS_EVENTS_KEY is set: the log was replaced "
                "by one written without the key, or nothing was written since the key was "
                "set (`dbops events checkpoint` starts the sealed segment)",
            )
        return Verdict(
            True,
            self._checked,
            notes=(*self._notes, *self._summary()),
            sealed=self._sealed,
            checkpoints=self._matched,
        )

    def _summary(self) -> list[str]:
        notes = []
        if self._stubs_unchecked:
            notes.append(
                f"{self._stubs_unchecked} unkeyed event(s) shown by hash only were not checked."
            )
        if self.keys is None:
            if self._keyed:
                notes.append(
                    f"DBOPS_EVENTS_KEY is not set: the seals of {self._keyed} keyed event(s) "
                    "were not checked. This proves order only."
                )
            elif self._checked:
                notes.append(
                    "The chain is unkeyed: this proves order only (anyone who can write the "
                    "database can rewrite it and recompute every hash). Set DBOPS_EVENTS_KEY."
                )
        elif self._keyed > self._sealed:
            covered = (
                f"; events up to {self._last_signed_match} are covered by a signed checkpoint"
                if self._last_signed_match
                else ""
            )
            notes.append(
                f"The keyring holds public keys only: {self._keyed - self._sealed} seal(s) not "
                f"checked{covered}."
            )
        return notes
