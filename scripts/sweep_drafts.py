"""Time verified decoding with chain and tree drafts against AR, interleaved in one process.

The measurement behind the defaults of `--tree`, `--k` and `--clp-threshold` (docs/design.md,
"Draft trees" and "Verified settings"): for each prompt, AR and every configuration run back
to back on the same backbone, so that load from other processes spreads over all of them;
every output is checked against AR's.

    python scripts/sweep_drafts.py --prompts mtbench --limit 10 --trees chain,4,6,8 --min-prob 0.3
    python scripts/sweep_drafts.py --numerics q4 --ks 2,4 --thresholds 0.3,0.5,0.7 --trees chain
    python scripts/sweep_drafts.py --numerics q4 --prompts mtbench-2 --trees chain --lookup-tokens 0,8,12

Prints one JSON line per configuration: tokens/s, speedup over AR (end to end) and tokens
per forward. Run it on a quiet machine (2 threads by default).
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
    ap.add_argument("--numerics", default="fp16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="4", help="drafter horizons, comma-separated (each its shipped drafter)")
    ap.add_argument("--thresholds", default="0.3", help="CLP thresholds, comma-separated")
    ap.add_argument("--prompts", default="mtbench")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--trees", default="chain,4,6,8", help="draft shapes: 'chain' and/or tree sizes")
    ap.add_argument("--min-prob", type=float, default=None, help="sibling threshold (default: TreeConfig's)")
    ap.add_argument("--width", type=int, default=None, help="candidates per depth (default: TreeConfig's)")
    ap.add_argument("--lookup-tokens", default="0", help="most tokens a lookup draft copies, comma-separated "
                                                         "(0: k, the default)")
    args = ap.parse_args()

    import torch

    from clpdecode import default_drafter, load_backbone
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.decoding.tree import TREE_CHAIN, TreeConfig
    from clpdecode.evaluation.bench import BenchSettings, bench_prompt_ids
    from clpdecode.evaluation.prompts import SECOND_TURN_SETS, load_prompts, load_turn_pairs

    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, numerics=args.numerics, progress=False)
    load = load_turn_pairs if args.prompts in SECOND_TURN_SETS else load_prompts
    ids = bench_prompt_ids(bb, load(args.prompts, args.limit),
                           BenchSettings(prompts=args.prompts, max_new_tokens=args.max_new_tokens), progress=False)
    extra = {k: v for k, v in (("min_prob", args.min_prob), ("width", args.width)) if v is not None}
    policies = {"ar": make_policy("ar")}
    for k in (int(x) for x in args.ks.split(",")):
        drafter = default_drafter(bb, k=k)
        for thr in (float(x) for x in args.thresholds.split(",")):
            for t in args.trees.split(","):
                tree = TREE_CHAIN if t == TREE_CHAIN else TreeConfig(size=int(t), **extra)
                for n in (int(x) for x in args.lookup_tokens.split(",")):
                    name = f"verified_k{k}_t{thr}_{t}" + (f"_lookup{n}" if n else "")
                    policies[name] = make_policy("verified", bb, drafter, clp_threshold=thr, tree=tree,
                                                 lookup_tokens=n)
    for p in policies.values():  # warm-up
        generate(bb, ids[0], p, GenerationConfig(max_new_tokens=16))
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    totals = {k: [0, 0.0, 0, 0, 0.0] for k in policies}  # tokens, seconds, forwards, decode tokens, decode s
    for x in ids:
        ar = None
        for name, policy in policies.items():
            r = generate(bb, x, policy, cfg)
            ar = r.token_ids if ar is None else ar
            if r.token_ids != ar:
                raise SystemExit(f"{name} differs from AR: verified decoding must be lossless")
            t = totals[name]
            t[0], t[1], t[2] = t[0] + r.new_tokens, t[1] + r.seconds, t[2] + r.forward_passes
            t[3], t[4] = t[3] + r.decode_tokens, t[4] + r.seconds - r.prefill_seconds
    ar_rate, ar_decode = totals["ar"][0] / totals["ar"][1], totals["ar"][3] / totals["ar"][4]
    for name, (n, s, f, dn, ds) in totals.items():
        print(json.dumps({"config": name, "min_prob": extra.get("min_prob", TreeConfig.min_prob),
                          "tokens_per_s": round(n / s, 2), "speedup_e2e": round(n / s / ar_rate, 3),
                          "speedup": round(dn / ds / ar_decode, 3), "tokens_per_forward": round(n / f, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
