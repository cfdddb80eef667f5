"""What a prompt chunk's step costs with its rows on AMX-BF16 tiles against the q4 kernels, on
the real backbone, in one process (the two sides interleaved, medians): the prefill side of
`clp serve` and of the batched answers.

    python scripts/prompt_rows.py --rows 16,64,256 --repeats 7

Prints one JSON line per chunk size: ms per step and per row on each side, their ratio, and
how far the dense path's hidden states sit from the q4 path's (mean and max relative L2 over
the chunk's rows). Needs a CPU with AMX-BF16 (kernels.amx_prompts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> None:
    import torch

    from clpdecode.backbone import kernels, load_backbone
    from clpdecode.evaluation.cpu import cpu_info, cpu_summary
    from clpdecode.evaluation.prompts import load_prompts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--rows", default="16,32,64,128,256")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, progress=False)
    if not kernels.amx_prompts():
        sys.exit("prompts take the q4 kernels on this machine (no AMX-BF16, or CLP_NO_AMX is set)")
    print(f"clp: {cpu_summary(cpu_info())}", file=sys.stderr, flush=True)
    sizes = [int(r) for r in args.rows.split(",")]
    text = " ".join(load_prompts("mtbench", 80))  # long enough for the largest chunk
    ids = bb.tokenizer(text).input_ids
    if len(ids) < max(sizes):
        sys.exit(f"the prompt text has {len(ids)} tokens, fewer than --rows asks")
    cache = bb.new_slot_cache(1, max(sizes))

    def step(n: int, dense: bool):
        cache.reset(0)
        t0 = time.perf_counter()
        h = bb.forward_rows(cache, [(0, ids[:n], None, None)], (), 0 if dense else None)[0]
        return (time.perf_counter() - t0) * 1e3, h

    times: dict[tuple[int, bool], list[float]] = {}
    for _ in range(args.repeats):
        for n in sizes:
            for dense in (False, True):
                times.setdefault((n, dense), []).append(step(n, dense)[0])
    for n in sizes:
        q4, amx = statistics.median(times[(n, False)]), statistics.median(times[(n, True)])
        hq, ha = step(n, False)[1], step(n, True)[1]
        rel = (ha - hq).norm(dim=-1) / hq.norm(dim=-1)
        print(json.dumps({"rows": n, "q4_ms": round(q4, 1), "amx_ms": round(amx, 1),
                          "q4_ms_per_row": round(q4 / n, 3), "amx_ms_per_row": round(amx / n, 3),
                          "speedup": round(q4 / amx, 2), "hidden_rel_diff_mean": float(f"{rel.mean():.2e}"),
                          "hidden_rel_diff_max": float(f"{rel.max():.2e}")}), flush=True)


if __name__ == "__main__":
    main()
