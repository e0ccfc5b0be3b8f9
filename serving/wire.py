"""Framing for Tokenweir's own TCP links (the token channel, the ledger socket).

Frames are ``4-byte big-endian length + pickle``. Pickle runs code on load, so no frame is read
from a peer before it has proved it holds the link's secret: the first thing a client sends is the
secret's raw bytes (no pickle), compared in constant time. A secret travels only over Ray (actor
calls, the load board), so only members of the Ray cluster can open a link.
"""

from __future__ import annotations

import asyncio
import hmac
import pickle
import secrets
import struct
from typing import Any

__all__ = ["SECRET_BYTES", "AuthError", "check_secret", "frame", "new_secret", "read_frame"]

SECRET_BYTES = 32
_LEN = struct.Struct("!I")
MAX_FRAME = 256 * 2**20


class AuthError(ConnectionError):
    """A peer opened a link without the right secret."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


async def check_secret(reader: asyncio.StreamReader, secret: bytes) -> None:
    """Read the client's first bytes and raise :class:`AuthError` unless they are ``secret``."""
    got = await reader.readexactly(SECRET_BYTES)
    if not hmac.compare_digest(got, secret):
        raise AuthError("wrong link secret")


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(n))
