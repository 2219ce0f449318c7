"""The keys that seal the event log: ``DBOPS_EVENTS_KEY``.

A key is 32 random bytes, written ``evk_<base64url>``. Two keys are derived from it: an HMAC-SHA256
key that seals every event (its ``mac``), and an Ed25519 key pair that signs checkpoints. The
public half (``evp_<base64url>``) is what an auditor holds: it checks a checkpoint's signature,
and so every event the checkpoint's hash covers, without being able to write either. A key's id
is the first 16 hex digits of sha256 over its public key: the same secret has the same id
everywhere, and no two keys share one by accident.

``DBOPS_EVENTS_KEY`` is one key written out, or the path of a file of keys, one a line, oldest
first; the last secret key seals new events and signs checkpoints, the older ones only verify
the segments they sealed. ``#`` starts a comment. An auditor's file may hold ``evp_`` public keys
only: it verifies checkpoints, and says that it cannot check the seals.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a key signs or verifies: an unkeyed log never loads it
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SECRET_PREFIX = "evk_"  # noqa: S105 (a prefix, not a secret)
PUBLIC_PREFIX = "evp_"
_MAC_LABEL = b"dbops events mac v1"
_SIGN_LABEL = b"dbops events sign v1"


class BadEventKey(ValueError):
    """DBOPS_EVENTS_KEY (or the file it names) holds something that is not a key."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate() -> str:
    """A new secret key, as it is written in DBOPS_EVENTS_KEY or a key file."""
    return SECRET_PREFIX + _b64(secrets.token_bytes(32))


@dataclass(frozen=True)
class EventKey:
    """One key: its id, its public key, and (unless an auditor's) its secret halves."""

    id: str
    public: bytes
    mac_key: bytes | None = field(default=None, repr=False)
    _signer: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    # HMAC-SHA256's inner and outer hashes with the key already absorbed (RFC 2104): sealing
    # an event copies them instead of hashing the padded key twice more (3 us -> 1 us a row).
    _pads: tuple[Any, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mac_key is not None and self._pads is None:
            block = self.mac_key.ljust(64, b"\0")  # a 32-byte key: no pre-hash (RFC 2104)
            inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
            outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
            object.__setattr__(self, "_pads", (inner, outer))

    @classmethod
    def from_secret(cls, secret: bytes) -> EventKey:
        if len(secret) != 32:
            raise BadEventKey("an events key is 32 bytes")
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        mac_key = hmac.digest(secret, _MAC_LABEL, "sha256")
        signer = Ed25519PrivateKey.from_private_bytes(hmac.digest(secret, _SIGN_LABEL, "sha256"))
        public = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(key_id(public), public, mac_key, signer)

    @classmethod
    def from_public(cls, public: bytes) -> EventKey:
        if len(public) != 32:
            raise BadEventKey("an events public key is 32 bytes")
        return cls(key_id(public), public)

    @property
    def has_secret(self) -> bool:
        return self.mac_key is not None

    @property
    def public_text(self) -> str:
        return PUBLIC_PREFIX + _b64(self.public)

    def seal(self, digest_hex: str) -> str:
        """HMAC-SHA256 of an event's hash under this key: what binds the event to it."""
        if self._pads is None:
            raise BadEventKey(f"key {self.id} is a public key: it cannot seal events")
        inner, outer = self._pads[0].copy(), self._pads[1].copy()
        inner.update(digest_hex.encode("ascii"))
        outer.update(inner.digest())
        return str(outer.hexdigest())

    def seal_ok(self, digest_hex: str, mac: str | None) -> bool:
        return mac is not None and hmac.compare_digest(self.seal(digest_hex), mac)

    def sign(self, message: bytes) -> str:
        if self._signer is None:
            raise BadEventKey(f"key {self.id} is a public key: it cannot sign checkpoints")
        return _b64(self._signer.sign(message))

    def signature_ok(self, message: bytes, signature: str) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(_unb64(signature), message)
        except (InvalidSignature, ValueError):
            return False
        return True


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


@dataclass(frozen=True)
class Keyring:
    """Keys oldest first; ``current`` (the newest secret key) seals new events."""

    keys: tuple[EventKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise BadEventKey("no key")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise BadEventKey("the same key is listed twice")

    @property
    def current(self) -> EventKey | None:
        """The key that seals new events: the last key, if it is a secret one."""
        last = self.keys[-1]
        return last if last.has_secret else None

    @property
    def ids(self) -> list[str]:
        return [k.id for k in self.keys]

    def get(self, kid: str | None) -> EventKey | None:
        return next((k for k in self.keys if k.id == kid), None)

    def rank(self, kid: str) -> int:
        """Where ``kid`` stands, oldest 0; -1 when it is not in the ring."""
        return next((i for i, k in enumerate(self.keys) if k.id == kid), -1)

    @classmethod
    def parse(cls, text: str) -> Keyring:
        keys = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            token = line.split()[-1]  # a label before the key is allowed: "2026-12 evk_..."
            try:
                if token.startswith(SECRET_PREFIX):
                    keys.append(EventKey.from_secret(_unb64(token[len(SECRET_PREFIX) :])))
                elif token.startswith(PUBLIC_PREFIX):
                    keys.append(EventKey.from_public(_unb64(token[len(PUBLIC_PREFIX) :])))
                else:
                    raise BadEventKey(f"line {n} is neither an evk_ nor an evp_ key")
            except (ValueError, TypeError) as exc:
                if isinstance(exc, BadEventKey):
                    raise
                raise BadEventKey(f"line {n} is not a well-formed key") from None
        return cls(tuple(keys))

    @classmethod
    def load(cls, value: str) -> Keyring:
        """From DBOPS_EVENTS_KEY: a key written out, or the path of a key file."""
        value = value.strip()
        if value.startswith((SECRET_PREFIX, PUBLIC_PREFIX)):
            return cls.parse(value)
        path = Path(value).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BadEventKey(
                f"it is neither a key (evk_...) nor a readable key file ({exc.strerror})"
            ) from None
        if os.name == "posix" and path.stat().st_mode & 0o077 and SECRET_PREFIX in text:
            # Readable by others: still used, but worth saying where it will be seen.
            logging.getLogger("dbops.events").warning(
                "the events key file %s is readable by other users: chmod 600 it", path
            )
        return cls.parse(text)
