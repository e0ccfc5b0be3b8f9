"""What travels to the ledger and back: every operation and answer is a typed message.

The ledger (:meth:`LedgerCore.apply <serving.metering._core.LedgerCore.apply>`, ``read``) dispatches
on the message's type with ``match``; nothing is a positional tuple or a name looked up at run time.
Three families, by how they may travel:

* hot operations (:data:`HotOp`: :class:`Reserve`, :class:`Settle`, :class:`Progress`), one per
  request, idempotent by request id, so they may be resent after the ledger restarts. They and their
  answers (:data:`HotResult`) are tagged msgspec structs, encoded as arrays, because they cross the
  ledger socket on every request's time to first token (:mod:`._socket`);
* admin operations (:data:`AdminOp`), applied at most once (a top-up must not apply twice): Ray
  actor calls, never resent;
* reads (:data:`Read`), which change nothing.

A refusal is an answer, not an exception (it must cross the socket); :func:`error_for` turns it
into the client-visible :class:`serving.errors.APIError` at the gateway.
"""

from __future__ import annotations

import msgspec

from serving.errors import (
    APIError,
    AuthenticationError,
    DuplicateRequestError,
    InsufficientQuotaError,
    InvalidMaxTokensError,
    LedgerUnavailableError,
    ModelNotAllowedError,
    RateLimitExceededError,
)
from serving.tenancy import (
    DEFAULT_PROJECT,
    GrantCreate,
    KeyRole,
    ProjectCreate,
    ProjectUpdate,
    TenantCreate,
    TenantUpdate,
)

from ._policy import headers_from_rate

__all__ = [
    "AddKey",
    "AdminOp",
    "Audit",
    "CreateGrant",
    "CreateProject",
    "CreateTenant",
    "ExportUsage",
    "GetProject",
    "GetTenant",
    "HotOp",
    "HotResult",
    "KeyPrincipal",
    "ListGrants",
    "ListKeys",
    "ListProjects",
    "ListTenants",
    "Op",
    "Principal",
    "Progress",
    "Read",
    "Refusal",
    "Reservation",
    "Reserve",
    "RevokeKey",
    "Settle",
    "Settlement",
    "Stats",
    "SummarizeUsage",
    "TenantFigures",
    "TopUp",
    "UpdateProject",
    "UpdateTenant",
    "UsageFilters",
    "UsageReport",
    "error_for",
]


