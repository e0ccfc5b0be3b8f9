"""Paired A/B benchmark of two source trees: is tree B (new) as fast as tree A (old)?

Runs ``loadtests/bench_gateway.py --metering`` (fixed 32-token prompts and fixed output lengths) against
tree A, then tree B, then A, B, ... for ``--pairs`` pairs; with ``--peers`` each run also does
``bench_peers.py --servers tokenweir --levels 32``. Prints, per pair, the B/A ratios of streamed tokens/s
and short requests/s (and the peers' c=32 tokens/s), then the median of each ratio over the pairs, which
is issue 12's speed criterion (each median >= 0.95), and writes every figure to a JSON file. Alternating
the sides spreads a shared machine's slow phases over both; pairing compares each B run with the A run
next to it.

Fairness: both sides run the SAME benchmark scripts, client and workload, those of ``--harness`` (default:
the tree this file is in); only the served package differs. The scripts' ``--tree`` starts ``tokenweir
serve`` from the tree under test, with that tree first on ``PYTHONPATH`` and as the working directory
(Ray workers inherit both), through the entry point that tree's ``pyproject.toml`` declares, and
``bench_peers`` serves that tree's ``deploy/local.yaml``. An old tree such as c216b0e (whose
``bench_gateway.py`` has neither ``--tree`` nor ``--json-out``, and whose ``--metering`` did nothing) is
thereby measured with the new script. ``--scripts own`` instead runs each tree's own scripts (that tree
first on ``PYTHONPATH``, cwd the tree), reading ``--json-out`` where the script has it and otherwise the
JSON it prints; that compares the scripts as well as the trees, so it is not the default.

Each run's output goes to ``<out>/ab-<stamp>/<pair>-<side>-<bench>.log``; the servers' own logs are where
those runs say. Stopping this script (Ctrl-C or SIGTERM) stops the running benchmark, which stops its
server's process tree.

    .venv/bin/python loadtests/bench_ab.py --a /work/wt/old --b . --pairs 3 [--peers]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIN_RATIO = 0.95  # issue 12: the median new/old ratio of each figure
FIGURES = {  # figure -> (bench, where in its result)
    "stream_tokens_per_s": ("gateway", ("stream", "output_tokens_per_s")),
    "short_requests_per_s": ("gateway", ("short", "requests_per_s")),
    "peers_c32_tokens_per_s": ("peers", ("results", "tokenweir", "32", "median", "output_tokens_per_s")),
}


def _commit(tree: Path) -> str:
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _last_json(text: str) -> dict[str, Any]:
    """The last top-level JSON object printed (``bench_gateway.py`` prints its result as indented JSON)."""
    start = text.rfind("\n{\n")
    if start < 0:
        raise ValueError("no JSON result in the output")
    obj, _ = json.JSONDecoder().raw_decode(text[start + 1 :])
    return dict(obj)


def _dig(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


class Runner:
    """Runs one benchmark script of one side, with this process's signals passed on to it."""

    def __init__(self, args: argparse.Namespace, outdir: Path) -> None:
        self.args = args
        self.outdir = outdir
        self.child: subprocess.Popen[bytes] | None = None

    def _command(
        self, bench: str, tree: Path, result: Path, rundir: Path
    ) -> tuple[list[str], Path, dict[str, str]]:
        a = self.args
        own = a.scripts == "own"
        script_tree = tree if own else a.harness
        script = script_tree / "loadtests" / f"bench_{bench}.py"
        extra = shlex.split(a.gateway_args if bench == "gateway" else a.peers_args)
        if bench == "gateway":
            cmd = [sys.executable, str(script), "--metering", *extra]
            if "--json-out" in script.read_text():
                cmd += ["--json-out", str(result)]
        else:
            cmd = [
                sys.executable,
                str(script),
                "--servers",
                "tokenweir",
                "--levels",
                "32",
                "--out",
                str(rundir),
            ]
            cmd += extra
        if not own:
            cmd += ["--tree", str(tree)]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")]))}
        # The harness's scripts put their own tree first on sys.path for the client and pass --tree's on to
        # the server; a tree's own scripts find that tree through PYTHONPATH and the working directory.
        return cmd, script_tree, env if own else {}

    def run(self, pair: int, side: str, tree: Path, bench: str) -> dict[str, Any]:
        rundir = self.outdir / f"{pair}-{side}-{bench}"
        rundir.mkdir(parents=True, exist_ok=True)
        result_file = rundir / "result.json"
        cmd, cwd, env = self._command(bench, tree, result_file, rundir)
        log = self.outdir / f"{pair}-{side}-{bench}.log"
        print(f"[pair {pair} {side}] {bench}: {shlex.join(cmd)}  (cwd {cwd})", flush=True)
        t0 = time.monotonic()
        with log.open("wb") as out:
            self.child = subprocess.Popen(
                cmd, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
            )
            try:
                rc = self.child.wait(timeout=self.args.run_timeout_s)
            except subprocess.TimeoutExpired:
                print(
                    f"[pair {pair} {side}] {bench} ran past {self.args.run_timeout_s:g} s; stopping it",
                    flush=True,
                )
                rc = self.stop()
            finally:
                self.child = None
        wall_s = time.monotonic() - t0
        record: dict[str, Any] = {
            "pair": pair, "side": side, "bench": bench, "tree": str(tree), "commit": _commit(tree), "rc": rc,
            "wall_s": round(wall_s, 1), "log": str(log), "command": cmd,
        }  # fmt: skip
        try:
            if bench == "gateway":
                text = log.read_text(errors="replace")
                result = json.loads(result_file.read_text()) if result_file.exists() else _last_json(text)
            else:
                found = sorted(rundir.glob("peers-*.json"))
                result = json.loads(found[-1].read_text()) if found else {}
        except (OSError, ValueError) as e:
            result, record["error"] = {}, f"{type(e).__name__}: {e}"
        record["result"] = result
        record["figures"] = {name: _dig(result, path) for name, (b, path) in FIGURES.items() if b == bench}
        shown = ", ".join(
            f"{k} {v:.0f}" if v is not None else f"{k} MISSING" for k, v in record["figures"].items()
        )
        print(f"[pair {pair} {side}] {bench}: rc {rc}, {wall_s:.0f} s; {shown}", flush=True)
        return record

    def stop(self) -> int:
        """SIGINT to the running benchmark (it stops its server's tree), then kill after a grace."""
        child = self.child
        if child is None or child.poll() is not None:
            return child.returncode if child is not None else 0
        child.send_signal(signal.SIGINT)
        try:
            return child.wait(timeout=180)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()


