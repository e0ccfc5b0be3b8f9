"""Per-request state of the simulated engine: deterministic text, stop strings, merged deltas."""

from __future__ import annotations

import asyncio
import zlib

from serving.engines._sim_sched import SimSeq
from serving.engines.base import ChoiceDelta, ChunkSink, EngineChunk, EngineError, EngineRequest, TokenLogprob

__all__ = ["SimStream", "seq_hash", "word"]

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "it",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "has",
    "or",
    "had",
    "not",
    "but",
    "first",
    "one",
    "their",
    "its",
    "new",
    "after",
    "who",
    "they",
    "have",
    "her",
    "she",
    "two",
    "been",
    "other",
    "when",
    "there",
    "all",
    "during",
    "into",
    "school",
    "time",
    "may",
    "years",
    "more",
    "most",
    "only",
    "over",
    "city",
    "some",
    "world",
    "would",
    "where",
    "later",
    "up",
    "such",
    "used",
    "many",
    "can",
    "state",
    "about",
    "national",
    "out",
    "known",
    "university",
    "united",
    "then",
    "made",
    "system",
    "through",
    "part",
    "between",
    "three",
    "river",
    "well",
    "game",
    "team",
    "being",
    "film",
    "based",
    "second",
    "also",
    "work",
    "town",
    "year",
    "club",
    "like",
    "group",
    "including",
    "several",
    "north",
    "under",
    "both",
    "south",
    "center",
    "early",
    "number",
    "could",
    "four",
    "people",
    "population",
    "while",
    "family",
    "west",
    "these",
    "high",
    "what",
    "before",
    "because",
    "each",
    "since",
    "series",
    "government",
    "song",
    "did",
    "become",
    "around",
    "long",
    "him",
    "area",
    "same",
    "life",
    "will",
    "until",
    "major",
    "season",
    "album",
    "named",
    "local",
    "five",
    "house",
    "make",
    "home",
    "light",
    "stone",
    "water",
    "field",
    "model",
    "token",
    "weir",
    "gate",
    "cloud",
]
_MULT = 2654435761


def seq_hash(request: EngineRequest, index: int) -> int:
    """A stable 32-bit hash of (request or seed, choice index): the seed of a choice's text."""
    base = f"seed:{request.sampling.seed}" if request.sampling.seed is not None else request.request_id
    return zlib.crc32(f"{base}#{index}".encode())


def word(h: int, position: int) -> str:
    """The deterministic text of output token ``position`` of the choice with hash ``h``."""
    return " " + _WORDS[((h + position * _MULT) >> 7) % len(_WORDS)]


