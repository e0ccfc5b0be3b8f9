"""The writes of one group commit, coalesced in memory before they reach SQLite.

The ledger applies each operation to its in-memory state at once and records the resulting row
changes here. A reservation opened and settled within the same batch never touches the
``reservations`` table; balances are written once per tenant per batch with their final value.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WriteBatch"]

ReservationRow = tuple[str, str, str, str, int, int, int, int, float, float]
"""request_id, tenant_id, key_id, model, prompt_tokens, max_tokens, reserved_ucredits,
reserved_tokens, created_at, expires_at."""

EventRow = tuple[str, str, str, str, str, str, int, int, int, int, int, float, float, str]
"""request_id, tenant_id, key_id, model, pool, gpu_type, prompt_tokens, completion_tokens,
prompt_ucredits, completion_ucredits, ucredits, reserved_at, settled_at, outcome."""


class WriteBatch:
    """Row changes pending for the next commit, in an order that replays correctly."""

    __slots__ = ("balances", "deletes", "events", "inserts", "num_ops", "progress", "statements")

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []
        """Admin statements, executed first and in order."""
        self.inserts: dict[str, ReservationRow] = {}
        self.progress: dict[str, int] = {}
        self.deletes: set[str] = set()
        self.events: list[EventRow] = []
        self.balances: dict[str, int] = {}
        self.num_ops = 0

    def __bool__(self) -> bool:
        return bool(
            self.statements or self.inserts or self.progress or self.deletes or self.events or self.balances
        )

    def open_reservation(self, row: ReservationRow) -> None:
        self.inserts[row[0]] = row

    def record_progress(self, request_id: str, completion_tokens: int) -> None:
        self.progress[request_id] = completion_tokens

    def close_reservation(
        self, request_id: str, event: EventRow, tenant_id: str, balance_ucredits: int
    ) -> None:
        self.progress.pop(request_id, None)
        if self.inserts.pop(request_id, None) is None:
            self.deletes.add(request_id)
        self.events.append(event)
        self.balances[tenant_id] = balance_ucredits

    def set_balance(self, tenant_id: str, balance_ucredits: int) -> None:
        self.balances[tenant_id] = balance_ucredits
