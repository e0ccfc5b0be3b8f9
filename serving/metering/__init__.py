"""Token metering and hard quotas on a durable, single-writer ledger.

A gateway gets its ledger client with :func:`connect` (or opens the file here with
:func:`local_ledger`) and meters every request through :class:`Meter`. Read :mod:`._core` for the
group commit and the crash rule, :mod:`._ops` for the typed operations, :mod:`._state` for
enforcement, :mod:`._policy` for the pure arithmetic, :mod:`._budget` for a request's ``max_tokens``.
"""

from ._actor import LedgerHome, ledger_home
from ._budget import TokenBudget
from ._client import LedgerClient, connect, local_ledger
from ._config import HEAD_NODE_RESOURCE, MeteringConfig, PriceConfig
from ._core import LedgerLockedError
from ._meter import Meter
from ._ops import Refusal, Reservation, Settlement

__all__ = [
    "HEAD_NODE_RESOURCE",
    "LedgerClient",
    "LedgerHome",
    "LedgerLockedError",
    "Meter",
    "MeteringConfig",
    "PriceConfig",
    "Refusal",
    "Reservation",
    "Settlement",
    "TokenBudget",
    "connect",
    "ledger_home",
    "local_ledger",
]
