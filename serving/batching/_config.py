"""Settings of one pool replica's admission core (typed, validated, every field documented)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AdmissionConfig(BaseModel):
    """How one replica queues, admits and refuses requests.

    The bounds (``max_num_seqs``, ``kv_capacity_tokens``) come from the hardware plan; the SLOs from
    the pool. Everything else has defaults that need no per-GPU tuning.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    max_num_seqs: int = Field(ge=1)
    """Upper bound of the in-flight sequence limit: the plan's (or engine's) `max_num_seqs`."""
    kv_capacity_tokens: int = Field(ge=1)
    """KV cache capacity of the engine, tokens; in-flight tokens never exceed `kv_admit_fraction` of it."""
    ttft_slo_ms: float = Field(gt=0)
    """The pool's time-to-first-token target, milliseconds (end to end: queue wait included)."""
    tpot_slo_ms: float = Field(gt=0)
    """The pool's time-per-output-token target, milliseconds."""
    initial_num_seqs: int | None = Field(default=None, ge=1)
    """Sequence limit at start (None: `max_num_seqs`, the plan's value)."""
    min_num_seqs: int = Field(default=1, ge=1)
    """The sequence limit never drops below this."""
    kv_admit_fraction: float = Field(default=0.9, gt=0, le=1)
    """Share of the KV capacity that in-flight tokens (prompt + generated) may fill at admission;
    the rest is room for the running sequences to grow."""
    increase_below_fraction: float = Field(default=0.8, gt=0, le=1)
    """A request whose TPOT and engine TTFT are at most this share of their SLOs shows headroom."""
    decrease_above_fraction: float = Field(default=0.95, gt=0, le=2)
    """A request whose TPOT or engine TTFT exceeds this share of its SLO counts as a miss."""
    additive_increase_seqs: float = Field(default=1.0, gt=0)
    """Sequences added to the limit per request that shows headroom while the limit binds."""
    multiplicative_decrease: float = Field(default=0.85, gt=0, lt=1)
    """On a miss the limit becomes this times the in-flight count (at most once per round)."""
    miss_tolerance: float = Field(default=0.05, ge=0, lt=1)
    """Share of the recent latency signals that may miss before a miss cuts the limit (0: every miss
    cuts; a few long prompts miss TTFT at any load and should not)."""
    miss_window: int = Field(default=64, ge=1)
    """Latency signals (one TTFT and one TPOT per request) over which the miss share is measured."""
    predicted_wait_fraction: float = Field(default=0.5, gt=0, le=1)
    """Refuse at once a request whose predicted queue wait exceeds this share of the queue deadline
    (the prediction is a mean; the margin keeps deadline expiries rare)."""
    min_queued_per_tenant: int = Field(default=4, ge=0)
    """A tenant owed service (its virtual counter at most every other backlogged tenant's) with fewer
    requests queued than this is not refused for a predicted wait: the fair order releases it first
    (the GPS estimate is pessimistic for it), and the deadline still bounds its wait. Keeps a
    tenant that is behind backlogged, and light tenants served."""
    tpot_probe_tokens: int = Field(default=16, ge=2)
    """A running request reports its TPOT to the limit after this many output tokens (or at finish)."""
    prompt_token_price: float = Field(default=1.0, gt=0)
    """Virtual-counter cost of one prompt token (VTC's w_p)."""
    completion_token_price: float = Field(default=2.0, gt=0)
    """Virtual-counter cost of one completion token (VTC's w_q)."""
    max_queued_tokens: int = Field(default=262_144, ge=1)
    """Bound on queued work, in tokens (prompt + max_tokens of every queued request)."""
    max_queued_requests: int = Field(default=4096, ge=1)
    """Bound on queued requests."""
    queue_deadline_ms: float | None = Field(default=None, gt=0)
    """Longest a request may wait in the queue (None: 60% of the TTFT SLO). A request predicted to
    wait longer is refused at once."""
    drain_window_s: float = Field(default=10.0, gt=0)
    """Backlogged time over which the queue's drain rate is measured."""
    prior_drain_tokens_per_s: float = Field(default=20_000.0, gt=0)
    """Drain rate assumed before one is measured (queue tokens released per second)."""
    latency_window: int = Field(default=256, ge=8)
    """Finished requests kept for the recent TTFT/TPOT figures and SLO attainment."""
    min_retry_after_s: float = Field(default=0.1, ge=0)
    """Smallest `retry_after_s` a refusal carries."""

    @model_validator(mode="after")
    def _check(self) -> AdmissionConfig:
        if self.min_num_seqs > self.max_num_seqs:
            raise ValueError(f"min_num_seqs ({self.min_num_seqs}) exceeds max_num_seqs ({self.max_num_seqs})")
        init = self.initial_num_seqs
        if init is not None and not self.min_num_seqs <= init <= self.max_num_seqs:
            raise ValueError(
                f"initial_num_seqs ({init}) must lie in [min_num_seqs ({self.min_num_seqs}), "
                f"max_num_seqs ({self.max_num_seqs})]"
            )
        if self.increase_below_fraction >= self.decrease_above_fraction:
            raise ValueError(
                f"increase_below_fraction ({self.increase_below_fraction}) must be below "
                f"decrease_above_fraction ({self.decrease_above_fraction})"
            )
        return self

    @property
    def queue_deadline_s(self) -> float:
        """The queue deadline in seconds (the default applied)."""
        ms = self.queue_deadline_ms if self.queue_deadline_ms is not None else 0.6 * self.ttft_slo_ms
        return ms / 1000.0

    @property
    def kv_admit_tokens(self) -> int:
        """Upper bound of the in-flight token limit."""
        return max(1, int(self.kv_capacity_tokens * self.kv_admit_fraction))
