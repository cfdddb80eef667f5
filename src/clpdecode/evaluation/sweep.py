"""`clp bench --sweep`: each method's speed against its quality, over its own dial.

The paper's claim is that one linear layer (CLP) does the gate networks' job at least as
well. One threshold each cannot say whether CLP is the better accept rule or only a looser
one, so the sweep runs each method at every value of its dial (CLP's and the gates'
thresholds, naive MTP's horizon), interleaved prompt by prompt with AR and `verified` in one
bench run, and reads the curves: speedup against NLL (and against rep4), the Pareto front,
the speedup each method reaches at an NLL within 5% and 20% of AR's, and the NLL it pays at
1.3x and 1.6x (linear interpolation between measured points).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from ..decoding import PolicyConfig
from ..errors import ClpError

# --sweep's keys: the method they sweep and the PolicyConfig field they set.
SWEEP_KEYS = {"clp-threshold": ("clp", "clp_threshold"), "gate-threshold": ("gate", "gate_threshold"),
              "naive-k": ("naive", "max_drafts")}
_TENTHS = ",".join(f"0.{i}" for i in range(1, 10))
DEFAULT_SWEEP = f"clp-threshold={_TENTHS} gate-threshold={_TENTHS} naive-k=1,2,3,4"
EXACT = ("ar", "verified")  # the single points every sweep has: the reference and the lossless method
NLL_TOLERANCES = (0.05, 0.20)  # "an NLL within 5% / 20% of AR's"
SPEEDS = (1.3, 1.6)  # "the NLL each method pays at 1.3x / 1.6x"
SWEEP_PNG = "sweep.png"  # beside report.md


def parse_sweep(text: str) -> dict[str, list]:
    """'clp-threshold=0.1,0.3 naive-k=1,2' -> {"clp-threshold": [0.1, 0.3], "naive-k": [1, 2]};
    every value checked as the policy will check it (thresholds in [0, 1], horizons >= 1)."""
    out: dict[str, list] = {}
    for part in text.split():
        key, eq, values = part.partition("=")
        if key not in SWEEP_KEYS:
            raise ClpError(f"--sweep: unknown key {key!r}; choose from {', '.join(SWEEP_KEYS)}")
        if not eq or not [v for v in values.split(",") if v.strip()]:
            raise ClpError(f"--sweep: {key} has no values (write {key}=v1,v2,...)")
        if key in out:
            raise ClpError(f"--sweep: {key} is given twice")
        method, field = SWEEP_KEYS[key]
        vals = []
        for v in (v.strip() for v in values.split(",") if v.strip()):
            try:
                val = int(v) if field == "max_drafts" else float(v)
            except ValueError:
                raise ClpError(f"--sweep: {key} takes numbers, got {v!r}") from None
            if field == "max_drafts" and val < 1:
                raise ClpError(f"--sweep: {key} values must be at least 1, got {val}")
            try:
                PolicyConfig(method=method, **{field: val})
            except ClpError as e:
                raise ClpError(f"--sweep: {key}: {e}") from None
            if val not in vals:
                vals.append(val)
        out[key] = vals
    if not out:
        raise ClpError(f"--sweep is empty; e.g. {DEFAULT_SWEEP!r}")
    return out


def point_label(key: str, value) -> str:
    method, field = SWEEP_KEYS[key]
    return f"{method}@k{value}" if field == "max_drafts" else f"{method}@{value:g}"


def variants(sweep: dict[str, list], base: PolicyConfig) -> dict[str, PolicyConfig]:
    """Every point of the sweep as a labelled PolicyConfig, AR and verified first."""
    out = {m: replace(base, method=m) for m in EXACT}
    for key, values in sweep.items():
        method, field = SWEEP_KEYS[key]
        for v in values:
            out[point_label(key, v)] = replace(base, method=method, **{field: v})
    return out


def check_horizons(sweep: dict[str, list], k: int) -> dict[str, list]:
    """The sweep without naive horizons past the drafter's k (known once it is loaded: the
    default sweep's 1..4 on a k = 2 drafter), each left out with a note on stderr."""
    over = [v for v in sweep.get("naive-k", []) if v > k]
    if over:
        print(f"clp bench: --sweep: naive-k {', '.join(map(str, over))} left out: past the drafter's k = {k}",
              file=sys.stderr)
        sweep = {**sweep, "naive-k": [v for v in sweep["naive-k"] if v <= k]}
        if not sweep["naive-k"]:
            del sweep["naive-k"]
    return sweep


def family(label: str) -> str:
    return label.split("@")[0]


def curves(methods: dict) -> dict[str, list[dict]]:
    """The swept points of a results dict by method family, in the order of their dial."""
    out: dict[str, list[dict]] = {}
    for label, r in methods.items():
        if "@" in label:
            out.setdefault(family(label), []).append({"label": label, "speedup": r["speedup"], "nll": r["nll"],
                                                      "rep4": r["rep4"]})
    return out


def pareto(points: list[dict], quality: str = "nll") -> list[dict]:
    """The points no other point beats on both speed (higher) and `quality` (lower), by speed."""
    def beats(q, p) -> bool:
        return q["speedup"] >= p["speedup"] and q[quality] <= p[quality] and (q["speedup"], q[quality]) != (
            p["speedup"], p[quality])

    return sorted((p for p in points if not any(beats(q, p) for q in points)), key=lambda p: p["speedup"])


