"""The adaptive in-flight limit: a smoothed gradient on measured TPOT and TTFT against the SLOs.

The limit steers the replica's load to where its latencies sit at targets within the SLOs:

* TPOT: every token report of a running request (after its first token) is a sample of the
  engine's time per output token now. Their moving average over about two reports of every running
  request is the engine's mean TPOT: fresh (a change of load shows within a second) and smooth (it
  averages every running request, not one request's luck with the prefills that shared its steps).
  Target: the mean at which the ``tpot_target_quantile`` of requests' TPOTs sits at
  ``tpot_target_fraction`` of the SLO, i.e. that share of the SLO over the measured spread
  (quantile / mean) of the TPOTs of recently finished requests. A replica whose requests all see
  about the same steps runs closer to the SLO than one whose long prefills stall some of them.
* TTFT: the ``ttft_target_quantile`` of the engine TTFTs (release to first token) of the last
  ``latency_signals`` released requests (at most ten seconds old), against ``ttft_target_fraction``
  of the TTFT SLO (the rest is the queue wait's). A quantile: long prompts take long at any load,
  but a prefill backlog lifts the whole upper part. Only TTFTs measured at a load the current limit
  still allows count: after a cut, those measured above it are no evidence against it (and, the
  limit cut, nothing new is released to measure: they must not keep cutting it).
* Pressure ``p``: the larger of the two ratios of measured to target. Every TPOT sample moves the
  limit continuously, ``d ln(limit) = -limit_gain * ln(p) * dt / limit_time_constant_s``: latency
  grows with load, so the load that meets the targets is about ``1 / p`` times the current one, and
  the limit closes a share of that gap per time constant. No single signal is a step: a cut does
  not stall the queue past its deadline, and one slow request does not move the limit.
* It increases only while it binds (a queue waits or a request of the usual size would not fit);
  a decrease starts from at most the in-flight load over 0.9, so a limit far above the load (the
  plan's bound at start) comes down to it at once.
* Bounds: ``[min_num_seqs, max_num_seqs]`` sequences, and at most ``kv_admit_fraction`` of the KV
  capacity in tokens. Only the limit that binds (in flight >= 90% of it) is cut; both grow together.
"""

from __future__ import annotations

import math
from collections import deque

from serving.admission._config import AdmissionConfig

_SPREAD_WINDOW = 128
"""Finished requests over which the spread of TPOTs is measured."""
_PRIOR_SPREAD = 1.2
"""Quantile over mean of request TPOTs assumed until measured."""
_TTFT_MAX_AGE_S = 10.0
"""Engine TTFTs older than this are forgotten: what the engine did then is no evidence now."""
_TPOT_REPORTS = 2.0
"""The engine's mean TPOT averages over about this many token reports of each running request."""
_BINDS = 0.9
"""A limit binds when the in-flight load is at least this share of it. A decrease starts from at
most the load over this share: a limit far above the load would first have to come down to it
before holding anything back, while one near it binds between two arrivals anyway."""
_MAX_STEP = 0.05
"""The most one sample moves the limit, as a share of it (a long gap between samples is no licence
for a jump)."""


