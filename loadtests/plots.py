"""PNG plots of a run (matplotlib, Agg backend): latency CDFs, throughput and in-flight, tenant tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from loadtests.client import RequestRecord

__all__ = ["plot_compare_cdfs", "plot_run", "plot_sweep"]


def _bin_width_s(duration_s: float) -> float:
    return max(0.25, duration_s / 120.0)


def _cdf(ax: plt.Axes, values_ms: Sequence[float], label: str) -> None:
    if not values_ms:
        return
    x = np.sort(np.asarray(values_ms))
    ax.plot(x, np.arange(1, x.size + 1) / x.size, label=label)


def _latency_cdfs(records: Sequence[RequestRecord], tenants: list[str], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for tenant in tenants:
        ok = [r for r in records if r.ok and r.tenant == tenant]
        _cdf(axes[0], [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], tenant)
        _cdf(axes[1], [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None], tenant)
        _cdf(axes[2], [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None], tenant)
    for ax, name in zip(axes, ("TTFT", "TPOT", "E2E latency"), strict=True):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"{title}: latency CDFs per tenant")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _token_events(r: RequestRecord) -> tuple[np.ndarray, np.ndarray]:
    """Times (s from start) of text chunks, and the tokens credited to each (usage spread evenly)."""
    if r.ttft_s is None:
        return np.empty(0), np.empty(0)
    times = r.sent_s + r.ttft_s + np.concatenate(([0.0], np.cumsum(r.itl_s)))
    total = r.completion_tokens if r.completion_tokens is not None else times.size
    return times, np.full(times.size, total / times.size)


def _throughput(records: Sequence[RequestRecord], duration_s: float, path: Path, title: str) -> None:
    width = _bin_width_s(duration_s)
    edges = np.arange(0.0, duration_s + width, width)
    done = [r.sent_s + r.e2e_s for r in records if r.ok and r.e2e_s is not None]
    fails = [r.sent_s + (r.e2e_s or 0.0) for r in records if not r.ok]
    tok_t, tok_w = [], []
    for r in records:
        t, w = _token_events(r)
        tok_t.append(t)
        tok_w.append(w)
    tt = np.concatenate(tok_t) if tok_t else np.empty(0)
    tw = np.concatenate(tok_w) if tok_w else np.empty(0)
    starts = np.array([r.sent_s for r in records])
    ends = np.array([r.sent_s + (r.e2e_s or 0.0) for r in records])
    grid = np.linspace(0.0, duration_s, 400)
    in_flight = np.searchsorted(np.sort(starts), grid, side="right") - np.searchsorted(
        np.sort(ends), grid, side="right"
    )
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    centers = edges[:-1] + width / 2
    axes[0].plot(centers, np.histogram(done, bins=edges)[0] / width, label="completed", color="tab:blue")
    axes[0].plot(centers, np.histogram(fails, bins=edges)[0] / width, label="failed", color="tab:red")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(fontsize="small")
    axes[1].plot(centers, np.histogram(tt, bins=edges, weights=tw)[0] / width, color="tab:green")
    axes[1].set_ylabel("output tokens/s")
    axes[2].plot(grid, in_flight, color="tab:purple")
    axes[2].set_ylabel("in flight")
    axes[2].set_xlabel("time since start (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: throughput and concurrency over time")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _tenant_tokens(
    records: Sequence[RequestRecord], tenants: list[str], duration_s: float, path: Path, title: str
) -> None:
    width = _bin_width_s(duration_s)
    edges = np.arange(0.0, duration_s + width, width)
    fig, ax = plt.subplots(figsize=(11, 4))
    for tenant in tenants:
        parts = [_token_events(r) for r in records if r.tenant == tenant]
        if not parts:
            continue
        t = np.concatenate([p[0] for p in parts])
        w = np.concatenate([p[1] for p in parts])
        hist, _ = np.histogram(t, bins=edges, weights=w / width)
        ax.plot(edges[:-1] + width / 2, hist, label=tenant)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.suptitle(f"{title}: tokens served per tenant")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_run(
    records: Sequence[RequestRecord], tenants: list[str], duration_s: float, out_dir: Path, title: str
) -> list[Path]:
    """Write the run's plots into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "latency_cdf.png", out_dir / "throughput.png", out_dir / "tenant_tokens.png"]
    _latency_cdfs(records, tenants, paths[0], title)
    _throughput(records, max(duration_s, 1e-3), paths[1], title)
    _tenant_tokens(records, tenants, max(duration_s, 1e-3), paths[2], title)
    return paths


def plot_sweep(points: list[dict[str, Any]], parameter: str, path: Path, title: str) -> Path:
    """Goodput and throughput against offered load (rate or concurrency) for a sweep."""
    x = [p["value"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, [p["request_throughput_rps"] for p in points], "o-", label="throughput (req/s)")
    ax.plot(x, [p["goodput_rps"] for p in points], "s-", label="goodput (req/s)")
    if parameter == "rate":
        ax.plot(x, x, ":", color="grey", label="offered")
    ax.set_xlabel("offered rate (req/s)" if parameter == "rate" else "concurrency")
    ax.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"{title}: goodput vs offered load")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_compare_cdfs(runs: list[tuple[str, list[float], list[float], list[float]]], path: Path) -> Path:
    """Overlaid TTFT/TPOT/E2E CDFs (ms) of several runs: ``(label, ttft, tpot, e2e)``."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, *series in runs:
        for ax, values in zip(axes, series, strict=True):
            _cdf(ax, values, label)
    for ax, name in zip(axes, ("TTFT", "TPOT", "E2E latency"), strict=True):
        ax.set_xlabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