def speed_at_quality(points: list[dict], bound: float, quality: str = "nll") -> float | None:
    """The highest speedup along the curve (points joined in order of speed) with `quality` at
    most `bound`, crossings interpolated; None where no point is that good."""
    pts = sorted(points, key=lambda p: p["speedup"])
    best = None
    for p in pts:
        if p[quality] <= bound:
            best = max(best or p["speedup"], p["speedup"])
    for a, b in zip(pts, pts[1:]):
        if (a[quality] - bound) * (b[quality] - bound) < 0:  # the segment crosses the bound
            t = (bound - a[quality]) / (b[quality] - a[quality])
            s = a["speedup"] + t * (b["speedup"] - a["speedup"])
            best = s if best is None else max(best, s)
    return best


def quality_at_speed(points: list[dict], speed: float, quality: str = "nll") -> float | None:
    """`quality` where the curve (points in order of speed) first reaches `speed`,
    interpolated; None where it never gets that fast."""
    pts = sorted(points, key=lambda p: p["speedup"])
    if not pts or pts[-1]["speedup"] < speed:
        return None
    if pts[0]["speedup"] >= speed:
        return pts[0][quality]
    for a, b in zip(pts, pts[1:]):
        if a["speedup"] <= speed <= b["speedup"]:
            t = 0.0 if b["speedup"] == a["speedup"] else (speed - a["speedup"]) / (b["speedup"] - a["speedup"])
            return a[quality] + t * (b[quality] - a[quality])
    return None


def matched_quality(methods: dict) -> dict:
    """The readings of the issue, per family: speedup at NLL within 5% / 20% of AR's, and the
    NLL and rep4 at 1.3x / 1.6x (verified's exact point beside them)."""
    ar_nll = methods["ar"]["nll"]
    out = {}
    for fam, pts in curves(methods).items():
        out[fam] = {**{f"speedup_at_nll_{round(t * 100)}pct": _r(speed_at_quality(pts, ar_nll * (1 + t)))
                       for t in NLL_TOLERANCES},
                    **{f"nll_at_{s}x": _r(quality_at_speed(pts, s)) for s in SPEEDS},
                    # NLL alone rewards repetition (a looping answer is likely), so rep4 beside it
                    **{f"rep4_at_{s}x": _r(quality_at_speed(pts, s, "rep4")) for s in SPEEDS}}
    if "verified" in methods:
        v = methods["verified"]
        out["verified"] = {"speedup": v["speedup"], "nll": v["nll"]}
    return out


def _r(v):
    return None if v is None else round(v, 4)


def figure(results: dict):
    """Speedup against NLL and against rep4: a curve per family, verified and AR as points,
    the Pareto front over every swept point dashed (a matplotlib figure, for bench._plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    fams = curves(methods)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, quality in zip(axes, ("nll", "rep4")):
        for fam, pts in fams.items():
            ax.plot([p[quality] for p in pts], [p["speedup"] for p in pts], "o-", label=fam, ms=4)
            for p in pts:
                ax.annotate(p["label"].split("@")[1], (p[quality], p["speedup"]), fontsize=6, alpha=0.7)
        front = pareto([p for pts in fams.values() for p in pts], quality)
        ax.plot([p[quality] for p in front], [p["speedup"] for p in front], "k--", lw=1, alpha=0.6,
                label="Pareto front")
        for m, marker in (("ar", "s"), ("verified", "*")):
            if m in methods:
                ax.plot(methods[m][quality], methods[m]["speedup"], marker, color="k", ms=9, label=m)
        ax.set_xlabel("backbone NLL per token (nats)" if quality == "nll" else "rep4 (1 - unique 4-grams / 4-grams)")
        ax.set_ylabel("decode speedup vs AR")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def report_lines(results: dict, png: str) -> list[str]:
    """The sweep's part of report.md: the plot, the Pareto front, the matched-quality table."""
    methods = results["methods"]
    ar_nll = methods["ar"]["nll"]
    lines = ["## Speed against quality (`--sweep`)", "", f"![speedup against NLL and rep4]({png})", "",
             f"AR: NLL {ar_nll:.3f}, rep4 {methods['ar']['rep4']:.4f}. verified (lossless): "
             f"{methods['verified']['speedup']:.2f}x at AR's NLL." if "verified" in methods else "", "",
             "Pareto front over every swept point (speedup against NLL):", "",
             "| point | speedup | NLL | rep4 |", "| --- | --- | --- | --- |"]
    for p in pareto([p for pts in curves(methods).values() for p in pts]):
        lines.append(f"| {p['label']} | {p['speedup']:.2f}x | {p['nll']:.3f} | {p['rep4']:.4f} |")
    lines += ["", "Matched quality (interpolated along each curve; - : not reached):", "",
              "| method | speedup at NLL <= AR + 5% | at AR + 20% | NLL at 1.3x | NLL at 1.6x | rep4 at 1.3x "
              "| rep4 at 1.6x |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    for fam, m in matched_quality(methods).items():
        if fam == "verified":
            continue
        lines.append(f"| {fam} | {f(m['speedup_at_nll_5pct'], '{:.2f}x')} | {f(m['speedup_at_nll_20pct'], '{:.2f}x')} "
                     f"| {f(m['nll_at_1.3x'], '{:.3f}')} | {f(m['nll_at_1.6x'], '{:.3f}')} "
                     f"| {f(m.get('rep4_at_1.3x'), '{:.3f}')} | {f(m.get('rep4_at_1.6x'), '{:.3f}')} |")
    return lines + [""]
