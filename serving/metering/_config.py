"""Typed configuration of metering and the ledger."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._policy import ModelPrice

__all__ = ["HEAD_NODE_RESOURCE", "MeteringConfig", "PriceConfig"]

HEAD_NODE_RESOURCE = "node:__internal_head__"
"""Ray's built-in resource of the head node (one unit, on the head only)."""


class PriceConfig(BaseModel):
    """A model's price in credits per 1,000 tokens (the default makes 1 credit = 1 token)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_credits_per_1k_tokens: float = Field(default=1000.0, ge=0, le=1e9)
    """Credits charged per 1,000 prompt tokens."""
    completion_credits_per_1k_tokens: float = Field(default=1000.0, ge=0, le=1e9)
    """Credits charged per 1,000 completion tokens."""
    cached_prompt_credits_per_1k_tokens: float | None = Field(default=None, ge=0, le=1e9)
    """Credits per 1,000 prompt tokens the engine found in its prefix cache (OpenAI's
    `prompt_tokens_details.cached_tokens`); None: half the prompt price. Never above it."""

    @model_validator(mode="after")
    def _cached_not_dearer(self) -> PriceConfig:
        c = self.cached_prompt_credits_per_1k_tokens
        if c is not None and c > self.prompt_credits_per_1k_tokens:
            raise ValueError(
                f"cached_prompt_credits_per_1k_tokens ({c:g}) is above prompt_credits_per_1k_tokens"
                f" ({self.prompt_credits_per_1k_tokens:g})"
            )
        return self

    def to_price(self) -> ModelPrice:
        """Integer micro-credit form used by the ledger."""
        c = self.cached_prompt_credits_per_1k_tokens
        return ModelPrice(
            prompt_ucredits_per_1k=round(self.prompt_credits_per_1k_tokens * 1_000_000),
            completion_ucredits_per_1k=round(self.completion_credits_per_1k_tokens * 1_000_000),
            cached_prompt_ucredits_per_1k=None if c is None else round(c * 1_000_000),
        )


class MeteringConfig(BaseModel):
    """Metering, quotas and the ledger."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Off: no keys are checked and nothing is charged (for benchmarks only)."""
    store: Literal["sqlite", "postgres"] = "sqlite"
    """Where the ledger keeps its state: ``sqlite``, a file under ``state_dir`` on the ledger's node
    (the embedded default; the ledger actor is pinned to that node by ``ledger_node_resource``), or
    ``postgres``, a PostgreSQL database (``postgres_dsn``), from which the ledger actor may restart
    on any node."""
    postgres_dsn: str | None = Field(default=None, min_length=1)
    """libpq connection string or URI of the ledger's database (``store: postgres``), without a
    password: it is shipped to Ray actors. Unset: the environment variable ``postgres_dsn_env`` of
    the ledger's process holds the whole string (password included). A password may also come from
    libpq's ``PGPASSWORD`` or ``~/.pgpass`` on the ledger's nodes."""
    postgres_dsn_env: str = Field(default="TOKENWEIR_LEDGER_DSN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable holding the DSN when ``postgres_dsn`` is unset."""
    postgres_lock_wait_s: float = Field(default=60.0, ge=0, le=3600)
    """How long a starting PostgreSQL ledger waits for the writer's advisory lock: a writer whose
    node died holds it until the server drops its connection (the ledger sets TCP keepalives so that
    takes about 30 s). Then the start fails with ``LedgerLockedError``."""
    state_dir: Path | None = None
    """Directory of the ledger file (``ledger.sqlite3``); None: the top-level ``state_dir``."""
    ledger_file: str = "ledger.sqlite3"
    """File name of the ledger under ``state_dir``."""
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    """Price per served model name; models not listed use ``default_price``."""
    default_price: PriceConfig = Field(default_factory=PriceConfig)
    """Price of models absent from ``prices``."""
    default_max_tokens: int = Field(default=4096, ge=1)
    """Reservation size for a request without ``max_tokens`` when neither the model length nor the
    tenant's cap bounds it."""
    default_rpm: int | None = Field(default=60_000, ge=1, le=10_000_000)
    """Requests per minute of a tenant whose own limits set none; ``null``: unlimited (and no
    ``x-ratelimit-*-requests`` headers for such tenants)."""
    default_tpm: int | None = Field(default=100_000_000, ge=1, le=10_000_000_000)
    """Tokens per minute of a tenant whose own limits set none; ``null``: unlimited."""
    reservation_ttl_s: float = Field(default=900.0, gt=0)
    """A reservation not settled within this time is resolved by the crash rule (see ``_core``)."""
    lease_grace_s: float = Field(default=25.0, ge=0)
    """When a gateway's ledger connection drops, its open reservations are resolved by the crash
    rule this long after (within 5 s more), unless it settles them first."""
    restart_grace_s: float = Field(default=60.0, ge=0)
    """After a ledger restart, open reservations wait this long for their gateway to settle them."""
    tracked_tenants: list[str] | None = None
    """Organizations whose metrics carry their own ``tenant`` label; the others are summed under
    ``tenant="_other"`` (their live figures: ``GET /admin/v1/tenants/{id}/figures``). None: every
    organization, within ``metrics_series_budget``."""
    metrics_series_budget: int = Field(default=10_000, ge=0, le=10_000_000)
    """Most per-organization series the ledger's metrics carry; organizations past it (in id
    order) are summed under ``tenant="_other"`` as well."""
    usage_event_retention_days: float | None = Field(default=400.0, gt=0, le=36_500)
    """Usage events older than this are deleted (a little at a time); their sums stay in the daily
    roll-up by organization, project and model, which reports and ``GET /v1/usage`` read and which
    is never pruned. ``null``: keep every event."""
    busy_timeout_ms: int = Field(default=5000, ge=0, le=600_000)
    """How long a commit waits for a lock held by another process on the ledger file before it
    fails (its operations then get 503 ``ledger_unavailable``)."""
    call_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """A gateway's call to the ledger not answered within this time fails its requests with 503
    ``ledger_unavailable`` (a hung ledger must not hang every request)."""
    max_batch_ops: int = Field(default=4096, ge=1)
    """Largest number of operations one client call carries to the ledger."""
    admin_key_env: str = "TOKENWEIR_ADMIN_KEY"
    """Environment variable holding the admin key (used when ``admin_key`` is unset)."""
    admin_key: str | None = None
    """Admin key for ``/admin/v1``; ``None`` reads ``admin_key_env``; neither disables the admin API."""
    admin_key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """What Ray actors get instead of the admin key: its hex SHA-256 (set by :meth:`for_actors`;
    may also be set by hand to keep the key itself out of the config file)."""
    ledger_actor_name: str = "tokenweir-ledger"
    """Name of the detached ledger actor that every gateway replica shares."""
    ledger_node_resource: str = Field(
        default=HEAD_NODE_RESOURCE, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:/-]+$"
    )
    """Ray resource of the node that holds the ledger's storage. The ledger actor asks for a sliver
    of it, so Ray starts it, and restarts it after a crash, only on a node that advertises it, never
    elsewhere onto an empty file; while no such node is alive, metered requests get 503
    ``ledger_unavailable``. Default: the head node (Ray's ``node:__internal_head__``); or a custom
    resource that the one node with the ledger's disk advertises (``ray start --resources
    '{"tokenweir_ledger": 1}'``)."""

    @model_validator(mode="after")
    def _check(self) -> MeteringConfig:
        if self.admin_key is not None and len(self.admin_key) < 16:
            raise ValueError(f"admin_key must be at least 16 characters (got {len(self.admin_key)})")
        if self.store == "postgres" and self.postgres_dsn is not None:
            from psycopg.conninfo import conninfo_to_dict

            try:
                params = conninfo_to_dict(self.postgres_dsn)
            except Exception as e:
                raise ValueError(f"postgres_dsn is not a libpq connection string or URI: {e}") from e
            if params.get("password"):
                raise ValueError(
                    "postgres_dsn carries a password, and the config is shipped to Ray actors: put the"
                    f" whole DSN in ${self.postgres_dsn_env} instead, or the password in PGPASSWORD or"
                    " ~/.pgpass on the ledger's nodes"
                )
        return self

    def postgres_conninfo(self) -> str:
        """The ledger database's DSN, resolved here once, in the ledger's own process:
        ``postgres_dsn``, else the variable ``postgres_dsn_env`` (so a password never travels in
        the config). Raises ``ValueError`` naming both when neither is set."""
        dsn = self.postgres_dsn or os.environ.get(self.postgres_dsn_env)
        if not dsn:
            raise ValueError(
                f"metering.store is postgres but neither metering.postgres_dsn nor ${self.postgres_dsn_env}"
                " is set in the ledger's process"
            )
        return dsn

    @property
    def ledger_pin_resource(self) -> str | None:
        """The Ray resource the ledger actor asks for: its file's node (``ledger_node_resource``)
        with SQLite; None with PostgreSQL, whose ledger may run, and restart, on any node."""
        return None if self.store == "postgres" else self.ledger_node_resource

    def for_actors(self) -> MeteringConfig:
        """This config as Ray actors get it (constructor arguments are stored by Ray and readable
        through its APIs): the admin key replaced by its SHA-256."""
        key = self.admin_key or os.environ.get(self.admin_key_env)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest() if key else self.admin_key_sha256
        return self.model_copy(update={"admin_key": None, "admin_key_sha256": digest})

    @property
    def ledger_path(self) -> Path:
        """Full path of the ledger file."""
        if self.state_dir is None:
            raise ValueError("metering.state_dir is unset; resolve it from the top-level state_dir first")
        return self.state_dir.expanduser() / self.ledger_file

    def price_table(self) -> dict[str, ModelPrice]:
        """Model name to integer price."""
        return {name: p.to_price() for name, p in self.prices.items()}
