"""Why `clp serve` steps on the thread that loaded the model: one batched step's time on that
thread against a second thread of the same process.

torch's CPU kernels (and ours, through at::parallel_for) run on OpenMP (libgomp), which gives
each thread that starts parallel work a team of its own. With more team threads than cores,
libgomp stops spinning between parallel regions, and every region wakes its threads from
sleep. A step of 8 decode rows runs a few hundred regions.

    python scripts/thread_teams.py                 # alternating rounds: main thread, then another
    python scripts/thread_teams.py --only-thread   # everything on one non-main thread (one team)

Prints one JSON line: the median ms of a step (8 slots x 1 decode row at 300 cached tokens,
forward and LM head) per round, for each thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=100, help="steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only-thread", action="store_true",
                   help="load and step on one thread that is not the main thread (the main thread starts no kernels)")
    args = p.parse_args()
    if args.only_thread:
        out: list = []
        t = threading.Thread(target=lambda: out.append(measure(args, ("thread",))))
        t.start()
        t.join()
        print(json.dumps({"only_thread": True, **out[0]}))
    else:
        print(json.dumps({"only_thread": False, **measure(args, ("main", "thread"))}))


def measure(args, sides: tuple[str, ...]) -> dict:
    import torch

    from clpdecode.backbone import load_backbone
    from clpdecode.evaluation.cpu import cpu_info, cpu_summary

    torch.set_num_threads(args.threads)
    print(f"clp: {cpu_summary(cpu_info())}", file=sys.stderr, flush=True)
    bb = load_backbone(args.model, progress=False)
    slots = 8
    cache = bb.new_slot_cache(slots, 512)
    with torch.inference_mode():
        for s in range(slots):  # 300 cached positions each
            bb.forward_rows(cache, [(s, list(range(100, 400)), None, None)])

    def round_ms() -> float:
        times = []
        with torch.inference_mode():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                outs = bb.forward_rows(cache, [(s, [5], None, None) for s in range(slots)])
                bb.logits(torch.cat(outs))
                times.append(time.perf_counter() - t0)
                for s in range(slots):
                    cache.rollback(s, 1)
        return statistics.median(times) * 1e3

    ms: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(args.rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            if side == "main" or len(sides) == 1:
                ms[side].append(round_ms())
            else:
                got: list[float] = []
                t = threading.Thread(target=lambda: got.append(round_ms()))
                t.start()
                t.join()
                ms[side].append(got[0])
    return {f"{side}_ms": [round(x, 2) for x in v] for side, v in ms.items()} | {
        f"{side}_median_ms": round(statistics.median(v), 2) for side, v in ms.items()}


if __name__ == "__main__":
    main()
