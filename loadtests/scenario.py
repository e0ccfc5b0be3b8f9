"""The scenario file: what to send, to whom, how fast, for how long, and what counts as good.

A scenario is YAML validated by pydantic (``extra="forbid"``, every field documented). String values may
reference the environment as ``${VAR}`` or ``${VAR:-default}`` (API keys stay out of files).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "MAX_DURATION_S",
    "MAX_REQUESTS",
    "AdminSpec",
    "AgentWorkload",
    "ArrivalSpec",
    "BoundsSpec",
    "ClosedLoopArrival",
    "ConstantArrival",
    "FixedLength",
    "GammaArrival",
    "JsonlWorkload",
    "LengthSpec",
    "LogNormalLength",
    "PoissonArrival",
    "RampArrival",
    "Scenario",
    "ScenarioError",
    "SloSpec",
    "SweepSpec",
    "SyntheticWorkload",
    "TenantSpec",
    "UniformLength",
    "WorkloadSpec",
    "is_loopback_url",
    "load_scenario",
]

MAX_DURATION_S = 3600.0
"""No run lasts longer than an hour."""
MAX_REQUESTS = 1_000_000
"""No run sends more than a million requests."""
MAX_RATE_RPS = 20_000.0
MAX_CONCURRENCY = 10_000


class ScenarioError(ValueError):
    """The scenario file is missing, unreadable or invalid; the message names the offending values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- arrival processes


class ConstantArrival(_Strict):
    """Evenly spaced requests: one every ``1 / rate_rps`` seconds."""

    kind: Literal["constant"] = "constant"
    rate_rps: float = Field(gt=0, le=MAX_RATE_RPS)
    """Requests per second."""


class PoissonArrival(_Strict):
    """Poisson process: exponential inter-arrival times (coefficient of variation 1)."""

    kind: Literal["poisson"] = "poisson"
    rate_rps: float = Field(gt=0, le=MAX_RATE_RPS)
    """Mean requests per second."""


class GammaArrival(_Strict):
    """Gamma-distributed gaps, as ``vllm bench serve --burstiness``: shape ``burstiness``.

    ``burstiness`` 1 is Poisson; below 1 is burstier (CV ``1/sqrt(burstiness)``); above 1 is smoother.
    """

    kind: Literal["gamma"] = "gamma"
    rate_rps: float = Field(gt=0, le=MAX_RATE_RPS)
    """Mean requests per second."""
    burstiness: float = Field(gt=0, le=1000)
    """Gamma shape factor; inter-arrival CV is ``1/sqrt(burstiness)``."""


class RampArrival(_Strict):
    """Rate changing linearly from ``start_rate_rps`` to ``end_rate_rps`` over the run's duration."""

    kind: Literal["ramp"] = "ramp"
    start_rate_rps: float = Field(ge=0, le=MAX_RATE_RPS)
    """Rate at t = 0."""
    end_rate_rps: float = Field(ge=0, le=MAX_RATE_RPS)
    """Rate at t = duration."""
    poisson: bool = True
    """True: non-homogeneous Poisson; False: deterministic spacing following the rate."""

    @model_validator(mode="after")
    def _not_both_zero(self) -> RampArrival:
        if self.start_rate_rps == 0 and self.end_rate_rps == 0:
            raise ValueError("ramp needs start_rate_rps or end_rate_rps > 0 (both are 0)")
        return self


class ClosedLoopArrival(_Strict):
    """``concurrency`` workers, each sending its next request when the previous one finishes."""

    kind: Literal["closed"] = "closed"
    concurrency: int = Field(ge=1, le=MAX_CONCURRENCY)
    """Number of requests kept in flight."""
    think_time_s: float = Field(default=0.0, ge=0, le=600)
    """Pause between a worker's response and its next request."""


ArrivalSpec = Annotated[
    ConstantArrival | PoissonArrival | GammaArrival | RampArrival | ClosedLoopArrival,
    Field(discriminator="kind"),
]