class AdaptiveLimit:
    """Sequence and token limits that follow measured latency (pure; the clock is passed in)."""

    def __init__(self, cfg: AdmissionConfig) -> None:
        self._cfg = cfg
        self._max_seqs = float(cfg.max_num_seqs)
        self._min_seqs = float(cfg.min_num_seqs)
        self._max_tokens = float(cfg.kv_admit_tokens)
        self._min_tokens = max(1.0, self._max_tokens * cfg.min_num_seqs / cfg.max_num_seqs)
        self._tokens_per_seq = self._max_tokens / self._max_seqs
        self._seqs = float(cfg.initial_num_seqs or cfg.max_num_seqs)
        self._tokens = self._max_tokens
        self._tpot_slo_s = cfg.tpot_slo_ms / 1000.0
        self._tpot_spread = _PRIOR_SPREAD
        self._finished_tpots: deque[float] = deque(maxlen=_SPREAD_WINDOW)
        self._ttft_target_s = cfg.ttft_target_fraction * cfg.ttft_slo_ms / 1000.0
        self._tpot_s: float | None = None
        self._ttfts: deque[tuple[float, float, int, int]] = deque(maxlen=cfg.latency_signals)
        self._ttft_p: float | None = None
        self._ttft_p_key: tuple[int, int, int, int] | None = None
        self._ttfts_total = 0
        self._last_s: float | None = None
        self.increases_total = 0
        self.decreases_total = 0

    # ---- what the core reads ----------------------------------------------------------------
    @property
    def seq_limit(self) -> int:
        return max(1, int(self._seqs))

    @property
    def token_limit(self) -> int:
        return max(1, int(self._tokens))

    @property
    def tpot_target_s(self) -> float:
        """The engine mean TPOT the limit steers to: the TPOT SLO share, over the recent spread."""
        return self._cfg.tpot_target_fraction * self._tpot_slo_s / self._tpot_spread

    def pressure(self, now: float) -> tuple[float | None, float | None]:
        """Measured TPOT and TTFT over their targets (1: on target; None: not measured yet)."""
        tpot = None if self._tpot_s is None else self._tpot_s / self.tpot_target_s
        horizon = now - _TTFT_MAX_AGE_S
        while self._ttfts and self._ttfts[0][0] < horizon:
            self._ttfts.popleft()
        key = (self._ttfts_total, len(self._ttfts), self.seq_limit, self.token_limit)
        if key != self._ttft_p_key:
            self._ttft_p_key, self._ttft_p = key, self._ttft_pressure()
        return tpot, self._ttft_p

    def _ttft_pressure(self) -> float | None:
        # Only TTFTs measured at a load the current limits still allow are evidence about them:
        # after a cut, the TTFTs measured above it say nothing more (and cut, the limit releases
        # nothing new to measure: they must not keep cutting it).
        seqs, tokens = 1.05 * self._seqs + 1.0, 1.05 * self._tokens
        xs = sorted(t for _, t, s, k in self._ttfts if s <= seqs and k <= tokens)
        if len(xs) < self._cfg.latency_signals // 4:
            return None
        return xs[int(self._cfg.ttft_target_quantile * len(xs))] / self._ttft_target_s

    # ---- measurements -------------------------------------------------------------------------
    def on_ttft(self, ttft_s: float, now: float, load_seqs: int, load_tokens: int) -> None:
        """A released request's first token came ``ttft_s`` after its release (at ``now``); the
        in-flight load while it waited reached ``load_seqs`` sequences and ``load_tokens`` tokens
        (the larger of the load at its release and at its first token)."""
        self._ttfts.append((now, ttft_s, load_seqs, load_tokens))
        self._ttfts_total += 1

    def on_finished_tpot(self, tpot_s: float) -> None:
        """A request finished with this TPOT (over its whole output): updates the spread of request
        TPOTs around their mean, which sets how far below the SLO the mean must stay."""
        self._finished_tpots.append(tpot_s)
        n = len(self._finished_tpots)
        if n >= _SPREAD_WINDOW // 4:
            xs = sorted(self._finished_tpots)
            mean = sum(xs) / n
            if mean > 0:
                self._tpot_spread = max(1.0, xs[int(self._cfg.tpot_target_quantile * n)] / mean)

    def on_tpot(
        self, tpot_s: float, now: float, in_flight_seqs: int, in_flight_tokens: int, limit_binds: bool
    ) -> None:
        """A running request produced tokens ``tpot_s`` apart (one report of several tokens); moves
        the limit by the time since the last report."""
        alpha = 1.0 / (_TPOT_REPORTS * max(in_flight_seqs, 1))
        self._tpot_s = tpot_s if self._tpot_s is None else self._tpot_s + alpha * (tpot_s - self._tpot_s)
        last, self._last_s = self._last_s, now
        if last is None or now <= last:
            return
        cfg = self._cfg
        p_tpot, p_ttft = self.pressure(now)
        assert p_tpot is not None
        p = p_tpot if p_ttft is None else max(p_tpot, p_ttft)
        step = -cfg.limit_gain * math.log(p) * (now - last) / cfg.limit_time_constant_s
        step = max(-_MAX_STEP, min(_MAX_STEP, step))
        if step < 0.0:
            self._decrease(step, in_flight_seqs, in_flight_tokens)
        elif limit_binds:
            self._increase(step)

    # ---- moves ----------------------------------------------------------------------------------
    def _increase(self, step: float) -> None:
        if self._seqs >= self._max_seqs and self._tokens >= self._max_tokens:
            return
        add = math.expm1(step) * self._seqs
        self._seqs = min(self._max_seqs, self._seqs + add)
        self._tokens = min(self._max_tokens, self._tokens + add * self._tokens_per_seq)
        self.increases_total += 1

    def _decrease(self, step: float, in_flight_seqs: int, in_flight_tokens: int) -> None:
        tokens_bind = in_flight_tokens >= _BINDS * self._tokens
        seqs_bind = in_flight_seqs >= _BINDS * self._seqs or not tokens_bind
        # Cut the limit that binds (the sequence limit when neither does), from near the load.
        if seqs_bind:
            base = min(self._seqs, max(in_flight_seqs, 1) / _BINDS)
            self._seqs = max(self._min_seqs, base * math.exp(step))
        if tokens_bind:
            base = min(self._tokens, max(in_flight_tokens, 1) / _BINDS)
            self._tokens = max(self._min_tokens, base * math.exp(step))
        self.decreases_total += 1