class _Msg(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Base of every ledger message: immutable, tagged with its class name, encoded as an array
    (``frozen=True`` is repeated on each subclass for type checkers; msgspec inherits it)."""


# -- hot operations (the ledger socket) -----------------------------------------------------------
class Reserve(_Msg, frozen=True):
    """Hold credits and rate limits for one request before it is dispatched."""

    request_id: str
    key_hash: str
    model: str
    prompt_tokens: int
    max_tokens: int | None = None
    """Completion tokens asked for (totals over ``n``); None: as many as the limits allow."""
    model_max_len: int | None = None
    """The prompt plus the room the model leaves (:attr:`TokenBudget.reservation_max_len`)."""


class Settle(_Msg, frozen=True):
    """Charge the tokens a request used and release the rest of its reservation."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str = "completed"
    pool: str = ""
    gpu_type: str = ""
    cached_tokens: int = 0
    """Of ``prompt_tokens``, those the engine found in its prefix cache (the cached price)."""


class Progress(_Msg, frozen=True):
    """Tokens produced so far, charged if the request's settlement never comes (the crash rule)."""

    request_id: str
    completion_tokens: int


HotOp = Reserve | Settle | Progress


# -- hot answers ----------------------------------------------------------------------------------
class Reservation(_Msg, frozen=True):
    """Credits and limits held for one request until it is settled.

    The gateway must pass ``max_tokens`` to the engine: the reservation covers exactly that.
    """

    request_id: str
    tenant_id: str
    key_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    reserved_ucredits: int
    tenant_weight: float = 1.0
    rate: tuple[tuple[str, int, float, float], ...] = ()
    """Bucket state at reservation: ``(kind, limit, remaining, reset_s)`` for ``requests``/``tokens``."""
    project_id: str = DEFAULT_PROJECT
    """The key's project within the organization ``tenant_id``."""
    project_weight: float = 1.0
    """The project's share of its organization's part under contention."""

    @property
    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` headers to send on the response (formatted here, not in the ledger)."""
        return headers_from_rate(self.rate)


class Refusal(_Msg, frozen=True):
    """Why a reservation was refused, with everything an HTTP answer needs."""

    kind: str
    """``invalid_api_key``, ``model_not_allowed``, ``insufficient_quota``, ``rate_limit_exceeded``,
    ``invalid_max_tokens`` or ``duplicate_request``."""
    message: str
    tenant_id: str = ""
    limit: str | None = None
    """For ``rate_limit_exceeded``: ``"requests"``, ``"tokens"`` or ``"concurrency"``."""
    retry_after_s: float | None = None
    headers: dict[str, str] = {}


class Settlement(_Msg, frozen=True):
    """The outcome of settling a request; ``duplicate`` when it had been settled before."""

    request_id: str
    charged_ucredits: int
    released_ucredits: int
    duplicate: bool = False
    unknown: bool = False
    """No reservation and no usage event under this id."""


HotResult = Reservation | Refusal | Settlement | bool
"""What a hot operation answers (:class:`Progress`: whether the request was open)."""


# -- admin operations (Ray only, at most once) ----------------------------------------------------
class CreateTenant(_Msg, frozen=True):
    spec: TenantCreate


class UpdateTenant(_Msg, frozen=True):
    tenant_id: str
    update: TenantUpdate


class TopUp(_Msg, frozen=True):
    tenant_id: str
    credits: float
    note: str = ""


class CreateProject(_Msg, frozen=True):
    tenant_id: str
    spec: ProjectCreate


class UpdateProject(_Msg, frozen=True):
    tenant_id: str
    project_id: str
    update: ProjectUpdate


class CreateGrant(_Msg, frozen=True):
    """Add a credit grant; idempotent by ``spec.grant_id`` within the organization."""

    tenant_id: str
    spec: GrantCreate
    actor: str = "admin"
    """Who granted it (kept in the grant's audit event)."""


class AddKey(_Msg, frozen=True):
    """Register a key minted by the client (only its hash reaches the ledger)."""

    tenant_id: str
    key_id: str
    key_hash: str
    display_prefix: str
    name: str = ""
    project_id: str = DEFAULT_PROJECT
    role: KeyRole = "member"


class RevokeKey(_Msg, frozen=True):
    key_id: str
    tenant_id: str | None = None
    """Only a key of this organization (an organization admin's call); None: any key."""


AdminOp = (
    CreateTenant | UpdateTenant | TopUp | CreateProject | UpdateProject | CreateGrant | AddKey | RevokeKey
)
Op = HotOp | AdminOp


# -- reads ----------------------------------------------------------------------------------------
class ListTenants(_Msg, frozen=True):
    """A page of organizations in id order, after ``after``."""

    after: str | None = None
    limit: int = 100


class GetTenant(_Msg, frozen=True):
    tenant_id: str


class ListProjects(_Msg, frozen=True):
    tenant_id: str
    after: str | None = None
    limit: int = 100


class GetProject(_Msg, frozen=True):
    tenant_id: str
    project_id: str


class ListKeys(_Msg, frozen=True):
    """A page of an organization's keys (of one project if given), in key id order."""

    tenant_id: str
    project_id: str | None = None
    after: str | None = None
    limit: int = 100


class ListGrants(_Msg, frozen=True):
    """An organization's grants, soonest expiry first (``active_only``: those not used up or expired)."""

    tenant_id: str
    active_only: bool = False


class KeyPrincipal(_Msg, frozen=True):
    """Who a live key is (None for an unknown or revoked one)."""

    key_hash: str


class Principal(_Msg, frozen=True):
    tenant_id: str
    project_id: str
    role: KeyRole


class SummarizeUsage(_Msg, frozen=True):
    tenant_id: str
    project_id: str | None = None
    since_ts: float | None = None


class UsageFilters(_Msg, frozen=True):
    tenant_id: str | None = None
    project_id: str | None = None
    model: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {
            k: v
            for k, v in (
                ("tenant_id", self.tenant_id),
                ("project_id", self.project_id),
                ("model", self.model),
            )
            if v is not None
        }


class ExportUsage(_Msg, frozen=True):
    """A page of usage events (``after_event_id`` keyset)."""

    filters: UsageFilters
    since_ts: float | None
    until_ts: float | None
    after_event_id: int = 0
    limit: int = 5000


class UsageReport(_Msg, frozen=True):
    """A page of sums from the daily roll-up grouped by ``group_by``, after the group ``after``."""

    group_by: tuple[str, ...]
    filters: UsageFilters
    since_day: str | None = None
    until_day: str | None = None
    after: tuple[str, ...] | None = None
    limit: int = 5000


class Stats(_Msg, frozen=True):
    pass


class Audit(_Msg, frozen=True):
    """Ledger invariant violations; none when balances match grants minus charges."""


class TenantFigures(_Msg, frozen=True):
    """One organization's live figures (and its projects'), for any organization at any scale."""

    tenant_id: str


Read = (
    ListTenants
    | GetTenant
    | ListProjects
    | GetProject
    | ListKeys
    | ListGrants
    | KeyPrincipal
    | SummarizeUsage
    | ExportUsage
    | UsageReport
    | TenantFigures
    | Stats
    | Audit
)


# -- refusals as client-visible errors ------------------------------------------------------------
_BY_KIND: dict[str, type[APIError]] = {
    "invalid_api_key": AuthenticationError,
    "model_not_allowed": ModelNotAllowedError,
    "insufficient_quota": InsufficientQuotaError,
    "invalid_max_tokens": InvalidMaxTokensError,
    "duplicate_request": DuplicateRequestError,
    "ledger_unavailable": LedgerUnavailableError,
}


def error_for(refusal: Refusal) -> APIError:
    """The client-visible error for a refusal."""
    if refusal.kind == "rate_limit_exceeded":
        return RateLimitExceededError(
            refusal.message, limit=refusal.limit, retry_after_s=refusal.retry_after_s, headers=refusal.headers
        )
    return _BY_KIND[refusal.kind](refusal.message, headers=refusal.headers)
