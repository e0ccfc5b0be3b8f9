"""Framing for Tokenweir's own TCP links (the token channel, the ledger socket).

A frame is ``4-byte big-endian length + msgpack body``, encoded and decoded by msgspec against the
link's declared message type (a tagged union of structs): a peer can only send values of the types
the link names, never code or arbitrary objects, and a frame that does not decode as one ends the
link with :class:`FrameError`. The first thing a client sends is the link's secret (raw bytes,
compared in constant time); a secret travels only over Ray (actor calls, the load board), so only
members of the Ray cluster can open a link at all.
"""

from __future__ import annotations

import asyncio
import hmac
import pickle
import secrets
import struct
from typing import Any, Generic, TypeVar

import msgspec

__all__ = [
    "SECRET_BYTES",
    "AuthError",
    "Codec",
    "FrameError",
    "check_secret",
    "frame",
    "new_secret",
    "read_frame",
]

SECRET_BYTES = 32
_LEN = struct.Struct("!I")
MAX_FRAME = 64 * 2**20
"""Largest frame a link reads (a peer announcing more is dropped before anything is buffered)."""

T = TypeVar("T")


class AuthError(ConnectionError):
    """A peer opened a link without the right secret."""


class FrameError(ValueError):
    """A frame too large, or not a value of the link's message type."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


async def check_secret(reader: asyncio.StreamReader, secret: bytes) -> None:
    """Read the client's first bytes and raise :class:`AuthError` unless they are ``secret``."""
    got = await reader.readexactly(SECRET_BYTES)
    if not hmac.compare_digest(got, secret):
        raise AuthError("wrong link secret")


_ENCODER = msgspec.msgpack.Encoder()


class Codec(Generic[T]):
    """Frames of one direction of a link: ``frame(msg)`` to send, ``await read(reader)`` to receive
    the next message, decoded as (and validated against) ``message_type``."""

    def __init__(self, message_type: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(message_type)

    @staticmethod
    def frame(msg: Any) -> bytes:
        body = _ENCODER.encode(msg)
        return _LEN.pack(len(body)) + body

    def decode(self, body: bytes) -> T:
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise FrameError(f"bad frame: {e}") from e

    async def read(self, reader: asyncio.StreamReader) -> T:
        head = await reader.readexactly(_LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        return self.decode(await reader.readexactly(n))


# -- pickle frames: the ledger socket's until its operations are typed structs (then these go) -----
def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(n))
