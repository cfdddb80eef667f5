"""The spread between two runs of the same `clp bench --sweep` (its repeatability on a noisy
2-core machine): per point, the two speedups and NLLs and their difference.

    python scripts/sweep_spread.py bench-out/sweep/smollm2-a bench-out/sweep/smollm2-b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="the first run's --out folder")
    p.add_argument("b", type=Path, help="the second run's --out folder")
    args = p.parse_args()
    a, b = (json.loads((d / "results.json").read_text())["methods"] for d in (args.a, args.b))
    print("| point | speedup a / b | difference | NLL a / b | rep4 a / b |")
    print("| --- | --- | --- | --- | --- |")
    diffs = []
    for label in a:
        if label not in b:
            continue
        x, y = a[label], b[label]
        diffs.append(abs(x["speedup"] - y["speedup"]))
        speed = f"{x['speedup']:.2f}x / {y['speedup']:.2f}x | {y['speedup'] - x['speedup']:+.2f}"
        print(f"| {label} | {speed} | {x['nll']:.3f} / {y['nll']:.3f} | {x['rep4']:.4f} / {y['rep4']:.4f} |")
    mean = sum(diffs) / len(diffs)
    print(f"\nspeedup difference: mean {mean:.3f}, largest {max(diffs):.3f} over {len(diffs)} points")


if __name__ == "__main__":
    main()