def summarize(runs: list[dict[str, Any]], pairs: int) -> dict[str, Any]:
    """Per pair, B/A of each figure; the median over pairs; whether each median meets MIN_RATIO."""
    by = {(r["pair"], r["side"], r["bench"]): r for r in runs}
    per_pair = []
    for pair in range(1, pairs + 1):
        row: dict[str, Any] = {"pair": pair}
        for name, (bench, _) in FIGURES.items():
            a = by.get((pair, "A", bench), {}).get("figures", {}).get(name)
            b = by.get((pair, "B", bench), {}).get("figures", {}).get(name)
            row[name] = {"A": a, "B": b, "ratio": b / a if a and b is not None else None}
        per_pair.append(row)
    medians: dict[str, Any] = {}
    for name in FIGURES:
        ratios = [row[name]["ratio"] for row in per_pair if row[name]["ratio"] is not None]
        if ratios:
            median = statistics.median(ratios)
            medians[name] = {
                "median_ratio": round(median, 3), "pairs": len(ratios), "met": median >= MIN_RATIO,
                "median_A": statistics.median(row[name]["A"] for row in per_pair if row[name]["ratio"] is not None),
                "median_B": statistics.median(row[name]["B"] for row in per_pair if row[name]["ratio"] is not None),
            }  # fmt: skip
    return {"per_pair": per_pair, "medians": medians}


