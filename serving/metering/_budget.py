"""The token budget of one request: how many completion tokens it may ask for, and is granted.

The one owner of the ``max_tokens`` default and its caps (the model length minus the prompt, the
tenant's ``max_tokens_per_request``, its TPM limit and balance, the ``n`` choices), which the gateway,
the ledger and the unmetered meter each used to decide for themselves. The budget counts totals over
a request's ``n`` choices, because a reservation holds the total; each choice gets an equal share::

    budget = TokenBudget.for_request(prompt, max_model_len, max_tokens, n, ...)  # gateway: length checks
    budget.over_cap(cap); granted = budget.grant(cap=..., ...)                   # ledger: the tenant's limits
    max_tokens_per_choice = budget.per_choice(granted)                           # gateway: the engine's bound

A reservation carries it as ``(max_tokens, model_max_len)``: :meth:`from_reservation` and
:attr:`reservation_max_len` convert. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.errors import ContextLengthError, InvalidRequestError

__all__ = ["TokenBudget"]


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """Completion tokens one request may take, before the tenant's limits (totals over ``n``)."""

    prompt_tokens: int
    requested_tokens: int | None = None
    """``max_tokens * n`` as the client sent it; None: as many as the limits allow."""
    room_tokens: int | None = None
    """``(max_model_len - prompt_tokens) * n``, what the model length leaves; None: not bounded by it."""
    n: int = 1

    @classmethod
    def for_request(
        cls,
        prompt_tokens: int,
        max_model_len: int,
        max_tokens: int | None,
        n: int = 1,
        min_tokens: int = 0,
        prompt_param: str = "prompt",
    ) -> TokenBudget:
        """The budget of a request for ``max_tokens`` per choice (None: unset); raise
        :class:`ContextLengthError` when the prompt or the request does not fit the model
        (``prompt_param`` names the field that holds the prompt) and :class:`InvalidRequestError`
        when ``min_tokens`` exceeds what a choice may take."""
        if prompt_tokens >= max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                f"{prompt_tokens} tokens, leaving no room for a completion.",
                param=prompt_param,
            )
        if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        requested = None if max_tokens is None else max_tokens * n
        budget = cls(prompt_tokens, requested, (max_model_len - prompt_tokens) * n, n)
        if min_tokens > budget.max_tokens_per_choice:
            raise InvalidRequestError(
                f"min_tokens ({min_tokens}) must not exceed max_tokens ({budget.max_tokens_per_choice})",
                param="min_tokens",
            )
        return budget

    @classmethod
    def from_reservation(
        cls, prompt_tokens: int, max_tokens: int | None, model_max_len: int | None
    ) -> TokenBudget:
        """The budget as a reservation request carries it (totals; ``model_max_len``: prompt + room)."""
        return cls(
            prompt_tokens, max_tokens, None if model_max_len is None else model_max_len - prompt_tokens
        )

    @property
    def reservation_max_len(self) -> int | None:
        """The prompt plus the room: the ``model_max_len`` a reservation request carries."""
        return None if self.room_tokens is None else self.prompt_tokens + self.room_tokens

    @property
    def max_tokens_per_choice(self) -> int:
        """What one choice may take before any grant: its requested share, else its room."""
        total = self.requested_tokens if self.requested_tokens is not None else self.room_tokens
        if total is None:
            raise ValueError("a budget without max_tokens or model length has no per-choice bound")
        return total // self.n

    def over_cap(self, cap: int | None) -> bool:
        """Whether the request asks for more than a tenant's ``max_tokens_per_request``."""
        return cap is not None and self.requested_tokens is not None and self.requested_tokens > cap

    def grant(
        self,
        *,
        default_tokens: int,
        cap: int | None = None,
        tpm_capacity: int | None = None,
        affordable_tokens: int | None = None,
    ) -> int:
        """The completion tokens to reserve: what was asked for (check :meth:`over_cap` first),
        else the least of the tenant's cap and the room (``default_tokens`` when neither bounds it),
        the TPM limit's room beside the prompt and what the balance pays for; at least 1."""
        if self.requested_tokens is not None:
            return self.requested_tokens
        bounds = [b for b in (cap, self.room_tokens) if b is not None] or [default_tokens]
        if tpm_capacity is not None:
            bounds.append(tpm_capacity - self.prompt_tokens)
        if affordable_tokens is not None:
            bounds.append(affordable_tokens)
        return max(1, min(bounds))

    def per_choice(self, granted: int) -> int:
        """Each choice's share of ``granted`` tokens (the engine's ``max_tokens``); raise
        :class:`InvalidRequestError` when a choice would get none."""
        share = granted // self.n
        if share < 1:
            raise InvalidRequestError(
                f"n={self.n} choices do not fit in the granted {granted} tokens", param="n"
            )
        return share
