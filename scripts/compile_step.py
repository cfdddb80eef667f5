"""torch.compile of the q4 decode step (dynamo + inductor) against the eager fused step, on
the embedded backbone: the measurement behind docs/design.md, "The step as one C++ call".

    python scripts/compile_step.py 200        # cached tokens before the step

Prints the first compile's time, then per step size T the largest difference between the two
outputs and the median ms of each (15 interleaved rounds, 2 threads). Run on a quiet machine.
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

torch.set_num_threads(2)
from clpdecode.backbone import load_backbone  # noqa: E402

bb = load_backbone("embedded", numerics="q4", progress=False)
lean = bb._lean
lean._plan = None  # the Python loop over the kernels: what inductor could compile
ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 200
cache = bb.new_cache(capacity=ctx + 64)
bb.forward(torch.randint(100, 5000, (1, ctx)), cache)

def eager_step(ids):
    return lean.forward(ids, cache)  # eager: the same Python loop

compiled = torch.compile(lean._forward_native, dynamic=True)
def comp_step(ids):
    t, start = ids.shape[1], cache.length
    tables = lean._rope_tables(start + t)
    rope = {k: (c[start:start + t], s[start:start + t]) for k, (c, s) in tables.items()}
    return compiled(ids, cache, rope, None)

ids1 = torch.tensor([[123]])
t0 = time.perf_counter()
for _ in range(3):
    comp_step(ids1); bb.rollback(cache, 1)
print("first compile + 3 steps: %.1f s" % (time.perf_counter() - t0), flush=True)
for T in (1, 3, 5):
    ids = torch.randint(100, 5000, (1, T))
    a = eager_step(ids); bb.rollback(cache, T)
    b = comp_step(ids); bb.rollback(cache, T)
    print("T", T, "max diff", float((a - b).abs().max()))
    res = {}
    for name, f in (("eager", eager_step), ("compiled", comp_step)):
        f(ids); bb.rollback(cache, T)
    ts = {"eager": [], "compiled": []}
    for r in range(15):
        for name, f in (("eager", eager_step), ("compiled", comp_step)):
            s = time.perf_counter(); f(ids); ts[name].append(time.perf_counter() - s); bb.rollback(cache, T)
    print("T", T, {k: round(statistics.median(v) * 1000, 2) for k, v in ts.items()}, flush=True)
