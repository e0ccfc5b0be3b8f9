"""API keys: 256-bit random secrets with a recognisable prefix, stored only as a SHA-256 hash.

A key looks like ``tw-<43 url-safe base64 chars>``. The plaintext is returned once, at creation;
the ledger stores ``sha256(key)`` (hex) and a short display prefix. SHA-256 without a salt or a
slow KDF is the right tool here: the secret is 32 random bytes, so there is nothing to brute-force.
Lookups go through a dict keyed by the hash, then the stored and presented hashes are compared with
:func:`hmac.compare_digest` so the final check does not leak timing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = [
    "API_KEY_PREFIX",
    "GeneratedKey",
    "constant_time_equals",
    "generate_api_key",
    "hash_api_key",
    "looks_like_api_key",
    "new_key_id",
]

API_KEY_PREFIX = "tw-"
_SECRET_BYTES = 32
_KEY_BODY_CHARS = 43  # base64url of 32 bytes without padding
_DISPLAY_CHARS = 10


class GeneratedKey:
    """A freshly minted key: ``plaintext`` is shown once and never stored."""

    __slots__ = ("display_prefix", "key_hash", "key_id", "plaintext")

    def __init__(self, plaintext: str, key_id: str) -> None:
        self.plaintext = plaintext
        self.key_id = key_id
        self.key_hash = hash_api_key(plaintext)
        self.display_prefix = plaintext[:_DISPLAY_CHARS]


def new_key_id() -> str:
    """A public, non-secret identifier for a key (used in usage events and for revocation)."""
    return "key_" + secrets.token_hex(8)


def generate_api_key() -> GeneratedKey:
    """Mint a key from ``secrets.token_bytes(32)``."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=").decode("ascii")
    return GeneratedKey(API_KEY_PREFIX + body, new_key_id())


def hash_api_key(plaintext: str) -> str:
    """The stored form of a key: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def looks_like_api_key(candidate: str) -> bool:
    """Cheap shape check before hashing (prefix and length); not a validity check."""
    return candidate.startswith(API_KEY_PREFIX) and len(candidate) == len(API_KEY_PREFIX) + _KEY_BODY_CHARS


def constant_time_equals(a: str, b: str) -> bool:
    """Compare two secrets (or their hashes) without an early exit."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
