"""Tokens/s of the backbone's greedy answers (what `clp distill` and `eval-heads --prompts`
generate) one stream at a time against the batched scheduler, on the same prompts.

    python scripts/batched_answers.py --limit 32 --max-new-tokens 128 --batch-sizes 1,16

Prints one JSON line per batch size; the answers are checked equal across batch sizes.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    from clpdecode.backbone import load_backbone
    from clpdecode.corpus import greedy_answers
    from clpdecode.evaluation.prompts import load_prompts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--prompts", default="mtbench")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,16")
    args = p.parse_args()
    bb = load_backbone(args.model, progress=False)
    ids = [bb.encode_prompt(t) for t in load_prompts(args.prompts, args.limit)]
    first = None
    for size in (int(s) for s in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        answers = dict(a for batch in greedy_answers(bb, ids, args.max_new_tokens, size, progress=False) for a in batch)
        seconds = time.perf_counter() - t0
        tokens = sum(len(a) for a in answers.values())
        first = first or answers
        print(json.dumps({"batch_size": size, "answers": len(answers), "tokens": tokens, "seconds": round(seconds, 2),
                          "tokens_per_s": round(tokens / seconds, 1), "same_answers": answers == first}))


if __name__ == "__main__":
    main()
