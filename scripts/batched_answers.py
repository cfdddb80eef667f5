"""Tokens/s of the backbone's greedy answers (what `clp distill` and `eval-heads --prompts`
generate) one stream at a time against the batched scheduler, on the same prompts.

    python scripts/batched_answers.py --limit 32 --max-new-tokens 128 --batch-sizes 1,16 --repeats 3

Prints one JSON line per run (the batch sizes in turn, --repeats times: this machine's speed
drifts by tens of percent over minutes, so each round's ratio to batch size 1 is its own), then
a summary line: each size's median tokens/s and its median ratio to batch size 1 over the
rounds. The answers are checked equal across batch sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    p.add_argument("--repeats", type=int, default=1, help="rounds over the batch sizes")
    args = p.parse_args()
    bb = load_backbone(args.model, progress=False)
    ids = [bb.encode_prompt(t) for t in load_prompts(args.prompts, args.limit)]
    first = None
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            t0 = time.perf_counter()
            answers = dict(a for batch in greedy_answers(bb, ids, args.max_new_tokens, size, progress=False)
                           for a in batch)
            seconds = time.perf_counter() - t0
            tokens = sum(len(a) for a in answers.values())
            first = first or answers
            rates[size].append(tokens / seconds)
            print(json.dumps({"batch_size": size, "answers": len(answers), "tokens": tokens,
                              "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                              "same_answers": answers == first}), flush=True)
    if sizes[0] == 1:
        ratios = {size: statistics.median(r / one for r, one in zip(rates[size], rates[1])) for size in sizes[1:]}
        print(json.dumps({"median_tokens_per_s": {s: round(statistics.median(r), 1) for s, r in rates.items()},
                          "median_ratio_to_one_stream": {s: round(v, 2) for s, v in ratios.items()}}))


if __name__ == "__main__":
    main()
