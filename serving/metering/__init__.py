"""Token metering and hard quotas on a durable, single-writer ledger.

Read :mod:`serving.metering._core` for the group commit and the crash rule, :mod:`._state` for
enforcement, :mod:`._policy` for the pure arithmetic, :mod:`._budget` for a request's ``max_tokens``.
"""

from ._actor import LedgerActor, get_or_create_ledger_actor
from ._budget import TokenBudget
from ._client import LedgerClient, LedgerTransport, LocalTransport
from ._config import MeteringConfig, PriceConfig
from ._core import LedgerCore, LedgerLockedError
from ._local import local_ledger
from ._meter import Meter
from ._policy import ModelPrice, TokenBucket, format_reset, rate_limit_headers
from ._socket import ActorTransport, LedgerSocketServer, SocketTransport
from ._stats import LedgerCollector, LedgerStats
from ._types import Refusal, Reservation, Settlement

__all__ = [
    "ActorTransport",
    "LedgerActor",
    "LedgerClient",
    "LedgerCollector",
    "LedgerCore",
    "LedgerLockedError",
    "LedgerSocketServer",
    "LedgerStats",
    "LedgerTransport",
    "LocalTransport",
    "Meter",
    "MeteringConfig",
    "ModelPrice",
    "PriceConfig",
    "Refusal",
    "Reservation",
    "Settlement",
    "SocketTransport",
    "TokenBucket",
    "TokenBudget",
    "format_reset",
    "get_or_create_ledger_actor",
    "local_ledger",
    "rate_limit_headers",
]
