"""Gemma 3 270M before and after the lean engine: AR and verified tokens/s of transformers'
engine with fp16 numerics (how Gemma ran before) against the lean engine with q4 (its
default now), interleaved prompt by prompt on the same passages, every output checked.

    python scripts/gemma_engines.py --limit 6 --max-new-tokens 64

Prints one JSON line per configuration (tokens/s end to end, tokens per forward, whether
verified equalled that configuration's AR on every prompt). Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from clpdecode import default_drafter, load_backbone
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.evaluation.prompts import load_prompts

    torch.set_num_threads(args.threads)
    configs = {"hf_fp16": load_backbone("gemma3-270m", numerics="fp16", engine="hf", progress=False),
               "lean_q4": load_backbone("gemma3-270m", numerics="q4", progress=False)}
    policies = {name: {"ar": make_policy("ar"), "verified": make_policy("verified", bb, default_drafter(bb, k=2))}
                for name, bb in configs.items()}
    prompts = load_prompts("passages", args.limit)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    totals = {(n, m): [0, 0.0, 0, True] for n in configs for m in ("ar", "verified")}
    for name, bb in configs.items():  # warm-up
        for pol in policies[name].values():
            generate(bb, bb.encode_prompt(prompts[0], chat=False), pol, GenerationConfig(max_new_tokens=8))
    for p in prompts:
        for name, bb in configs.items():
            ids = bb.encode_prompt(p, chat=False)
            ar = None
            for m, pol in policies[name].items():
                r = generate(bb, ids, pol, cfg)
                ar = r.token_ids if ar is None else ar
                t = totals[(name, m)]
                t[0], t[1], t[2] = t[0] + r.new_tokens, t[1] + r.seconds, t[2] + r.forward_passes
                t[3] = t[3] and r.token_ids == ar
    for (name, m), (n, s, f, same) in totals.items():
        print(json.dumps({"config": name, "method": m, "tokens_per_s": round(n / s, 2),
                          "tokens_per_forward": round(n / f, 3), "equals_its_ar": same}), flush=True)


if __name__ == "__main__":
    main()