# ---------------------------------------------------------------- lengths and workloads


class FixedLength(_Strict):
    """Always ``tokens``."""

    kind: Literal["fixed"] = "fixed"
    tokens: int = Field(ge=1, le=1_000_000)
    """Length in tokens."""


class UniformLength(_Strict):
    """Uniform integer in ``[min_tokens, max_tokens]``."""

    kind: Literal["uniform"] = "uniform"
    min_tokens: int = Field(ge=1)
    """Smallest length, inclusive."""
    max_tokens: int = Field(ge=1, le=1_000_000)
    """Largest length, inclusive."""

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"uniform: min_tokens={self.min_tokens} > max_tokens={self.max_tokens}")
        return self


class LogNormalLength(_Strict):
    """Log-normal with the given median and log-space sigma, rounded and clamped."""

    kind: Literal["lognormal"] = "lognormal"
    median_tokens: float = Field(gt=0)
    """Median length (``exp(mu)``)."""
    sigma: float = Field(ge=0, le=5)
    """Standard deviation of ``log(length)``."""
    min_tokens: int = Field(default=1, ge=1)
    """Lower clamp."""
    max_tokens: int = Field(ge=1, le=1_000_000)
    """Upper clamp."""

    @model_validator(mode="after")
    def _ordered(self) -> LogNormalLength:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"lognormal: min_tokens={self.min_tokens} > max_tokens={self.max_tokens}")
        return self


LengthSpec = Annotated[FixedLength | UniformLength | LogNormalLength, Field(discriminator="kind")]


class SyntheticWorkload(_Strict):
    """Synthesized prompts of a drawn length (about one token per word) and drawn output lengths."""

    kind: Literal["synthetic"] = "synthetic"
    prompt: LengthSpec
    """Prompt length distribution, in (approximate) tokens."""
    output: LengthSpec
    """Output length distribution; sent as ``max_tokens`` with ``ignore_eos``, so exact."""
    tokenizer: str | None = None
    """Optional ``tokenizer.json`` (or a folder holding one) of the served model: prompts are then cut to
    the drawn length in that tokenizer's tokens (exact to about one token) instead of ~1 token per word."""


class JsonlWorkload(_Strict):
    """Requests drawn (with replacement, seeded) from a JSONL file of ``{"prompt", "max_tokens"}``."""

    kind: Literal["jsonl"] = "jsonl"
    path: str
    """JSONL file; a relative path is resolved against the scenario file's folder."""


class AgentWorkload(_Strict):
    """Agent sessions: multi-turn chats that share a long system prompt per agent.

    Each tenant runs ``agents`` agents, each with its own system prompt (``system_prompt_tokens``
    long, the same in all its sessions: an industry agent's instructions and tool definitions). A
    *session* is ``turns`` chat requests: turn k sends the system prompt, the k-1 previous user
    messages with the answers the server gave, and a new user message; ``think_time_s`` passes
    between an answer and the next turn. The arrival process starts sessions (open loop: at its
    times; closed loop: ``concurrency`` sessions in flight), spread over the agents in turn.
    """

    kind: Literal["agent"] = "agent"
    agents: int = Field(default=10, ge=1, le=1000)
    """Agents per tenant; each has its own system prompt."""
    system_prompt_tokens: int = Field(default=2000, ge=1, le=1_000_000)
    """Length of each agent's system prompt, in (approximate) tokens."""
    turns: int = Field(default=8, ge=1, le=200)
    """Requests per session."""
    user: LengthSpec = Field(default_factory=lambda: FixedLength(tokens=100))
    """Length of each turn's new user message."""
    output: LengthSpec = Field(default_factory=lambda: FixedLength(tokens=150))
    """Answer length per turn; sent as ``max_tokens`` with ``ignore_eos``, so exact."""
    think_time_s: float = Field(default=1.0, ge=0, le=600)
    """Pause between an answer and the session's next turn."""


