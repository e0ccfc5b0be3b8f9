"""Which API keys a gateway replica lets in before it reads a request's body.

The ledger is the authority on keys (every reservation checks the key again), but a reservation
needs the prompt's token count, so without a local answer a gateway would read, parse and tokenize
a body for any bearer token at all. Each replica therefore holds a :class:`KeyDirectory`: the hashes
of every usable key and their tenant, sent by the ledger as a snapshot when the replica's ledger
link opens and then as changes right after each key is added or revoked is durable (so a revocation
reaches every replica within one network hop). A key absent from a synced directory is refused
with 401 at once and costs the ledger nothing. While the link is down the directory is not synced
and answers "unknown": the request goes on and the ledger decides, as before.
"""

from __future__ import annotations

import msgspec

__all__ = ["KeyDirectory", "Keys"]

KeyEntry = tuple[str, str | None]
"""``(key_hash, tenant_id)``; ``tenant_id`` None: the key can no longer be used."""


class Keys(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Ledger to gateway: key changes, or (``snapshot``) the whole set in chunks ending at ``last``."""

    entries: list[KeyEntry]
    snapshot: bool = False
    last: bool = True


SNAPSHOT_CHUNK = 20_000
"""Keys per snapshot frame (100,000 keys are five frames of ~1.8 MB)."""


def snapshot_frames(entries: list[KeyEntry]) -> list[Keys]:
    """The frames that carry a full snapshot (at least one, so an empty set also syncs)."""
    chunks = [entries[i : i + SNAPSHOT_CHUNK] for i in range(0, len(entries), SNAPSHOT_CHUNK)] or [[]]
    return [Keys(c, snapshot=True, last=i == len(chunks) - 1) for i, c in enumerate(chunks)]


class KeyDirectory:
    """The usable keys as this replica last heard from the ledger (pure state; fed by the link)."""

    def __init__(self) -> None:
        self._tenants: dict[str, str] = {}
        self._incoming: dict[str, str] | None = None
        self.synced = False
        self.updates = 0
        """Frames applied (tests wait on it)."""

    def apply(self, msg: Keys) -> None:
        if msg.snapshot:
            if self._incoming is None:
                self._incoming = {}
            self._incoming.update((h, t) for h, t in msg.entries if t is not None)
            if msg.last:
                self._tenants, self._incoming = self._incoming, None
                self.synced = True
        else:
            target = self._incoming if self._incoming is not None else self._tenants
            for h, t in msg.entries:
                if t is None:
                    target.pop(h, None)
                else:
                    target[h] = t
        self.updates += 1

    def lost(self) -> None:
        """The link to the ledger is down: changes may be missed until the next snapshot."""
        self.synced = False
        self._incoming = None

    def admits(self, key_hash: str) -> bool | None:
        """True: a usable key; False: not one (refuse it now); None: not known (no snapshot yet)."""
        if not self.synced:
            return None
        return key_hash in self._tenants

    def tenant_of(self, key_hash: str) -> str | None:
        """The organization of a usable key (None: not one, or not known yet)."""
        return self._tenants.get(key_hash) if self.synced else None

    def __len__(self) -> int:
        return len(self._tenants)
