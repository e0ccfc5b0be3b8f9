"""Result files: ``requests.jsonl``, ``summary.json``, ``report.md``; and the two-run comparison."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from loadtests.client import RequestRecord
from loadtests.gateway_api import MeterRow

__all__ = ["compare_runs", "markdown_report", "read_records", "write_records"]

_LAT_ROWS = (
    ("TTFT", "ttft"),
    ("TPOT", "tpot"),
    ("ITL", "itl"),
    ("E2EL", "e2el"),
    ("send lateness", "lateness"),
)


def write_records(records: Iterable[RequestRecord], path: Path) -> None:
    """One JSON object per request."""
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")


def read_records(path: Path) -> list[RequestRecord]:
    """Records written by :func:`write_records`."""
    names = {f.name for f in fields(RequestRecord)}
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            out.append(RequestRecord(**{k: v for k, v in obj.items() if k in names}))
    return out


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _headline(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("Benchmark duration (s)", _f(s["duration_s"])),
        ("Offered rate (req/s)", _f(s["offered_rate_rps"])),
        ("Requests sent", _f(s["requests_sent"])),
        ("Successful requests", _f(s["succeeded"])),
        ("Failed requests", _f(s["failed"])),
        ("Total input tokens", _f(s["total_input_tokens"])),
        ("Total generated tokens", _f(s["total_output_tokens"])),
        ("Request throughput (req/s)", _f(s["request_throughput_rps"])),
        ("Output token throughput (tok/s)", _f(s["output_throughput_tps"])),
        ("Total token throughput (tok/s)", _f(s["total_token_throughput_tps"])),
        ("Request goodput (req/s)", _f(s["goodput_rps"])),
        ("Jain's index, tokens per share", _f(s["jain_service"], 3)),
        ("Jain's index, served / asked", _f(s["jain_satisfaction"], 3)),
    ]


def _latency_table(s: dict[str, Any]) -> list[str]:
    lines = ["| latency (ms) | mean | median | p90 | p99 | max | n |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, key in _LAT_ROWS:
        st = s[key]
        vals = [_f(st[k]) for k in ("mean_ms", "median_ms", "p90_ms", "p99_ms", "max_ms")]
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {st['count']} |")
    return lines


def _tenant_table(s: dict[str, Any]) -> list[str]:
    lines = [
        "| tenant | share | sent | ok | failed | good | prompt tok | output tok | service | out tok/s "
        "| TTFT p50 | TTFT p99 | TPOT p50 | E2EL p99 | refusals |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in s["tenants"]:
        refusals = ", ".join(f"{k}: {v}" for k, v in sorted(t["refusals"].items())) or "-"
        lines.append(
            f"| {t['tenant']} | {_f(t['share'])} | {t['requests']} | {t['succeeded']} | {t['failed']} | {t['good']} "
            f"| {t['prompt_tokens']} | {t['completion_tokens']} | {t['service_fraction'] * 100:.1f}% "
            f"| {_f(t['output_throughput_tps'])} | {_f(t['ttft']['median_ms'])} | {_f(t['ttft']['p99_ms'])} "
            f"| {_f(t['tpot']['median_ms'])} | {_f(t['e2el']['p99_ms'])} | {refusals} |"
        )
    return lines


def _agent_lines(a: dict[str, Any]) -> list[str]:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.1f}%"

    lines = [
        f"- sessions: {a['sessions']} over {a['agents']} agents; good sessions (every turn sent, "
        f"successful and within the SLOs): {a['good_sessions']}",
        f"- prefix-cache hit rate from the responses' `usage.prompt_tokens_details.cached_tokens`: "
        f"{pct(a['cache_hit_rate'])}",
        f"- from the server's `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`: "
        f"{pct(a['server_cache_hit_rate'])}"
        + (
            f" ({_f(a['server_prefix_cache_hits'], 0)} of {_f(a['server_prefix_cache_queries'], 0)} tokens)"
            if a["server_prefix_cache_queries"] is not None
            else " (`metrics_url` not set or unreadable)"
        ),
        "",
        "| turn | sent | ok | good | goodput (req/s) | prompt tok | cached tok | hit rate | TTFT p50 | TTFT p90 | TTFT p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in a["turns"]:
        lines.append(
            f"| {t['turn']} | {t['requests']} | {t['succeeded']} | {t['good']} | {_f(t['goodput_rps'])} "
            f"| {t['prompt_tokens']} | {_f(t['cached_tokens'])} | {pct(t['cache_hit_rate'])} "
            f"| {_f(t['ttft']['median_ms'])} | {_f(t['ttft']['p90_ms'])} | {_f(t['ttft']['p99_ms'])} |"
        )
    return lines


def _meter_lines(meter: list[MeterRow] | None, unavailable: str | None) -> list[str]:
    if meter is None:
        return [f"meter check unavailable: {unavailable or 'not run'}"]
    lines = [
        "| tenant | client-seen tokens | gateway-charged tokens | difference | requests without usage |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in meter:
        lines.append(
            f"| {m.tenant} | {m.client_tokens} | {_f(m.gateway_tokens)} | {_f(m.diff_tokens)} "
            f"| {m.requests_without_usage} |"
        )
    exact = all(m.diff_tokens == 0 for m in meter)
    lines.append("")
    if any(len(m.tenants) > 1 for m in meter):
        lines += [
            "Tenants that share an API key are one row: the gateway charges the key, so the check "
            "compares the key's charge with the sum of its tenants' tokens.",
            "",
        ]
    lines.append(
        "Meter agrees with the client on every tenant."
        if exact
        else "**Meter and client disagree** (see above)."
    )
    return lines


def markdown_report(
    summary: dict[str, Any],
    header: dict[str, Any],
    meter: list[MeterRow] | None,
    meter_unavailable: str | None,
    plots: list[str],
) -> str:
    """The run's Markdown report (numbers from ``summary``, the dict of a ``RunSummary``)."""
    out = [f"# Load test: {header['scenario']}", ""]
    if header.get("description"):
        out += [str(header["description"]).strip(), ""]
    out += [f"- {k}: `{v}`" for k, v in header.items() if k not in ("scenario", "description")]
    out.append("")
    for w in summary["warnings"]:
        out.append(f"> **Warning:** {w}")
    if summary["warnings"]:
        out.append("")
    out += ["## Headline", "", "| metric | value |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in _headline(summary)]
    slo = ", ".join(f"{k} ≤ {v}" for k, v in summary["slo"].items() if v is not None) or "none set"
    out += ["", f"SLOs for goodput: {slo}.", "", "## Latency", ""]
    out += _latency_table(summary)
    out += ["", "## Tenants", "", *_tenant_table(summary)]
    if summary.get("agents"):
        out += ["", "## Agent sessions", "", *_agent_lines(summary["agents"])]
    out += ["", "## Refusals and errors by reason", ""]
    if summary["refusals"]:
        out += ["| reason | requests |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in sorted(summary["refusals"].items(), key=lambda kv: -kv[1])]
    else:
        out.append("none")
    out += ["", "## Meter check", "", *_meter_lines(meter, meter_unavailable)]
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _load_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: not a run folder ({e})") from e


def compare_runs(a_dir: Path, b_dir: Path, out_dir: Path) -> Path:
    """Side-by-side report of two run folders; returns the Markdown file."""
    from loadtests.plots import plot_compare_cdfs

    sa, sb = _load_summary(a_dir), _load_summary(b_dir)
    la, lb = sa.get("label") or a_dir.name, sb.get("label") or b_dir.name
    a, b = sa["summary"], sb["summary"]
    out = [f"# Comparison: {la} vs {lb}", "", f"- A: `{a_dir}` ({sa['header'].get('target')})",
           f"- B: `{b_dir}` ({sb['header'].get('target')})", ""]  # fmt: skip
    out += [f"| metric | {la} | {lb} | B/A |", "|---|---:|---:|---:|"]
    ha, hb = _headline(a), _headline(b)
    for (k, va), (_, vb) in zip(ha, hb, strict=True):
        out.append(f"| {k} | {va} | {vb} | {_ratio(va, vb)} |")
    for label, key in _LAT_ROWS:
        for stat in ("mean_ms", "median_ms", "p99_ms"):
            va, vb = _f(a[key][stat]), _f(b[key][stat])
            out.append(f"| {label} {stat.removesuffix('_ms')} (ms) | {va} | {vb} | {_ratio(va, vb)} |")
    tenants = sorted({t["tenant"] for t in a["tenants"]} | {t["tenant"] for t in b["tenants"]})
    ta = {t["tenant"]: t for t in a["tenants"]}
    tb = {t["tenant"]: t for t in b["tenants"]}
    out += [
        "",
        "## Tenants (output tokens, good requests)",
        "",
        f"| tenant | {la} | {lb} |",
        "|---|---:|---:|",
    ]
    for t in tenants:
        ca = f"{ta[t]['completion_tokens']} tok, {ta[t]['good']} good" if t in ta else "-"
        cb = f"{tb[t]['completion_tokens']} tok, {tb[t]['good']} good" if t in tb else "-"
        out.append(f"| {t} | {ca} | {cb} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for label, d in ((la, a_dir), (lb, b_dir)):
        recs = read_records(d / "requests.jsonl") if (d / "requests.jsonl").exists() else []
        ok = [r for r in recs if r.ok]
        series.append((label, [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
                       [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None],
                       [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None]))  # fmt: skip
    png = plot_compare_cdfs(series, out_dir / "compare_cdf.png")
    out += ["", f"![latency CDFs]({png.name})", ""]
    path = out_dir / "compare.md"
    path.write_text("\n".join(out))
    return path


def _ratio(va: str, vb: str) -> str:
    try:
        x, y = float(va), float(vb)
    except ValueError:
        return "-"
    return f"{y / x:.2f}" if x else "-"
