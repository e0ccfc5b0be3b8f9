"""Chained block hashes of prompt token ids, bit-for-bit what vLLM v1 computes.

vLLM (``v1/core/kv_cache_utils.py``, ``prefix_caching_hash_algo="sha256"``, its default) hashes each
*full* block of ``block_size`` token ids together with its parent's hash::

    h_0 = sha256(pickle((NONE_HASH, tuple(tokens[0:B]), extra_0)))
    h_i = sha256(pickle((h_{i-1}, tuple(tokens[i*B:(i+1)*B]), None)))
    NONE_HASH = sha256(pickle(seed))   # seed: $PYTHONHASHSEED, else "vllm-none-hash"

where pickle is ``pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)`` and ``extra_0`` is
``(("cache_salt", salt),)`` when the request carries a ``cache_salt`` (else None). A partial last
block has no hash. These are the hashes vLLM's ``BlockStored`` KV events carry, so an index built
from them (the router's) and the engine's cache agree on what a prompt shares.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Mapping, Sequence

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "BlockHash",
    "BlockHasher",
    "BlockKey",
    "block_key",
    "organization_cache_salt",
    "vllm_none_hash_seed",
]

BlockHash = bytes
"""A 32-byte SHA-256 digest naming one block and everything before it."""

BlockKey = int
"""A block hash as vLLM's KV-cache events carry it by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``):
the digest's low 64 bits, big-endian. What the router's index and the cache events are keyed by."""


def block_key(h: BlockHash) -> BlockKey:
    """``int.from_bytes(h, "big") & (2**64 - 1)``, vLLM's ``maybe_convert_block_hash``."""
    return int.from_bytes(h[-8:], "big")


DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
"""vLLM's seed of the first block's parent hash when ``PYTHONHASHSEED`` is unset (sha256 algos)."""

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=_PROTOCOL)).digest()


def vllm_none_hash_seed(environ: Mapping[str, str] | None = None) -> str:
    """The seed vLLM derives ``NONE_HASH`` from in a process with this environment."""
    env = os.environ if environ is None else environ
    return env.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)


class BlockHasher:
    """Block hashes of token-id sequences in blocks of ``block_tokens`` (pure; no I/O)."""

    __slots__ = ("block_tokens", "none_hash")

    def __init__(self, block_tokens: int = 16, *, none_hash_seed: str = DEFAULT_NONE_HASH_SEED) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.none_hash: BlockHash = _sha256_pickle(none_hash_seed)

    def block_hashes(
        self,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        parents: Sequence[BlockHash] = (),
    ) -> list[BlockHash]:
        """Hashes of the full blocks of ``token_ids``.

        ``parents`` are hashes already known for the leading blocks (a conversation's previous
        turn): hashing resumes after them, chained on the last one. ``cache_salt`` enters the first
        block's hash only, as in vLLM, so two salts share nothing.
        """
        bt = self.block_tokens
        out = list(parents)
        prev = out[-1] if out else self.none_hash
        for start in range(len(out) * bt, len(token_ids) - bt + 1, bt):
            extra = (("cache_salt", cache_salt),) if start == 0 and cache_salt else None
            prev = _sha256_pickle((prev, tuple(token_ids[start : start + bt]), extra))
            out.append(prev)
        return out


@functools.lru_cache(maxsize=4096)
def organization_cache_salt(tenant_id: str) -> str:
    """The ``cache_salt`` of one organization's requests when prefix caching is scoped per
    organization: derived from its id by the gateway (a client never names a salt), the same on every
    gateway replica, so an organization's prompts share blocks with each other and with nobody else."""
    return hashlib.sha256(b"tokenweir-org\0" + tenant_id.encode()).hexdigest()[:32]