def report(summary: dict[str, Any]) -> str:
    names = [n for n in FIGURES if n in summary["medians"]]
    lines = [
        "| pair | " + " | ".join(f"{n}: A, B, B/A" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for row in summary["per_pair"]:
        cells = []
        for n in names:
            c = row[n]
            cells.append(
                "missing" if c["ratio"] is None else f"{c['A']:.0f}, {c['B']:.0f}, **{c['ratio']:.3f}**"
            )
        lines.append(f"| {row['pair']} | " + " | ".join(cells) + " |")
    cells = []
    for n in names:
        m = summary["medians"][n]
        verdict = "met" if m["met"] else "NOT met"
        cells.append(f"{m['median_A']:.0f}, {m['median_B']:.0f}, **{m['median_ratio']:.3f}** ({verdict})")
    lines.append("| median | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nGoal: each median B/A >= {MIN_RATIO} over the pairs.\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="tree A (the old commit)")
    p.add_argument("--b", type=Path, required=True, help="tree B (the new commit)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--peers", action="store_true", help="also bench_peers.py --servers tokenweir --levels 32")
    p.add_argument("--harness", type=Path, default=REPO, help="the tree whose bench scripts both sides run")
    p.add_argument("--scripts", choices=("harness", "own"), default="harness")
    p.add_argument("--gateway-args", default="", help="more arguments for bench_gateway.py (one string)")
    p.add_argument("--peers-args", default="", help="more arguments for bench_peers.py (one string)")
    p.add_argument("--run-timeout-s", type=float, default=1800.0, help="per benchmark run")
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "ab")
    a = p.parse_args(argv)
    a.a, a.b, a.harness = a.a.resolve(), a.b.resolve(), a.harness.resolve()
    for tree in (a.a, a.b, a.harness):
        if not (tree / "serving").is_dir() or not (tree / "loadtests").is_dir():
            p.error(f"{tree} is not a Tokenweir source tree")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = a.out / f"ab-{stamp}"
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {
        "a": str(a.a), "b": str(a.b), "commit_a": _commit(a.a), "commit_b": _commit(a.b),
        "harness": str(a.harness), "commit_harness": _commit(a.harness), "scripts": a.scripts,
        "pairs": a.pairs, "peers": a.peers, "gateway_args": a.gateway_args, "peers_args": a.peers_args,
        "host": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "load_avg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    print(f"A = {a.a} ({meta['commit_a']}), B = {a.b} ({meta['commit_b']}), scripts of {a.scripts} "
          f"({a.harness if a.scripts == 'harness' else 'each tree'}); output in {outdir}", flush=True)  # fmt: skip
    runner = Runner(a, outdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    benches = ["gateway", "peers"] if a.peers else ["gateway"]
    runs: list[dict[str, Any]] = []
    try:
        for pair in range(1, a.pairs + 1):
            for side, tree in (("A", a.a), ("B", a.b)):
                for bench in benches:
                    runs.append(runner.run(pair, side, tree, bench))
            row = summarize(runs, pair)["per_pair"][-1]
            ratios = ", ".join(f"{n} {c['ratio']:.3f}" for n, c in row.items() if n != "pair" and c["ratio"])
            print(f"[pair {pair}] B/A: {ratios or 'none (a run failed)'}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            runner.stop()
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        meta["load_avg_end"] = os.getloadavg()
        summary = summarize(runs, a.pairs)
        (outdir / "ab.json").write_text(
            json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2)
        )
    table = report(summary)
    (outdir / "ab.md").write_text(table)
    print("\n" + table)
    print(f"wrote {outdir / 'ab.json'} and ab.md")
    failed = [
        f"{r['pair']}-{r['side']}-{r['bench']}" for r in runs if r["rc"] != 0 or None in r["figures"].values()
    ]
    if failed:
        print(f"runs that failed or lack a figure: {', '.join(failed)} (see their logs)")
    expected = [name for name, (bench, _) in FIGURES.items() if bench in benches]
    return 0 if all(n in summary["medians"] for n in expected) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
