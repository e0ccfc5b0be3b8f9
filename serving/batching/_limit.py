"""The adaptive in-flight limit: AIMD on measured TTFT and TPOT against the pool's SLOs.

* Additive increase: every request that finishes its TPOT probe with headroom (TPOT and engine TTFT
  at most ``increase_below_fraction`` of their targets) while the limit binds (a queue is waiting or
  the in-flight count is at the limit) adds ``additive_increase_seqs`` sequences. Per request, not per
  round of ``limit`` requests as TCP does: that recovers from a cut in seconds, not minutes, and the
  dead band between ``increase_below_fraction`` and ``decrease_above_fraction`` stops the climb
  before the SLO is reached.
* Multiplicative decrease: a request whose engine TTFT or TPOT exceeds ``decrease_above_fraction`` of
  its target, while more than ``miss_tolerance`` of the last ``miss_window`` signals missed, sets the limit to ``multiplicative_decrease`` times the in-flight count (not the limit,
  which may not bind). Requests released before the last decrease saw the old load and are ignored:
  at most one decrease per round, like TCP's one reduction per RTT.
* Bounds: ``[min_num_seqs, max_num_seqs]`` sequences, and at most ``kv_admit_fraction`` of the KV
  capacity in tokens. Only the limit that binds (in flight >= 90% of it) is cut; both grow together.

The engine-side TTFT (release to first token) has the budget left after the queue deadline,
``ttft_slo - queue_deadline`` (at least a quarter of the TTFT SLO); the queue wait is bounded by the
deadline itself.
"""

from __future__ import annotations

from collections import deque

from serving.batching._config import AdmissionConfig


class AimdLimit:
    """Sequence and token limits that follow measured latency (pure; no clock)."""

    def __init__(self, cfg: AdmissionConfig) -> None:
        self._cfg = cfg
        self._max_seqs = float(cfg.max_num_seqs)
        self._min_seqs = float(cfg.min_num_seqs)
        self._max_tokens = float(cfg.kv_admit_tokens)
        self._min_tokens = max(1.0, self._max_tokens * cfg.min_num_seqs / cfg.max_num_seqs)
        self._seqs = float(cfg.initial_num_seqs or cfg.max_num_seqs)
        self._tokens = self._max_tokens
        self._tpot_target_s = cfg.tpot_slo_ms / 1000.0
        ttft_s = cfg.ttft_slo_ms / 1000.0
        self._ttft_target_s = max(ttft_s - cfg.queue_deadline_s, 0.25 * ttft_s)
        self._recent: deque[bool] = deque(maxlen=cfg.miss_window)
        self.epoch = 0
        """Number of decreases so far; a request remembers the epoch it was released in."""
        self.increases_total = 0
        self.decreases_total = 0

    @property
    def seq_limit(self) -> int:
        return max(1, int(self._seqs))

    @property
    def token_limit(self) -> int:
        return max(1, int(self._tokens))

    @property
    def engine_ttft_target_s(self) -> float:
        return self._ttft_target_s

    def on_ttft(self, ttft_s: float, released_epoch: int, in_flight_seqs: int, in_flight_tokens: int) -> None:
        """A request's first token came ``ttft_s`` after its release."""
        miss = ttft_s > self._cfg.decrease_above_fraction * self._ttft_target_s
        if self._record(miss):
            self._decrease(released_epoch, in_flight_seqs, in_flight_tokens)

    def on_tpot(
        self,
        tpot_s: float,
        ttft_s: float | None,
        released_epoch: int,
        in_flight_seqs: int,
        in_flight_tokens: int,
        limit_binds: bool,
    ) -> None:
        """A request's TPOT probe (after ``tpot_probe_tokens`` tokens, or at its finish)."""
        cfg = self._cfg
        miss = tpot_s > cfg.decrease_above_fraction * self._tpot_target_s
        if self._record(miss):
            self._decrease(released_epoch, in_flight_seqs, in_flight_tokens)
        if miss:
            return
        ttft_ok = ttft_s is None or ttft_s <= cfg.increase_below_fraction * self._ttft_target_s
        if limit_binds and ttft_ok and tpot_s <= cfg.increase_below_fraction * self._tpot_target_s:
            self._increase()

    def _record(self, miss: bool) -> bool:
        """Note a signal; True when it is a miss and recent misses exceed the tolerance."""
        self._recent.append(miss)
        if not miss:
            return False
        return sum(self._recent) > self._cfg.miss_tolerance * len(self._recent)

    def _increase(self) -> None:
        if self._seqs >= self._max_seqs and self._tokens >= self._max_tokens:
            return
        step = self._cfg.additive_increase_seqs
        tokens_per_seq = self._max_tokens / self._max_seqs
        self._seqs = min(self._max_seqs, self._seqs + step)
        self._tokens = min(self._max_tokens, self._tokens + step * tokens_per_seq)
        self.increases_total += 1

    def _decrease(self, released_epoch: int, in_flight_seqs: int, in_flight_tokens: int) -> None:
        if released_epoch < self.epoch:
            return  # released before the last decrease: it measured the old load
        beta = self._cfg.multiplicative_decrease
        seqs_bind = in_flight_seqs >= 0.9 * self._seqs
        tokens_bind = in_flight_tokens >= 0.9 * self._tokens
        # Cut the limit that binds (the sequence limit when neither does): cutting one that does not
        # bind below the running load would stall admission until the load drained beneath it.
        if seqs_bind or not tokens_bind:
            self._seqs = max(self._min_seqs, beta * min(self._seqs, float(max(in_flight_seqs, 1))))
        if tokens_bind:
            self._tokens = max(self._min_tokens, beta * min(self._tokens, float(max(in_flight_tokens, 1))))
        self.epoch += 1
        self.decreases_total += 1
