"""torch.compile of the q4 decode step (dynamo + inductor) against the eager fused step, on
the embedded backbone: the measurement behind docs/design.md, "The step as one C++ call".

    python scripts/compile_step.py 200        # cached tokens before the step

Prints the first compile's time, then per step size T the largest difference between the two
outputs and the median ms of each (15 interleaved rounds, 2 threads). Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("context", type=int, nargs="?", default=200, help="cached tokens before the step (default: 200)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from clpdecode.backbone import load_backbone

    torch.set_num_threads(args.threads)
    bb = load_backbone("embedded", numerics="q4", progress=False)
    lean = bb._lean
    lean._plan = None  # the Python loop over the kernels: what inductor could compile
    cache = bb.new_cache(capacity=args.context + 64)
    bb.forward(torch.randint(100, 5000, (1, args.context)), cache)

    def eager_step(ids):
        return lean.forward(ids, cache)  # eager: the same Python loop

    compiled = torch.compile(lean._forward_native, dynamic=True)

    def comp_step(ids):
        t, start = ids.shape[1], cache.length
        tables = lean._rope_tables(start + t)
        rope = {k: (c[start:start + t], s[start:start + t]) for k, (c, s) in tables.items()}
        return compiled(ids, cache, rope, None)

    def run(step, ids):
        out = step(ids)
        bb.rollback(cache, ids.shape[1])
        return out

    t0 = time.perf_counter()
    for _ in range(3):
        run(comp_step, torch.tensor([[123]]))
    print("first compile + 3 steps: %.1f s" % (time.perf_counter() - t0), flush=True)
    steps = {"eager": eager_step, "compiled": comp_step}
    for T in (1, 3, 5):
        ids = torch.randint(100, 5000, (1, T))
        print("T", T, "max diff", float((run(eager_step, ids) - run(comp_step, ids)).abs().max()))
        times = {name: [] for name in steps}
        for _ in range(15):
            for name, step in steps.items():
                s = time.perf_counter()
                step(ids)
                times[name].append(time.perf_counter() - s)  # the rollback is not timed
                bb.rollback(cache, T)
        print("T", T, {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}, flush=True)


if __name__ == "__main__":
    main()
