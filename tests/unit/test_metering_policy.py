"""Pure quota arithmetic with a hand-moved clock."""

from __future__ import annotations

import pytest

from serving.metering import PriceConfig
from serving.metering._policy import ModelPrice, TokenBucket, format_reset, rate_limit_headers
from serving.tenancy import generate_api_key, hash_api_key, looks_like_api_key


def test_bucket_consume_refill_and_retry_after() -> None:
    b = TokenBucket(60, now=0.0)  # 60 per minute = 1 per second
    assert b.consume(60, 0.0)
    assert not b.has_capacity(1, 0.0)
    assert b.retry_after_s(1, 0.0) == pytest.approx(1.0)
    assert b.retry_after_s(30, 0.0) == pytest.approx(30.0)
    assert not b.consume(1, 0.5)
    assert b.consume(1, 1.0)
    assert b.level(1000.0) == 60  # never above capacity
    assert b.retry_after_s(61, 1000.0) is None  # can never fit


def test_bucket_refund_capped_and_resize_keeps_fraction() -> None:
    b = TokenBucket(100, now=0.0)
    b.consume(80, 0.0)
    b.refund(200, 0.0)
    assert b.level(0.0) == 100
    b.consume(50, 0.0)
    b.resize(200, 0.0)
    assert b.level(0.0) == pytest.approx(100.0)
    assert b.rate_per_s == pytest.approx(200 / 60)


def test_headers_from_bucket_state() -> None:
    rpm, tpm = TokenBucket(10, 0.0), TokenBucket(1000, 0.0)
    rpm.consume(4, 0.0)
    tpm.consume(500, 0.0)
    h = rate_limit_headers(rpm, tpm, 0.0)
    assert h["x-ratelimit-limit-requests"] == "10"
    assert h["x-ratelimit-remaining-requests"] == "6"
    assert h["x-ratelimit-reset-requests"] == "24s"  # 4 requests at 1/6 per second
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert h["x-ratelimit-remaining-tokens"] == "500"
    assert h["x-ratelimit-reset-tokens"] == "30s"
    assert rate_limit_headers(None, None, 0.0) == {}


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (360.0, "6m0s"), (0.0, "0ms")])
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_prices_default_one_credit_per_token_and_round_up() -> None:
    p = PriceConfig().to_price()
    assert p.prompt_cost(7) == 7_000_000 and p.completion_cost(3) == 3_000_000
    cheap = ModelPrice(prompt_ucredits_per_1k=1, completion_ucredits_per_1k=1500)
    assert cheap.prompt_cost(1) == 1  # a fraction of a micro-credit rounds up
    assert cheap.completion_cost(2) == 3
    assert cheap.affordable_completion_tokens(3) == 2
    assert PriceConfig(prompt_credits_per_1k_tokens=0.15).to_price().prompt_cost(1000) == 150_000


def test_api_keys_are_random_prefixed_and_hashed() -> None:
    a, b = generate_api_key(), generate_api_key()
    assert a.plaintext != b.plaintext and a.key_id != b.key_id
    assert looks_like_api_key(a.plaintext) and a.plaintext.startswith("tw-")
    assert a.key_hash == hash_api_key(a.plaintext) and a.plaintext not in a.key_hash
    assert not looks_like_api_key("sk-" + a.plaintext[3:])