WorkloadSpec = Annotated[SyntheticWorkload | JsonlWorkload | AgentWorkload, Field(discriminator="kind")]

# ---------------------------------------------------------------- tenants, SLOs, bounds, sweeps


class TenantSpec(_Strict):
    """One caller: its key, its share of the scenario's stream, or its own arrival process."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    """Label used in results (bounded: the scenario's tenant list)."""
    api_key: str | None = None
    """Bearer key. When absent, the tenant is created through the admin API (needs ``admin``)."""
    share: float = Field(default=1.0, gt=0)
    """Weight in the scenario-wide arrival stream (ignored when ``arrival`` is set)."""
    arrival: ArrivalSpec | None = None
    """The tenant's own arrival process, independent of the scenario-wide one."""
    workload: WorkloadSpec | None = None
    """The tenant's own workload; defaults to the scenario's."""
    create_body: dict[str, Any] = Field(default_factory=dict)
    """Extra fields for ``POST /admin/v1/tenants`` (quotas, credits) when the tenant is created."""


class AdminSpec(_Strict):
    """Admin API access, used to create tenants that have no ``api_key``."""

    api_key: str = Field(min_length=1)
    """Admin bearer key (use ``${VAR}`` to read it from the environment)."""
    base_url: str | None = None
    """Admin API root; defaults to ``target_url``."""


class SloSpec(_Strict):
    """Per-request service-level objectives; a request is *good* when it meets all that are set."""

    ttft_ms: float | None = Field(default=None, gt=0)
    """Time to first token bound."""
    tpot_ms: float | None = Field(default=None, gt=0)
    """Mean time per output token (after the first) bound."""
    e2e_ms: float | None = Field(default=None, gt=0)
    """End-to-end latency bound."""


class BoundsSpec(_Strict):
    """Every run stops by itself: after ``duration_s`` of sending, or ``max_requests``, whichever first."""

    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
    """How long requests are sent."""
    max_requests: int = Field(ge=1, le=MAX_REQUESTS)
    """Most requests sent in total (per sweep point)."""
    drain_timeout_s: float = Field(default=30.0, ge=0, le=600)
    """After sending stops, how long in-flight requests may finish before they are cancelled."""
    request_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """Per-request limit; a request running longer is cancelled and recorded as ``timeout``."""


class SweepSpec(_Strict):
    """Repeat the run for each value of the scenario-wide rate or concurrency."""

    parameter: Literal["rate", "concurrency"]
    """``rate`` replaces the scenario-wide ``rate_rps``; ``concurrency`` the closed-loop concurrency."""
    values: list[float] = Field(min_length=1, max_length=50)
    """Values, run in order; tenants with their own ``arrival`` keep it unchanged."""


class Scenario(_Strict):
    """A complete load test."""

    name: str = Field(min_length=1, max_length=64)
    """Scenario name, shown in reports."""
    description: str = ""
    """What the scenario shows."""
    target_url: str
    """Base URL of the OpenAI-compatible server (``http://127.0.0.1:8000``), without ``/v1``."""
    model: str = Field(min_length=1)
    """Model name sent in every request."""
    endpoint: Literal["chat", "completions"] = "chat"
    """``/v1/chat/completions`` (one user message) or ``/v1/completions``."""
    seed: int = 0
    """Seed for arrivals, tenant choice, lengths and prompt text: the same seed, the same requests."""
    tenants: list[TenantSpec] = Field(min_length=1, max_length=1000)
    """Callers; names must be unique."""
    arrival: ArrivalSpec | None = None
    """Scenario-wide arrival process, split between tenants without their own by ``share``."""
    workload: WorkloadSpec
    """Default prompt and output lengths."""
    slo: SloSpec = Field(default_factory=SloSpec)
    """Objectives for goodput."""
    bounds: BoundsSpec
    """Mandatory limits on time and requests."""
    sweep: SweepSpec | None = None
    """Optional sweep over rate or concurrency."""
    admin: AdminSpec | None = None
    """Admin API access to create tenants without keys."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Extra request fields merged into every body (``ignore_eos: true`` is always sent)."""
    metrics_url: str | None = None
    """The server's Prometheus page (``http://127.0.0.1:9464/metrics`` on a Tokenweir gateway's
    operator listener, ``/metrics`` on vLLM's server): read before and after each run for the
    engines' ``vllm:prefix_cache_queries``/``hits``, the server-side cache hit rate."""

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [t.name for t in self.tenants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tenant names must be unique; repeated: {dupes}")
        shared = [t.name for t in self.tenants if t.arrival is None]
        if shared and self.arrival is None:
            raise ValueError(f"tenants {shared} have no 'arrival' and the scenario has no 'arrival' either")
        keyless = [t.name for t in self.tenants if t.api_key is None]
        if keyless and self.admin is None:
            raise ValueError(f"tenants {keyless} have no api_key and no 'admin' is given to create them")
        if self.sweep is not None:
            want = "closed" if self.sweep.parameter == "concurrency" else None
            kind = self.arrival.kind if self.arrival is not None else None
            if kind is None:
                raise ValueError("a sweep needs the scenario-wide 'arrival'")
            if want == "closed" and kind != "closed":
                raise ValueError(f"sweep over concurrency needs arrival kind 'closed', got {kind!r}")
            if self.sweep.parameter == "rate" and kind not in ("constant", "poisson", "gamma"):
                raise ValueError(f"sweep over rate needs a constant/poisson/gamma arrival, got {kind!r}")
        agents = [t.name for t in self.tenants if isinstance(t.workload or self.workload, AgentWorkload)]
        if agents and self.endpoint != "chat":
            raise ValueError(
                f"agent workloads (tenants {agents}) need endpoint 'chat', got {self.endpoint!r}"
            )
        parsed = urlparse(self.target_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"target_url must be http(s)://host[:port], got {self.target_url!r}")
        return self

    def with_sweep_value(self, value: float) -> Scenario:
        """This scenario with the sweep parameter set to ``value`` (no sweep left)."""
        assert self.sweep is not None and self.arrival is not None
        if self.sweep.parameter == "rate":
            arrival = self.arrival.model_copy(update={"rate_rps": float(value)})
        else:
            arrival = self.arrival.model_copy(update={"concurrency": int(value)})
        return self.model_copy(update={"arrival": arrival, "sweep": None})


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is ``localhost`` or a loopback address."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is None:
                raise ScenarioError(f"environment variable {var} is not set (referenced as ${{{var}}})")
            return default

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, expand ``${VAR}``, apply ``a.b.c=value`` overrides (YAML-typed) and validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ScenarioError(f"scenario {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ScenarioError(f"scenario {path} must be a mapping, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ScenarioError(f"override {item!r} must look like key.path=value")
        try:
            _set_path(raw, key.strip(), yaml.safe_load(text))
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise ScenarioError(f"override {item!r} does not fit the scenario: {e}") from e
    raw = _expand(raw)
    wl = raw.get("workload")
    if isinstance(wl, dict) and wl.get("kind") == "jsonl" and not Path(str(wl.get("path", ""))).is_absolute():
        wl["path"] = str((path.parent / str(wl.get("path", ""))).resolve())
    for t in raw.get("tenants") or []:
        twl = t.get("workload") if isinstance(t, dict) else None
        if (
            isinstance(twl, dict)
            and twl.get("kind") == "jsonl"
            and not Path(str(twl.get("path", ""))).is_absolute()
        ):
            twl["path"] = str((path.parent / str(twl.get("path", ""))).resolve())
    try:
        return Scenario.model_validate(raw)
    except ValidationError as e:
        raise ScenarioError(f"scenario {path} is invalid:\n{e}") from e
