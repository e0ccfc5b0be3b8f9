"""Framing for Tokenweir's own TCP links (the token channel, the ledger socket).

A frame is ``4-byte big-endian length + msgpack body``, encoded and decoded by msgspec against the
link's declared message type (a tagged union of structs): a peer can only send values of the types
the link names, never code or arbitrary objects, and a frame that does not decode as one ends the
link with :class:`FrameError`.

Before any frame, both ends prove they hold the link's secret without sending it
(:func:`client_handshake`, :func:`server_handshake`: HMAC-SHA256 over both sides' fresh nonces,
distinct labels per direction, a deadline on every read). A secret travels only over Ray (actor
calls, the load board), so only members of the Ray cluster can open a link, and a gateway never
sends requests to a listener that merely took over an advertised address.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import struct
from typing import Any, Generic, TypeVar

import msgspec

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "SECRET_BYTES",
    "AuthError",
    "Codec",
    "FrameError",
    "client_handshake",
    "new_secret",
    "server_handshake",
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


HANDSHAKE_TIMEOUT_S = 5.0
"""Longest a peer may take over its part of the handshake (and a server's first frame)."""
_NONCE_BYTES = 16


def _proof(secret: bytes, label: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.digest(secret, label + client_nonce + server_nonce, "sha256")


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    """The connecting side: raise :class:`AuthError` unless the server proves the secret."""
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    writer.write(client_nonce)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            server_nonce = await reader.readexactly(_NONCE_BYTES)
            proof = await reader.readexactly(32)
    except TimeoutError as e:
        raise AuthError("the peer did not answer the link handshake in time") from e
    if not hmac.compare_digest(proof, _proof(secret, b"server", client_nonce, server_nonce)):
        raise AuthError("the peer does not hold the link's secret")
    writer.write(_proof(secret, b"client", client_nonce, server_nonce))


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    """The accepting side: raise :class:`AuthError` unless the client proves the secret."""
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            client_nonce = await reader.readexactly(_NONCE_BYTES)
            server_nonce = secrets.token_bytes(_NONCE_BYTES)
            writer.write(server_nonce + _proof(secret, b"server", client_nonce, server_nonce))
            proof = await reader.readexactly(32)
    except TimeoutError as e:
        raise AuthError("the peer did not complete the link handshake in time") from e
    if not hmac.compare_digest(proof, _proof(secret, b"client", client_nonce, server_nonce)):
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
