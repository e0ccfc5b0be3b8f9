"""The token budget of a request: the ``max_tokens`` default and caps, decided in one place."""

from __future__ import annotations

import pytest

from serving.errors import ContextLengthError, InvalidRequestError
from serving.metering import TokenBudget


def test_request_budget_counts_every_choice() -> None:
    b = TokenBudget.for_request(100, 1000, None, n=3)
    assert (b.requested_tokens, b.room_tokens, b.max_tokens_per_choice) == (None, 2700, 900)
    b = TokenBudget.for_request(100, 1000, 50, n=3)
    assert (b.requested_tokens, b.room_tokens, b.max_tokens_per_choice) == (150, 2700, 50)
    # What a reservation request carries, and back.
    assert b.reservation_max_len == 2800
    assert TokenBudget.from_reservation(100, 150, 2800) == TokenBudget(100, 150, 2700)
    assert TokenBudget.from_reservation(100, None, None).room_tokens is None


def test_prompt_that_fills_the_model_names_the_prompt_field() -> None:
    with pytest.raises(ContextLengthError) as ei:
        TokenBudget.for_request(1000, 1000, None, prompt_param="messages")
    assert ei.value.param == "messages" and ei.value.code == "context_length_exceeded"
    assert ei.value.message == (
        "This model's maximum context length is 1000 tokens. However, your prompt has 1000 tokens, "
        "leaving no room for a completion."
    )


def test_request_longer_than_the_model_names_both_numbers() -> None:
    with pytest.raises(ContextLengthError) as ei:
        TokenBudget.for_request(900, 1000, 101, n=4)
    assert ei.value.param == "max_tokens"
    assert ei.value.message == (
        "This model's maximum context length is 1000 tokens. However, you requested 1001 tokens "
        "(900 in the prompt, 101 for the completion). Please reduce the prompt or max_tokens."
    )
    assert TokenBudget.for_request(900, 1000, 100, n=4).requested_tokens == 400  # exactly fits


def test_min_tokens_above_the_bound_is_refused() -> None:
    with pytest.raises(
        InvalidRequestError, match=r"min_tokens \(60\) must not exceed max_tokens \(50\)"
    ) as ei:
        TokenBudget.for_request(10, 1000, 50, min_tokens=60)
    assert ei.value.param == "min_tokens"
    with pytest.raises(InvalidRequestError, match=r"max_tokens \(990\)"):
        TokenBudget.for_request(10, 1000, None, min_tokens=991)


def test_grant_of_an_explicit_request_is_what_was_asked() -> None:
    b = TokenBudget(10, 600, 5000)
    assert b.over_cap(500) and not b.over_cap(600) and not b.over_cap(None)
    assert b.grant(default_tokens=4096, cap=600, tpm_capacity=100, affordable_tokens=1) == 600


def test_grant_without_max_tokens_is_the_tightest_bound() -> None:
    b = TokenBudget(10, None, 990)
    assert not b.over_cap(5)
    assert b.grant(default_tokens=4096) == 990  # the model's room
    assert b.grant(default_tokens=4096, cap=300) == 300  # the tenant's cap
    assert b.grant(default_tokens=4096, cap=300, tpm_capacity=110) == 100  # TPM room beside the prompt
    assert b.grant(default_tokens=4096, cap=300, affordable_tokens=42) == 42  # the balance
    assert b.grant(default_tokens=4096, affordable_tokens=0) == 1  # never 0: the credit check refuses it
    unbounded = TokenBudget(10)
    assert unbounded.grant(default_tokens=4096) == 4096  # neither cap nor model length: the default
    assert unbounded.grant(default_tokens=4096, cap=77) == 77


def test_each_choice_gets_an_equal_share_of_the_grant() -> None:
    b = TokenBudget.for_request(10, 1000, None, n=3)
    assert b.per_choice(100) == 33
    with pytest.raises(InvalidRequestError, match="n=3 choices do not fit in the granted 2 tokens") as ei:
        b.per_choice(2)
    assert ei.value.param == "n"
