"""Operations the CLI and ``tokenweir serve`` call, over any :class:`TenancyBackend`.

The CLI picks the backend: the admin HTTP API (:class:`serving.tenancy.AdminHttpBackend`) when the
gateway runs, or the ledger file opened in-process (``serving.metering.local_ledger``) when it does
not; the ledger holds a lock on its file, so the second is refused while a gateway runs.
"""

from __future__ import annotations

from serving.errors import NotFoundError

from ._backend import TenancyBackend
from ._model import TenantCreate, TenantLimits

__all__ = ["ensure_demo_tenant"]


async def ensure_demo_tenant(
    backend: TenancyBackend,
    *,
    tenant_id: str = "demo",
    credits: float = 1_000_000.0,
    limits: TenantLimits | None = None,
) -> tuple[str, str | None]:
    """Create the demo tenant and a key on first run. Returns ``(tenant_id, api_key)``; the key is
    ``None`` when the tenant already existed (keys are shown once; create another with the CLI)."""
    try:
        await backend.get_tenant(tenant_id)
        return tenant_id, None
    except NotFoundError:
        pass
    await backend.create_tenant(
        TenantCreate(
            tenant_id=tenant_id, name="Demo tenant", credits=credits, limits=limits or TenantLimits()
        )
    )
    key = await backend.create_key(tenant_id, "demo")
    return tenant_id, key.api_key
