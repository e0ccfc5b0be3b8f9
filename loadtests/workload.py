"""Prompt text and lengths: deterministic from a seed, without knowing the server's tokenizer.

Prompts are made of short common English words separated by spaces; with a BPE tokenizer that is
close to one token per word, so ``n`` words stand for about ``n`` prompt tokens (the server's
``usage.prompt_tokens`` gives the exact count). Output lengths are exact: every request carries
``max_tokens`` and ``ignore_eos: true``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.scenario import (
    AgentWorkload,
    FixedLength,
    JsonlWorkload,
    LengthSpec,
    LogNormalLength,
    ScenarioError,
    SyntheticWorkload,
    UniformLength,
    WorkloadSpec,
)

__all__ = [
    "WORDS",
    "AgentSampler",
    "DrawnRequest",
    "DrawnSession",
    "WorkloadSampler",
    "fit_to_tokens",
    "make_sampler",
    "sample_lengths",
    "synthesize_prompt",
]

WORDS: tuple[str, ...] = tuple(
    """the of and to in is was he for it with as his on be at by had are but from or have an they
    which one you were all we her she there been if more when will would who so no out up into
    do time can only new some could them two may then first any like now my over such our man me
    even most made after also did many off before must well back through years much where your way
    down should because each just those people how too little state good very make world still own
    see men work long here get both between life being under never day same another know while last
    might us great old year come since against go came right used take three states himself few house
    use during without again place around however home small found thought went say part once general
    high upon school every don does got united left number course war until always away something
    fact though water less public put think almost hand enough far took head yet government system
    better set told nothing night end why called didn eyes find going look asked later knew point next
    program city business give group toward young days let room president side social present given""".split()  # noqa: SIM905  (a paragraph is easier to read than 200 quoted words)
)
_WORD_ARRAY = np.array(WORDS, dtype=object)


def synthesize_prompt(n_tokens: int, rng: np.random.Generator) -> str:
    """About ``n_tokens`` tokens of word salad drawn with ``rng`` (same generator state, same text)."""
    idx = rng.integers(0, len(WORDS), size=max(1, n_tokens))
    return " ".join(_WORD_ARRAY[idx].tolist())


def sample_lengths(spec: LengthSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` integer lengths drawn from ``spec``."""
    if isinstance(spec, FixedLength):
        return np.full(n, spec.tokens, dtype=np.int64)
    if isinstance(spec, UniformLength):
        return rng.integers(spec.min_tokens, spec.max_tokens + 1, size=n, dtype=np.int64)
    if isinstance(spec, LogNormalLength):
        raw = rng.lognormal(mean=np.log(spec.median_tokens), sigma=spec.sigma, size=n)
        return np.clip(np.rint(raw), spec.min_tokens, spec.max_tokens).astype(np.int64)
    raise TypeError(f"unknown length spec {type(spec).__name__}")


@dataclass(frozen=True, slots=True)
class DrawnRequest:
    """Body material for one request."""

    prompt: str
    prompt_tokens_target: int
    """Approximate prompt length (words) for synthetic prompts; -1 for JSONL prompts."""
    max_tokens: int


@lru_cache(maxsize=4)
def _tokenizer(path: str) -> object:
    from tokenizers import Tokenizer

    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises bare Exceptions
        raise ScenarioError(f"cannot load tokenizer {file}: {e}") from e


def fit_to_tokens(text: str, n_tokens: int, tokenizer_path: str) -> str:
    """``text`` cut to its first ``n_tokens`` tokens under the given tokenizer."""
    tok: Any = _tokenizer(tokenizer_path)
    ids = tok.encode(text, add_special_tokens=False).ids
    return text if len(ids) <= n_tokens else str(tok.decode(ids[:n_tokens]))


class WorkloadSampler:
    """Draws prompts and output lengths for one tenant from a seeded generator."""

    def __init__(self, spec: SyntheticWorkload | JsonlWorkload, rng: np.random.Generator) -> None:
        self._spec = spec
        self._rng = rng
        self._rows: list[tuple[str, int]] = []
        if isinstance(spec, JsonlWorkload):
            self._rows = _read_jsonl(Path(spec.path))

    def draw(self, n: int) -> list[DrawnRequest]:
        """The next ``n`` requests."""
        if isinstance(self._spec, SyntheticWorkload):
            p = sample_lengths(self._spec.prompt, n, self._rng)
            o = sample_lengths(self._spec.output, n, self._rng)
            texts = [synthesize_prompt(int(pl), self._rng) for pl in p]
            if self._spec.tokenizer is not None:
                texts = [
                    fit_to_tokens(t, int(pl), self._spec.tokenizer) for t, pl in zip(texts, p, strict=True)
                ]
            return [DrawnRequest(t, int(pl), int(ol)) for t, pl, ol in zip(texts, p, o, strict=True)]
        picks = self._rng.integers(0, len(self._rows), size=n)
        return [DrawnRequest(self._rows[i][0], -1, self._rows[i][1]) for i in picks]


@dataclass(frozen=True, slots=True)
class DrawnSession:
    """Material for one agent session: the agent's system prompt and each turn's message and length."""

    agent: int
    system_prompt: str
    system_prompt_tokens: int
    user_prompts: tuple[str, ...]
    max_tokens: tuple[int, ...]


class AgentSampler:
    """Draws agent sessions for one tenant: system prompts fixed per agent, agents taken in turn."""

    def __init__(self, spec: AgentWorkload, rng: np.random.Generator) -> None:
        self._spec = spec
        self._rng = rng
        self.system_prompts = [synthesize_prompt(spec.system_prompt_tokens, rng) for _ in range(spec.agents)]
        self._next_agent = 0

    def draw(self, n: int) -> list[DrawnSession]:
        """The next ``n`` sessions."""
        spec, out = self._spec, []
        for _ in range(n):
            agent = self._next_agent
            self._next_agent = (agent + 1) % spec.agents
            users = sample_lengths(spec.user, spec.turns, self._rng)
            outs = sample_lengths(spec.output, spec.turns, self._rng)
            out.append(
                DrawnSession(
                    agent,
                    self.system_prompts[agent],
                    spec.system_prompt_tokens,
                    tuple(synthesize_prompt(int(u), self._rng) for u in users),
                    tuple(int(o) for o in outs),
                )
            )
        return out


def make_sampler(spec: WorkloadSpec, rng: np.random.Generator) -> WorkloadSampler | AgentSampler:
    """The sampler for a workload: sessions for agent workloads, single requests otherwise."""
    if isinstance(spec, AgentWorkload):
        return AgentSampler(spec, rng)
    return WorkloadSampler(spec, rng)


def _read_jsonl(path: Path) -> list[tuple[str, int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ScenarioError(f"cannot read workload file {path}: {e}") from e
    rows: list[tuple[str, int]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompt, max_tokens = obj["prompt"], int(obj["max_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise ScenarioError(f"{path}:{n}: need a JSON object with 'prompt' and 'max_tokens' ({e})") from e
        if not isinstance(prompt, str) or max_tokens < 1:
            raise ScenarioError(f"{path}:{n}: 'prompt' must be a string and 'max_tokens' >= 1")
        rows.append((prompt, max_tokens))
    if not rows:
        raise ScenarioError(f"workload file {path} has no requests")
    return rows
