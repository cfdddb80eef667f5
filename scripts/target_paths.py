"""Time the drafter's two target paths on this machine: the backbone one sequence at a time
under its numerics (the CPU default) against an fp32 transformers copy on the whole batch
(the GPU path, forced onto the CPU), and how far their hidden states differ.

    python scripts/target_paths.py [--model embedded] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="384,350,300,380", help="the batch's sequence lengths")
    args = ap.parse_args()
    from clpdecode.backbone import load_backbone
    from clpdecode.training.drafter import BackboneTargets

    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model)
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    seqs = [torch.randint(100, bb.info.vocab_size, (n,), generator=g).tolist() for n in lengths]
    draft = torch.arange(8192)
    one = BackboneTargets(bb, (), draft, batched=False)
    many = BackboneTargets(bb, (), draft, batched=True)
    rows = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        _, h1 = one(seqs)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        _, h2 = many(seqs)
        t2 = time.perf_counter() - t
        rows.append({"one_by_one_s": round(t1, 2), "batched_fp32_s": round(t2, 2)})
    print(json.dumps({"model": bb.name, "numerics": bb.info.numerics, "tokens": sum(lengths), "runs": rows,
                      "max_abs_diff": round(float((h1 - h2).abs().max()), 4)}, indent=1))


if __name__ == "__main__":
    main()
