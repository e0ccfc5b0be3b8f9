"""Write tests/data/ledger_v1.sqlite3: a schema-1 ledger written by the code of commit f749623.

Run from a checkout of that commit: `PYTHONPATH=. python tests/data/make_ledger_v1.py tests/data/ledger_v1.sqlite3`.
The keys it prints to ledger_v1_keys.txt are test keys of that file only."""

import asyncio
import shutil
import sys
from pathlib import Path

from serving.metering import LedgerClient, MeteringConfig, PriceConfig
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._ops import Reserve, Settle
from serving.tenancy import TenantCreate, TenantLimits, TopUp, hash_api_key

KEYS = {}


async def main(out: Path) -> None:
    d = Path("/tmp/v1ledger")
    shutil.rmtree(d, ignore_errors=True)
    wall = [1_767_225_600.0]  # 2026-01-01T00:00Z
    core = LedgerCore(
        MeteringConfig(
            state_dir=d,
            prices={
                "priced": PriceConfig(prompt_credits_per_1k_tokens=1, completion_credits_per_1k_tokens=2)
            },
        ),
        wall=lambda: wall[0],
    )
    await core.start()
    c = LedgerClient(LocalTransport(core))
    await c.create_tenant(
        TenantCreate(
            tenant_id="acme",
            name="Acme Corp",
            weight=2.0,
            credits=100,
            limits=TenantLimits(rpm=600, max_concurrency=8),
        )
    )
    await c.create_tenant(
        TenantCreate(tenant_id="uni", name="A University", allowed_models=["priced"], credits=50)
    )
    await c.create_tenant(TenantCreate(tenant_id="empty", name="No credits"))
    k1 = await c.create_key("acme", "ci")
    k2 = await c.create_key("acme", "old")
    k3 = await c.create_key("uni", "lab")
    await c.revoke_key(k2.key_id)
    await c.top_up("acme", TopUp(credits=25, note="invoice 42"))
    for i in range(5):
        wall[0] += 3600
        await c.submit(Reserve(f"req-{i}", hash_api_key(k1.api_key), "priced", 100, 50))
        await c.submit(Settle(f"req-{i}", 100, 20 + i, pool="p", gpu_type="sim"))
    wall[0] += 86400
    await c.submit(Reserve("req-uni", hash_api_key(k3.api_key), "priced", 10, 10))
    await c.submit(Settle("req-uni", 10, 10, pool="p", gpu_type="sim"))
    await c.submit(Reserve("req-open", hash_api_key(k1.api_key), "priced", 200, 100))  # left open
    assert not await c.audit()
    await core.close()
    shutil.copy(d / "ledger.sqlite3", out)
    (out.parent / "ledger_v1_keys.txt").write_text(f"acme {k1.api_key}\nuni {k3.api_key}\n")


asyncio.run(main(Path(sys.argv[1])))
