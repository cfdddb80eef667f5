"""`clp profile`: what one decode step costs, piece by piece, for each numerics.

The numbers that decide whether multi-token decoding pays on a machine: the trunk forward
over T = 1..5 new tokens on a KV cache, the LM head per position, the MTP heads, and
whether the rows of a multi-token step are computed independently (required for verified
decoding to reproduce AR exactly).
"""

from __future__ import annotations

import statistics
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)


@torch.inference_mode()
def profile_step(backbone, drafter=None, context: int = 256, repeats: int = 7) -> dict:
    """Median milliseconds of each part of a decode step at `context` cached tokens."""
    g = torch.Generator().manual_seed(0)
    lo, hi = min(100, backbone.info.vocab_size // 2), min(10_000, backbone.info.vocab_size)
    prompt = torch.randint(lo, hi, (1, context), generator=g)
    cache = backbone.new_cache()
    backbone.forward(prompt, cache)
    out = {"numerics": backbone.info.numerics, "threads": torch.get_num_threads(), "context": context,
           "forward_ms": {}}
    for t in (1, 2, 3, 5):
        new = torch.randint(lo, hi, (1, t), generator=g)

        def step():
            backbone.forward(new, cache)
            backbone.rollback(cache, t)
        out["forward_ms"][t] = _median_ms(step, repeats)
    h = torch.randn(3, backbone.info.hidden_size, generator=g)
    out["lm_head_ms_1_row"] = _median_ms(lambda: backbone.logits(h[:1]), repeats)
    out["lm_head_ms_3_rows"] = _median_ms(lambda: backbone.logits(h), repeats)
    if drafter is not None:
        emb = backbone.embed(torch.tensor(5)).float()
        out["heads_ms"] = _median_ms(lambda: drafter.heads.propose(h[0], emb), repeats)
        if drafter.clp is not None:
            out["clp_ms"] = _median_ms(lambda: drafter.clp.decide(h[0], 0.5), repeats)
    # Row independence: a 3-token step against three 1-token steps.
    x = torch.randint(lo, hi, (1, 3), generator=g)
    c1, c2 = backbone.new_cache(), backbone.new_cache()
    backbone.forward(prompt, c1)
    backbone.forward(prompt, c2)
    joint = backbone.forward(x, c1)[0]
    single = torch.cat([backbone.forward(x[:, i : i + 1], c2)[0] for i in range(3)])
    out["row_max_abs_diff"] = float((joint - single).abs().max())
    return out
