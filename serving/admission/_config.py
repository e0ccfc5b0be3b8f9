"""Settings of one pool replica's admission core (typed, validated, every field documented).

Two layers: :class:`AdmissionSettings` is what an operator may set per pool (``pools[].admission``),
checked when the config is parsed; :class:`AdmissionConfig` adds what only the running replica
knows (the engine's batch and KV bounds) and the pool's SLOs, built once by
:meth:`AdmissionSettings.for_engine` when the engine has started.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AdmissionSettings(BaseModel):
    """How one replica queues, admits and refuses requests, as far as an operator sets it.

    Everything has defaults that need no per-GPU tuning; the bounds come from the engine and the
    SLOs from the pool (see :class:`AdmissionConfig`).
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    initial_num_seqs: int | None = Field(default=None, ge=1)
    """Sequence limit at start (None: `max_num_seqs`, the plan's value)."""
    min_num_seqs: int = Field(default=1, ge=1)
    """The sequence limit never drops below this."""
    kv_admit_fraction: float = Field(default=0.9, gt=0, le=1)
    """Share of the KV capacity that in-flight tokens (prompt + generated) may fill at admission;
    the rest is room for the running sequences to grow."""
    tpot_target_quantile: float = Field(default=0.95, gt=0, lt=1)
    """Quantile of recent requests' TPOTs that the limit steers to `tpot_target_fraction` of the SLO
    (it steers the engine's mean TPOT, to this share over the measured quantile/mean spread)."""
    tpot_target_fraction: float = Field(default=0.95, gt=0, le=1)
    """Share of the TPOT SLO that the `tpot_target_quantile` of requests' TPOTs is steered to."""
    ttft_target_quantile: float = Field(default=0.9, gt=0, lt=1)
    """Quantile of recent engine TTFTs (release to first token) that the limit steers to
    `ttft_target_fraction` of the TTFT SLO."""
    ttft_target_fraction: float = Field(default=0.6, gt=0, le=1)
    """Share of the TTFT SLO that the `ttft_target_quantile` of engine TTFTs is steered to (the
    rest is for the queue wait and the slowest requests)."""
    latency_signals: int = Field(default=64, ge=4)
    """Recent released requests whose engine TTFTs (release to first token) the limit looks at."""
    limit_gain: float = Field(default=1.0, gt=0)
    """Share of the gap to the load that would meet the latency targets that the limit closes per
    `limit_time_constant_s`."""
    limit_time_constant_s: float = Field(default=2.0, gt=0)
    """Time constant of the limit's moves, seconds (longer than the engine's reaction to a release:
    a prefill and a few decode steps)."""
    deadline_miss_probability: float = Field(default=0.01, gt=0, lt=0.5)
    """Refuse at once, on arrival, a request whose chance of waiting past the queue deadline exceeds
    this: the chance that the queue releases fewer requests within the deadline than the work ahead
    of it in fair order (its own included) takes, releases counted as Poisson at the measured drain
    rate, widened by their measured dispersion."""
    min_queued_per_tenant: int = Field(default=1, ge=0)
    """A tenant owed service (behind another active tenant, with no backlogged one before it in fair
    order) may queue as many requests as the queue is expected (not sure) to release within the
    deadline, and at least this many: keeping a tenant that is behind backlogged is what makes the
    short queue fair, and a light tenant is served even where the release rate is too low to
    promise anyone a place. Only such requests may, rarely, outwait the deadline."""
    prompt_token_price: float = Field(default=1.0, gt=0)
    """Virtual-counter cost of one prompt token (VTC's w_p)."""
    completion_token_price: float = Field(default=2.0, gt=0)
    """Virtual-counter cost of one completion token (VTC's w_q)."""
    max_queued_tokens: int = Field(default=262_144, ge=1)
    """Bound on queued work, in tokens (prompt + max_tokens of every queued request)."""
    max_queued_requests: int = Field(default=4096, ge=1)
    """Bound on queued requests."""
    queue_deadline_ms: float | None = Field(default=None, gt=0)
    """Longest a request may wait in the queue (None: 60% of the TTFT SLO). A request that may wait
    longer is refused at once (see `deadline_miss_probability`)."""
    drain_window_s: float = Field(default=10.0, gt=0)
    """Saturated time (a new request would have to wait) over which the drain rate is measured."""
    prior_drain_tokens_per_s: float = Field(default=20_000.0, gt=0)
    """Drain rate assumed before one is measured (queue tokens released per second)."""
    latency_window: int = Field(default=256, ge=8)
    """Finished requests kept for the recent TTFT/TPOT figures and SLO attainment."""
    min_retry_after_s: float = Field(default=0.1, ge=0)
    """Smallest `retry_after_s` a refusal carries."""
    batch_share: bool = False
    """Share the engine's batch by served tokens: while more than one organization is active, one
    more than `batch_share_lead_tokens` ahead of the active organization with the smallest counter
    starts nothing, even where the limit has room; its requests wait in the fair queue until the
    others catch up. A batch serves every sequence one token a step, whatever its organization, so
    without this an engine below its limit serves organizations by how many requests each keeps in
    it (VTC, work-conserving, shares only what queues). On, a flood is held to the pace of the
    others, and the engine may run below its limit: throughput lost wherever a larger batch is more
    throughput, and one organization with a single long stream holds every other to about one
    stream's pace. For engines that a few organizations each keep busy (agents, closed loops)."""
    batch_share_lead_tokens: float = Field(default=2048.0, gt=0)
    """With `batch_share`: how far (weighted tokens, as the fair queue counts them) an organization
    may run ahead of the smallest active counter before it waits."""
    batch_share_idle_s: float = Field(default=1.0, ge=0)
    """With `batch_share`: an organization whose last request ended less than this long ago still
    counts as active: the others stay held to its counter, and it is not lifted to theirs when it
    comes back (a client's pause between two requests costs it no share; idle longer, it banks no
    credit, as VTC)."""

    @model_validator(mode="after")
    def _check_settings(self) -> AdmissionSettings:
        init = self.initial_num_seqs
        if init is not None and init < self.min_num_seqs:
            raise ValueError(f"initial_num_seqs ({init}) is below min_num_seqs ({self.min_num_seqs})")
        return self

    def queue_deadline_s_at(self, ttft_slo_ms: float) -> float:
        """The queue deadline in seconds for a pool with this TTFT target (the default applied)."""
        ms = self.queue_deadline_ms if self.queue_deadline_ms is not None else 0.6 * ttft_slo_ms
        return ms / 1000.0

    def for_engine(
        self, max_num_seqs: int, kv_capacity_tokens: int, ttft_slo_ms: float, tpot_slo_ms: float
    ) -> AdmissionConfig:
        """The full configuration for an engine with these bounds and a pool with these SLOs."""
        return AdmissionConfig(
            max_num_seqs=max_num_seqs,
            kv_capacity_tokens=kv_capacity_tokens,
            ttft_slo_ms=ttft_slo_ms,
            tpot_slo_ms=tpot_slo_ms,
            **self.model_dump(include=set(AdmissionSettings.model_fields)),
        )


class AdmissionConfig(AdmissionSettings):
    """The settings plus the bounds from the engine (or the hardware plan) and the pool's SLOs."""

    max_num_seqs: int = Field(ge=1)
    """Upper bound of the in-flight sequence limit: the plan's (or engine's) `max_num_seqs`."""
    kv_capacity_tokens: int = Field(ge=1)
    """KV cache capacity of the engine, tokens; in-flight tokens never exceed `kv_admit_fraction` of it."""
    ttft_slo_ms: float = Field(gt=0)
    """The pool's time-to-first-token target, milliseconds (end to end: queue wait included)."""
    tpot_slo_ms: float = Field(gt=0)
    """The pool's time-per-output-token target, milliseconds."""

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
        return self

    @property
    def queue_deadline_s(self) -> float:
        """The queue deadline in seconds (the default applied)."""
        return self.queue_deadline_s_at(self.ttft_slo_ms)

    @property
    def kv_admit_tokens(self) -> int:
        """Upper bound of the in-flight token limit."""
        return max(1, int(self.kv_capacity_tokens * self.kv_admit_fraction))
