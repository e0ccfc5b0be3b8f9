"""Measure decode and prefill step times on this machine's GPU, and fit Tokenweir's performance model.

Run it on the GPU machine you want to plan for (plain PyTorch with CUDA; no vLLM needed)::

    python models/calibration/measure_gpu.py --out models/calibration/l20_llama8b_steps.json
    python models/calibration/measure_gpu.py --shape llama1b --out models/calibration/l20_llama1b_steps.json
    python models/calibration/measure_gpu.py --fit models/calibration/l20_llama8b_steps.json \\
        models/calibration/l20_llama1b_steps.json --factors-out models/calibration/l20.json
        # (--fit needs this repository on PYTHONPATH)

What it runs is what ``h100_llama8b_steps.json`` and ``h100_llama1b_steps.json`` (the H100 references
next to this file) were measured with: a Llama-3.1-8B-shaped decoder (hidden 4096, 32 layers, 32
heads, 8 KV heads, head dim 128, MLP 14336, vocab 128256), or the Llama-3.2-1B shape (``--shape
llama1b``: hidden 2048, 16 layers, 32 heads, 8 KV heads, head dim 64, MLP 8192), with random bf16
weights and an untied LM head computed at every position, fused QKV and gate/up projections,
``scaled_dot_product_attention`` with GQA over a dense KV cache, one GPU, no tensor parallelism.

* decode: one step for ``batch`` sequences each attending over ``ctx`` cached tokens, captured in a
  CUDA graph and replayed (median of 20 after warm-up);
* prefill: one eager forward pass over ``batch`` prompts of ``prompt`` tokens (median of 5);
* ``copy_GBps`` and ``bf16_matmul_TFLOPs``: the card's measured ceilings in the same run.

The output JSON has the reference's format. ``--fit`` fits one set of factors of
``serving.hardware.perfmodel`` (memory and compute efficiency, step overhead constant and per layer,
eager-prefill floor per layer) to one or more tables of the same card by least squares, prints the
leave-one-out error of every point and, given two shapes or more, the leave-one-shape-out error
(fit on the others, predict that shape), and writes a factors file. Measure both shapes: one shape
cannot separate the per-layer step cost from the constant one. Use the
factors with ``serving.hardware.load_factors(path)`` and pass them to ``PerfModel``,
``plan_engine(..., factors=...)`` or ``SimEngine(..., factors=...)``; the card must have an entry in
``serving/hardware/catalog.py`` (``--gpu NAME`` when its ``nvidia-smi`` name is not matched). Cards
without their own factors reuse the H100 efficiencies against their datasheet ceilings.

A smaller shape (``--shape tiny``) runs anywhere, CPU included, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "llama8b": {
        "hidden": 4096,
        "layers": 32,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "inter": 14336,
        "vocab": 128256,
    },
    "llama1b": {
        "hidden": 2048,
        "layers": 16,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 64,
        "inter": 8192,
        "vocab": 128256,
    },
    "tiny": {
        "hidden": 256,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 64,
        "inter": 512,
        "vocab": 1024,
    },
}
DECODE_POINTS = [(b, 512) for b in (1, 8, 32, 64, 128, 256)] + [(b, 2048) for b in (1, 8, 32, 64, 128)]
DECODE_POINTS += [(1, 8192), (16, 8192), (32, 8192)]
PREFILL_POINTS = [(1, 128), (1, 512), (1, 2048), (1, 8192), (8, 1024), (16, 2048)]


def build_model(shape: dict[str, int], device: str) -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    h, nh, kvh, hd = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
            self.qkv = nn.Linear(h, (nh + 2 * kvh) * hd, bias=False)
            self.o = nn.Linear(nh * hd, h, bias=False)
            self.gate_up = nn.Linear(h, 2 * shape["inter"], bias=False)
            self.down = nn.Linear(shape["inter"], h, bias=False)

        def forward(self, x: Any, kc: Any, vc: Any, pos: int) -> Any:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
            q = q.view(b, t, nh, hd).transpose(1, 2)
            kc[:, :, pos : pos + t] = k.view(b, t, kvh, hd).transpose(1, 2)
            vc[:, :, pos : pos + t] = v.view(b, t, kvh, hd).transpose(1, 2)
            att = F.scaled_dot_product_attention(
                q, kc[:, :, : pos + t], vc[:, :, : pos + t], is_causal=(t > 1), enable_gqa=True
            )
            x = x + self.o(att.transpose(1, 2).reshape(b, t, nh * hd))
            g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(g) * u)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(shape["vocab"], h)
            self.layers = nn.ModuleList(Layer() for _ in range(shape["layers"]))
            self.norm = nn.RMSNorm(h)
            self.lm_head = nn.Linear(h, shape["vocab"], bias=False)

        def forward(self, ids: Any, caches: list[tuple[Any, Any]], pos: int) -> Any:
            x = self.embed(ids)
            for layer, (kc, vc) in zip(self.layers, caches, strict=True):
                x = layer(x, kc, vc, pos)
            return self.lm_head(self.norm(x))

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        model = Decoder().to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the measurement table here (JSON)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--fit",
        metavar="TABLE",
        nargs="+",
        help="fit factors to existing tables (one card) instead of measuring",
    )
    ap.add_argument("--factors-out", help="with --fit: write the fitted factors here")
    ap.add_argument("--gpu", help="with --fit: catalog GPU name when the device name is not matched")
    args = ap.parse_args()
    if args.fit:
        return fit(args.fit, args.factors_out, args.gpu)
    if not args.out:
        ap.error("--out is required when measuring")
    table = measure(SHAPES[args.shape], args.device, quick=args.shape == "tiny")
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def measure(shape: dict[str, int], device: str, quick: bool = False) -> dict[str, Any]:
    import torch

    cuda = device.startswith("cuda")
    model = build_model(shape, device)
    dtype = next(model.parameters()).dtype
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * dtype.itemsize
    kv_bytes = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * dtype.itemsize
    reps, pre_reps = (3, 2) if quick else (20, 5)

    def timed_ms(fn: Any, n: int) -> float:
        samples = []
        for _ in range(n):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    def caches(batch: int, length: int) -> list[tuple[Any, Any]]:
        size = (batch, shape["kv_heads"], length, shape["head_dim"])
        return [
            (torch.zeros(size, dtype=dtype, device=device), torch.zeros(size, dtype=dtype, device=device))
            for _ in range(shape["layers"])
        ]

    decode_rows, prefill_rows = [], []
    with torch.inference_mode():
        for batch, ctx in DECODE_POINTS[:3] if quick else DECODE_POINTS:
            kv = caches(batch, ctx + 1)
            ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
            step = lambda ids=ids, kv=kv, ctx=ctx: model(ids, kv, ctx)  # noqa: E731
            graphed = False
            if cuda:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                step, graphed = graph.replay, True
            for _ in range(3):
                step()
            ms = timed_ms(step, reps)
            gbps = (weight_bytes + batch * ctx * kv_bytes) / ms / 1e6
            decode_rows.append(
                {
                    "batch": batch,
                    "ctx": ctx,
                    "step_ms": round(ms, 4),
                    "graphed": graphed,
                    "tok_per_s": round(batch / ms * 1e3, 1),
                    "GBps": round(gbps, 1),
                }
            )
            print(decode_rows[-1], flush=True)
            del kv
        for batch, prompt in PREFILL_POINTS[:2] if quick else PREFILL_POINTS:
            kv = caches(batch, prompt)
            ids = torch.zeros((batch, prompt), dtype=torch.long, device=device)
            run = lambda ids=ids, kv=kv: model(ids, kv, 0)  # noqa: E731
            for _ in range(2):
                run()
            ms = timed_ms(run, pre_reps)
            flops = (
                2 * params * batch * prompt
                + 2 * shape["layers"] * shape["heads"] * shape["head_dim"] * prompt * prompt * batch
            )
            prefill_rows.append(
                {"batch": batch, "prompt": prompt, "ms": round(ms, 3), "TFLOPs": round(flops / ms / 1e9, 1)}
            )
            print(prefill_rows[-1], flush=True)
            del kv
        n = 1 << (24 if quick else 29)
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = timed_ms(lambda: dst.copy_(src), 5)
        m = 1024 if quick else 8192
        a = torch.randn((m, m), dtype=dtype, device=device)
        mm_ms = timed_ms(lambda: a @ a, 5)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "shape": {
            k: shape[k] for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "inter", "vocab")
        },
        "params": params,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes,
        "decode": decode_rows,
        "prefill": prefill_rows,
        "copy_GBps": 2 * n / copy_ms / 1e6,
        "bf16_matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9,
    }


def fit(table_paths: list[str], factors_out: str | None, gpu_name: str | None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from serving.hardware.calibration import (
        calibrate,
        gpu_from_table,
        leave_one_out,
        leave_one_shape_out,
        load_table,
        save_factors,
        shape_from_table,
    )
    from serving.hardware.catalog import get_gpu

    tables = [load_table(p) for p in table_paths]
    gpu = get_gpu(gpu_name) if gpu_name else gpu_from_table(tables[0])
    shapes = [shape_from_table(t) for t in tables]
    names = ", ".join(f"{Path(p).name} ({t.get('device')})" for p, t in zip(table_paths, tables, strict=True))
    factors = calibrate(gpu, shapes, source=names)
    print(f"{gpu.name}: {factors}")
    checks = [("leave-one-out", [r for sh in shapes for r in leave_one_out(gpu, sh)])]
    if len(shapes) > 1:
        checks.append(("leave-one-shape-out", leave_one_shape_out(gpu, shapes)))
    for what, results in checks:
        for r in results:
            print(
                f"  {r.arch.name:<16} {r.sample.kind:<7} batch={r.sample.batch:<3} tokens={r.sample.tokens:<5} "
                f"measured {r.sample.step_s * 1e3:8.2f} ms  {what} {r.rel_error:+.1%}"
            )
        print(f"worst {what} error {max(abs(r.rel_error) for r in results):.1%}")
    if factors_out:
        save_factors(factors_out, gpu, factors)
        print(f"wrote {factors_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
