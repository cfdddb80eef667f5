"""A burst of requests on the scheduler, in-process: when each one's first token comes, and
how fast the whole burst goes. What `clp bench-serve` measures through HTTP at the start of
each concurrency (every client sends at once), without the server around it.

    python scripts/scheduler_probe.py --requests 8 --max-new-tokens 128
    CLP_NO_AMX=1 python scripts/scheduler_probe.py --requests 8   # prompts on the q4 kernels

Prints one JSON line per round (--repeats): each request's prompt tokens and time to first
token (s, from the burst's submission), their p50 and max, the whole burst's seconds and
tokens/s, the step count, and whether prompts ran on AMX-BF16 tiles (kernels.amx_prompts).
Greedy AR by default (--method); the scheduler's defaults otherwise (as `clp serve` runs it).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time


def main() -> None:
    import torch

    from clpdecode.backbone import kernels, load_backbone
    from clpdecode.decoding import GenerationConfig, make_policy
    from clpdecode.decoding.scheduler import Request, Scheduler
    from clpdecode.evaluation.cpu import cpu_info, cpu_summary
    from clpdecode.evaluation.prompts import load_prompts
    from clpdecode.heads import resolve_drafter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--prompts", default="mtbench")
    p.add_argument("--requests", type=int, default=8, help="requests submitted at once (and slots)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--method", default="ar",
                   help="the requests' method; several, comma-separated (ar,verified), take turns by round in one "
                        "process, their order reversed in every other round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slots", type=int, default=None, help="the scheduler's slots (default: --requests)")
    p.add_argument("--budget", default="auto", choices=["auto", "off"], help="the scheduler's --spec-budget")
    p.add_argument("--max-rows", type=int, default=None, help="the scheduler's row cap per step (default: its own)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="cProfile the rounds; print the N functions with the most own time to stderr")
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumtime"], help="--profile's order")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model, progress=False)
    prompts = [bb.encode_prompt(t) for t in load_prompts(args.prompts, args.requests)]
    sched = Scheduler(bb, slots=args.slots or args.requests, budget=args.budget,
                      **({} if args.max_rows is None else {"max_rows": args.max_rows}))
    print(f"clp: {cpu_summary(cpu_info())}; prompts on AMX-BF16 tiles: {kernels.amx_prompts()}",
          file=sys.stderr, flush=True)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    drafter = None if methods == ["ar"] else resolve_drafter(bb, None, None, required=True)
    profilers = {m: cProfile.Profile() for m in methods} if args.profile else {}
    rounds = [m for r in range(args.repeats) for m in (methods if r % 2 == 0 else methods[::-1])]
    for method in rounds:
        profiler = profilers.get(method)
        first: dict[int, float] = {}
        tokens = [0] * len(prompts)

        def seen(i: int, ids: list[int]) -> None:
            first.setdefault(i, time.perf_counter())
            tokens[i] += len(ids)

        before = {k: sched.stats[k] for k in ("steps", "drafted", "kept")}
        t0 = time.perf_counter()
        for i, ids in enumerate(prompts):  # a policy object per request, as the server makes them
            sched.submit(Request(ids, make_policy(method, bb, drafter),
                                 GenerationConfig(max_new_tokens=args.max_new_tokens),
                                 on_tokens=lambda ids, _h, i=i: seen(i, ids)))
        if profiler is not None:
            profiler.enable()
        sched.run()
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - t0
        ttft = [first[i] - t0 for i in range(len(prompts))]
        print(json.dumps({
            "method": method, "requests": len(prompts), "prompt_tokens": [len(x) for x in prompts],
            "ttft_s": [round(t, 3) for t in ttft], "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_max_s": round(max(ttft), 3), "seconds": round(seconds, 2),
            "tokens_per_s": round(sum(tokens) / seconds, 1), "amx_prompts": kernels.amx_prompts(),
            **{k: sched.stats[k] - v for k, v in before.items()}}), flush=True)
    for method, profiler in profilers.items():
        print(f"---- {method}", file=sys.stderr)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats(args.sort).print_stats(args.profile)


if __name__ == "__main__":
    main()
