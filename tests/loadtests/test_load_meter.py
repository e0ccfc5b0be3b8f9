"""The meter check's arithmetic: one row per API key, tenants that share a key summed."""

from __future__ import annotations

from loadtests.client import RequestRecord
from loadtests.gateway_api import MeterReading, key_groups, meter_rows


def _rec(i: int, tenant: str, prompt: int | None, completion: int | None) -> RequestRecord:
    return RequestRecord(
        index=i, tenant=tenant, scheduled_s=0.0, sent_s=0.0, lateness_s=0.0, prompt_tokens_target=8,
        max_tokens=4, ok=completion is not None, prompt_tokens=prompt, completion_tokens=completion,
    )  # fmt: skip


def test_key_groups_keep_scenario_order() -> None:
    keys = {"a": "k1", "b": "k2", "c": "k1"}
    assert key_groups(keys) == {"k1": ["a", "c"], "k2": ["b"]}


def test_tenants_sharing_a_key_are_compared_with_the_keys_charge_as_one() -> None:
    records = [_rec(0, "a", 10, 4), _rec(1, "b", 7, 4), _rec(2, "c", 5, 4), _rec(3, "a", None, None)]
    keys = {"a": "shared", "b": "shared", "c": "own"}
    before = {"shared": MeterReading(100, 50, 150), "own": MeterReading(0, 0, 0)}
    after = {"shared": MeterReading(117, 58, 175), "own": MeterReading(5, 4, 9)}
    rows = meter_rows(records, keys, before, after)
    assert [(r.tenant, r.tenants) for r in rows] == [("a + b", ("a", "b")), ("c", ("c",))]
    shared, own = rows
    assert (shared.client_tokens, shared.gateway_tokens, shared.diff_tokens) == (25, 25, 0)
    assert shared.requests_without_usage == 1
    assert (own.client_tokens, own.gateway_tokens, own.diff_tokens) == (9, 9, 0)


def test_a_key_without_a_reading_or_a_total_is_not_compared() -> None:
    keys = {"a": "k1", "b": "k2"}
    rows = meter_rows([_rec(0, "a", 3, 1)], keys, {}, {"k1": MeterReading(None, None, None)})
    assert len(rows) == 1
    assert rows[0].gateway_tokens is None and rows[0].diff_tokens is None and rows[0].client_tokens == 4
