"""Cost of each row of a multi-row q4 product: why a T-token step grows with T on CPU.

Times `clp::q4_linear` over SmolLM2-135M's seven trunk projections x 30 layers (random
Q4_1-style weights, the same shapes and layout as the real ones) for M = 1..8 rows, and
prints one JSON line per M: ms per pass, ns per (output feature, group of 32) and the
marginal ns per (feature, group, row) against M = 1. Run it on a quiet machine:

    python scripts/kernel_rows.py --threads 1
    python scripts/kernel_rows.py --threads 2
    python scripts/kernel_rows.py --threads 2 --attention   # clp::decode_attention instead
    python scripts/kernel_rows.py --threads 1 --attention --rows 1 --context 120 [--cache fp32]
    python scripts/kernel_rows.py --threads 1 --matmul      # the machine's fp32 matmul rate
    python scripts/kernel_rows.py --threads 2 --dense --rows 1,16,64,256  # prompt rows: AMX-BF16 beside q4
"""
import argparse
import json
import statistics
import sys
import time

import torch

from clpdecode.backbone import kernels
from clpdecode.backbone.quant import Int4Linear, Int4Weight

# (out, in) of one SmolLM2-135M layer's projections: q, k, v, o, gate, up, down.
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rows", default="1,2,3,4,5,8")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--attention", action="store_true",
                   help="time clp::decode_attention (30 layers, 9 heads over 3 K/V heads, fp16 cache) instead")
    p.add_argument("--context", type=int, default=1000, help="--attention: cached tokens")
    p.add_argument("--cache", choices=["fp16", "fp32"], default="fp16", help="--attention: the K/V cache's dtype")
    p.add_argument("--dense", action="store_true",
                   help="also time clp::dense_linear (prompt rows on AMX-BF16 tiles) on the same weights, "
                        "interleaved with the q4 passes")
    p.add_argument("--matmul", action="store_true",
                   help="the reference instead: torch's fp32 matmul (1024^3) in GFLOPS, the machine's FMA rate")
    args = p.parse_args()
    if not args.rows.startswith("1,") and args.rows != "1":
        p.error("--rows must start with 1: the extra-row figures are against the 1-row pass")
    torch.set_num_threads(args.threads)
    if kernels.load(quiet=False) is None:
        sys.exit("the q4 kernels are not available on this machine: " + str(kernels.why_unavailable()))
    torch.manual_seed(0)
    if args.matmul:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        ms = median_ms(lambda: a @ b, args.repeats)
        print(json.dumps({"threads": args.threads, "matmul_gflops": round(2 * 1024 ** 3 / ms / 1e6, 1)}))
        return
    if args.attention:
        return attention(args)
    # Distinct weights per layer, so that a pass reads ~80 MB as a real step does (no cache reuse).
    weights = [Int4Weight.from_float(torch.randn(n, k) * 0.05) for _ in range(args.layers) for n, k in SHAPES]
    linears = [Int4Linear(w) for w in weights]
    groups = sum(n * k // 32 for n, k in SHAPES) * args.layers  # (feature, group) pairs per pass
    base = None
    if args.dense:
        if not kernels.amx_prompts():
            sys.exit("--dense needs AMX-BF16 tiles (kernels.amx_prompts), which this machine or process lacks")
        from clpdecode.backbone.quant import pack_dense

        dense = [pack_dense(w.dequantize()) for w in weights]  # the same weights, dequantised
        op = torch.ops.clp.dense_linear.default
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(m, k) for _, k in SHAPES}
        for lin, (_, k) in zip(linears[:7], SHAPES):
            lin(xs[k])  # warm-up
        q4_pass = lambda: [lin(xs[k]) for lin, (_, k) in zip(linears, SHAPES * args.layers)]  # noqa: E731
        if args.dense:  # the two kernels' passes alternate, so that drift hits both alike
            dense_pass = lambda: [op(xs[k], w, None, None, 0.0, 0, None)  # noqa: E731
                                  for w, (_, k) in zip(dense, SHAPES * args.layers)]
            dense_pass()
            ms, dense_ms = median_ms_pair(q4_pass, dense_pass, args.repeats)
        else:
            ms = median_ms(q4_pass, args.repeats)
        base = ms if m == 1 else base
        row = {"rows": m, "threads": args.threads, "ms": round(ms, 3),
               "ns_per_feature_group": round(ms * 1e6 / groups, 3)}
        if m > 1:
            row["ns_per_feature_group_extra_row"] = round((ms - base) * 1e6 / groups / (m - 1), 3)
        if args.dense:
            row["dense_ms"] = round(dense_ms, 3)
            row["dense_speedup"] = round(ms / dense_ms, 2)
        print(json.dumps(row), flush=True)


def median_ms_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median wall times of a() and b(), run alternately `repeats` times each, in ms."""
    ta, tb = [], []
    for _ in range(repeats):
        for f, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def median_ms(one_pass, repeats: int) -> float:
    """Median wall time of `one_pass()` over `repeats` runs, in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def attention(args) -> None:
    """Per-step attention of SmolLM2-135M (9 query heads over 3 K/V heads, head size 64)."""
    op = torch.ops.clp.decode_attention.default
    cap = args.context + 16
    dtype = torch.float16 if args.cache == "fp16" else torch.float32
    caches = [(torch.randn(3, cap, 64).to(dtype), torch.randn(3, cap, 64).to(dtype)) for _ in range(args.layers)]
    base = None
    for m in [int(r) for r in args.rows.split(",")]:
        q = torch.randn(m, 9, 64)
        op(q, *caches[0], args.context, None, 0.125, 0)
        ms = median_ms(lambda: [op(q, kc, vc, args.context, None, 0.125, 0) for kc, vc in caches], args.repeats)
        base = ms if m == 1 else base
        row = {"rows": m, "threads": args.threads, "context": args.context, "cache": args.cache,
               "attention_ms": round(ms, 3)}
        if m > 1:
            row["ms_per_extra_row"] = round((ms - base) / (m - 1), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