class SimStream:
    """One request: its sequences, buffered output per choice, and the consumer's waiter."""

    __slots__ = (
        "_hold",
        "_prompt_tokens",
        "_simple",
        "_staged",
        "completion_tokens",
        "deltas_pending",
        "done",
        "emit_times",
        "error",
        "finish",
        "first_token_at",
        "full",
        "hashes",
        "logprobs",
        "request",
        "sent_upto",
        "seqs",
        "sink",
        "stops",
        "texts",
        "token_counts",
        "visible_len",
        "waiter",
    )

    def __init__(
        self, request: EngineRequest, seqs: list[SimSeq], hashes: list[int], record_lag: bool
    ) -> None:
        n = len(seqs)
        self.request = request
        self._prompt_tokens = len(request.prompt_token_ids)
        self.seqs = seqs
        self.hashes = hashes
        self.stops = request.sampling.stop
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._staged: list[tuple[int, str, int, TokenLogprob | None, float]] = []
        """Tokens of the step in flight: (choice, piece, text length after it, logprob, time)."""
        self.texts: list[list[str]] = [[] for _ in range(n)]
        """Without stop strings: published pieces not yet sent, per choice (joined at take)."""
        self.full = [""] * n
        """With stop strings: the whole text per choice, staged tokens included (matching needs it) ..."""
        self.visible_len = [0] * n
        """... how much of it is published ..."""
        self.sent_upto = [0] * n
        """... and how much of that was sent."""
        self.finish: list[str | None] = [None] * n
        """Published finish reason per choice."""
        self.token_counts = [0] * n
        self.logprobs: list[list[TokenLogprob]] | None = (
            [[] for _ in range(n)] if request.sampling.logprobs is not None else None
        )
        self.deltas_pending = [False] * n
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.emit_times: list[float] | None = [] if record_lag else None
        self.waiter: asyncio.Future[None] | None = None
        self.sink: ChunkSink | None = None
        """Set for a submitted (pushed) request: the engine hands it each chunk itself."""
        self.done = False
        self.error: EngineError | None = None
        self._simple = n == 1 and not self.stops and self.logprobs is None
        """One choice, no stop strings, no logprobs: the common case, with fast paths."""

    def stage(self, seq: SimSeq, t: float) -> bool:
        """Prepare the token ``seq`` samples in the step ending at ``t`` (not visible yet).

        Returns True when a stop string ends the choice.
        """
        i = seq.index
        piece = word(self.hashes[i], seq.num_output)
        lp = self._logprob(i, seq.num_output, piece) if self.logprobs is not None else None
        stopped = False
        end = 0
        if self.stops:
            # Search only where a new match can start: the tail a stop string could straddle.
            full = self.full[i] + piece
            lo = max(0, len(self.full[i]) - self._hold)
            cut = min((p for p in (full.find(s, lo) for s in self.stops) if p >= 0), default=-1)
            if cut >= 0:
                full, stopped = full[:cut], True
            self.full[i] = full
            end = len(full)
        self._staged.append((i, piece, end, lp, t))
        return stopped

    def publish(self) -> None:
        """The step ended: make its staged tokens visible and wake the consumer."""
        seqs, emit, staged = self.seqs, self.emit_times, self._staged
        if self._simple:
            _, piece, _, _, t = staged[0]  # one choice: exactly one token per step
            self.completion_tokens += 1
            self.token_counts[0] += 1
            self.deltas_pending[0] = True
            self.finish[0] = seqs[0].finish_reason
            self.texts[0].append(piece)
            if emit is not None:
                emit.append(t)
            if self.first_token_at is None:
                self.first_token_at = t
            staged.clear()
        for i, piece, end, lp, t in staged:
            self.completion_tokens += 1
            self.token_counts[i] += 1
            self.deltas_pending[i] = True
            self.finish[i] = seqs[i].finish_reason
            if self.stops:
                self.visible_len[i] = end
            else:
                self.texts[i].append(piece)
            if lp is not None and self.logprobs is not None:
                self.logprobs[i].append(lp)
            if emit is not None:
                emit.append(t)
            if self.first_token_at is None:
                self.first_token_at = t
        self._staged.clear()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _logprob(self, i: int, pos: int, piece: str) -> TokenLogprob:
        k = self.request.sampling.logprobs or 0
        h = (self.hashes[i] + pos * _MULT) & 0xFFFF
        lp = -0.05 - h / 0xFFFF
        top = [(word(self.hashes[i] ^ (j + 1), pos), lp - 0.5 * (j + 1)) for j in range(k)]
        return TokenLogprob(token=piece, logprob=lp, top=top)

    def fail(self, error: EngineError) -> None:
        self.error = error
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def has_news(self) -> bool:
        return self.error is not None or True in self.deltas_pending

    def take(self) -> EngineChunk:
        """Everything published since the last chunk, merged into one chunk."""
        if self._simple:
            self.deltas_pending[0] = False
            finish = self.finish[0]
            pieces = self.texts[0]
            text = pieces[0] if len(pieces) == 1 else "".join(pieces)
            pieces.clear()
            delta = ChoiceDelta(0, text, self.token_counts[0], finish)
            self.token_counts[0] = 0
            self.done = finish is not None
            return EngineChunk(
                [delta], self._prompt_tokens, self.completion_tokens, self.done, self.seqs[0].cached_tokens
            )
        deltas = []
        for i, pending in enumerate(self.deltas_pending):
            if not pending:
                continue
            self.deltas_pending[i] = False
            finish = self.finish[i]
            if self.stops:
                # Hold back what could be the start of a stop string until the choice ends.
                start, vis = self.sent_upto[i], self.visible_len[i]
                end = vis if finish is not None else max(start, vis - self._hold)
                text = self.full[i][start:end]
                self.sent_upto[i] = end
            else:
                pieces = self.texts[i]
                text = pieces[0] if len(pieces) == 1 else "".join(pieces)
                pieces.clear()
            lps = None
            if self.logprobs is not None:
                lps, self.logprobs[i] = self.logprobs[i], []
            deltas.append(ChoiceDelta(i, text, self.token_counts[i], finish, lps))
            self.token_counts[i] = 0
        finished = None not in self.finish
        self.done = finished
        return EngineChunk(
            deltas=deltas,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self.completion_tokens,
            finished=finished,
            cached_tokens=self.seqs[0].cached_tokens,
        )
