"""How close q4 computes to fp32: hidden-state error and next-token agreement over the
positions of prompts and their answers (one prefill each, no generation).

    python scripts/q4_agreement.py --model embedded --limit 8
    CLP_ACT8=1 python scripts/q4_agreement.py      # the kernels built with int8 activations

Prints one JSON object: mean relative error of the last hidden state (mean |q4 - fp32| /
mean |fp32|) and the share of positions whose argmax token agrees. Run on a quiet machine
only if timing matters (it does not here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--prompts", default="mtbench")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--numerics", default="q4", help="the numerics to compare with fp32 (default: q4)")
    args = ap.parse_args()

    import os

    import torch

    from clpdecode import load_backbone
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.evaluation.prompts import load_prompts

    ref = load_backbone(args.model, numerics="fp32", progress=False)
    test = load_backbone(args.model, numerics=args.numerics, progress=False)
    err_num = err_den = agree = total = 0.0
    for p in load_prompts(args.prompts, args.limit):
        ids = test.encode_prompt(p)
        answer = generate(ref, ids, make_policy("ar"), GenerationConfig(max_new_tokens=64)).token_ids
        seq = torch.tensor([ids + answer])
        h32 = ref.forward(seq, ref.new_cache())[0]
        ht = test.forward(seq, test.new_cache())[0]
        err_num += float((ht - h32).abs().sum())
        err_den += float(h32.abs().sum())
        agree += float((ref.logits(h32).argmax(-1) == test.logits(ht).argmax(-1)).sum())
        total += seq.shape[1]
    print(json.dumps({"model": args.model, "numerics": args.numerics, "act8": bool(os.environ.get("CLP_ACT8")),
                      "positions": int(total), "hidden_rel_error": round(err_num / err_den, 5),
                      "top1_agreement": round(agree / total, 4)}))


if __name__ == "__main__":
    main()
