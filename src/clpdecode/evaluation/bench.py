"""`clp bench`: every method on the same prompts, interleaved, against AR in the same run."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..atomic import atomic_file, atomic_write_text
from ..decoding import METHODS, GenerationConfig, PolicyConfig, generate, make_policy
from ..decoding.loop import GenerationResult
from ..errors import ClpError, check_context
from ..heads.artifacts import shipped_head_accuracy
from .cpu import cpu_info, cpu_summary
from .metrics import DEFINITIONS, backbone_nll, common_prefix, distinct_n, mean_repetition
from .peers import OWN_NUMERICS, PEER_NAMES, PeerRun, close_peers, open_peers


@dataclass
class BenchSettings:
    prompts: str = "mtbench"
    limit: int | None = 10
    methods: tuple[str, ...] = METHODS
    max_new_tokens: int = 128
    numerics: str = "fp32"
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # every method's settings (its method apart)
    k: int = 2
    warmup_tokens: int = 16
    threads: int = 0
    hf_generate: bool = False  # also time transformers' generate() (greedy, same numerics) as AR's peer
    raw: bool = False  # plain-text prompts, no chat template (base models)
    sweep: str | None = None  # --sweep's points (sweep.py) instead of `methods`: each method's dial swept

    def record(self) -> dict:
        """The settings as results.json holds them: the policy's fields flat beside the rest
        (as files written before PolicyConfig have them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "policy"}
        return json.loads(json.dumps({**out, **self.policy.as_record()}))  # tuples become lists


# Settings that may differ between a bench and its resumption (more prompts, other threads).
_RESUMABLE = {"limit", "threads"}

# Settings added after results.json files were first written, with the value that a file
# lacking one was measured with: before --raw every prompt went through encode_prompt's
# default (raw=False), and before --no-lookup existed verified had no n-gram lookup at all
# (lookup=False, not today's default: resuming it with lookup on would mix two methods).
_BEFORE_ADDED = {"raw": False, "lookup": False, "tree": "chain", "lookup_tokens": 0, "max_drafts": 0, "sweep": None}


def prepare_out_dir(out: Path) -> Path:
    """Make sure results can be written to `out` (a folder), before anything is measured."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClpError(f"--out {str(out)!r} is a file; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ClpError(f"cannot write results to --out {str(out)!r}: {e.strerror or e}") from None
    return out


def _prompt_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _differing_settings(settings: BenchSettings, recorded: dict) -> list[str]:
    """The settings (other than _RESUMABLE ones) in which `settings` differ from those
    recorded in a results.json; a setting the file predates counts as _BEFORE_ADDED's value."""
    now = settings.record()
    return [k for k in now if k not in _RESUMABLE and now[k] != recorded.get(k, _BEFORE_ADDED.get(k))]


def _resumable_records(out_dir: Path, backbone, settings: BenchSettings, encoded: list[list[int]]) -> list[dict]:
    """The per-prompt records of an earlier bench in out_dir with the same settings."""
    path = out_dir / "results.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        records, old_settings = old["runs"], old["settings"]
        _check_records(records, old_settings)
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f" ({e})" if isinstance(e, ValueError) and not isinstance(e, json.JSONDecodeError) else ""
        raise ClpError(f"cannot resume: {path} is not a results file of `clp bench`{why}; "
                       "use another --out or drop --resume") from None
    if len(records) > len(encoded):  # resuming with a smaller --limit would drop measured prompts
        raise ClpError(f"cannot resume: {path} holds {len(records)} measured prompts, more than the "
                       f"{len(encoded)} asked for: use --limit {len(records)} or more (or another --out)")
    differ = _differing_settings(settings, old_settings)
    if old.get("backbone") != backbone.info.as_dict():
        differ.insert(0, "backbone")
    if differ:
        raise ClpError(f"cannot resume: {path} was measured with other settings ({', '.join(differ)}); "
                       "use another --out or drop --resume")
    for i, rec in enumerate(records[: len(encoded)]):
        if rec.get("prompt_key") != _prompt_key(encoded[i]):
            raise ClpError(f"cannot resume: prompt {i + 1} differs from the one measured in {path}; "
                           "use another --out or drop --resume")
    return records[: len(encoded)]


# What a measured prompt's record holds for each method (what summarize() reads).
_RECORD_KEYS = {"token_ids": list, "new_tokens": int, "forward_passes": int, "seconds": (int, float),
                "prefill_seconds": (int, float), "decode_tokens": int, "accepted_per_step": list}


def _check_records(records, old_settings) -> None:
    """A results.json's runs as run_bench wrote them, or ValueError saying what is not."""
    if not isinstance(old_settings, dict):
        raise ValueError('"settings" is not an object')
    if not isinstance(records, list):
        raise ValueError('"runs" is not a list')
    for i, rec in enumerate(records):
        where = f"run {i + 1}"
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt_key"), str):
            raise ValueError(f"{where} is not a measured prompt")
        methods = rec.get("methods")
        if not isinstance(methods, dict) or not methods:
            raise ValueError(f'{where} has no "methods"')
        for m, r in methods.items():
            bad = [k for k, t in _RECORD_KEYS.items() if not isinstance(r, dict) or not isinstance(r.get(k), t)]
            if bad:
                raise ValueError(f"{where}, method {m}: {', '.join(bad)} missing or malformed")


def _record(r: GenerationResult) -> dict:
    return {"token_ids": r.token_ids, "text": r.text, "new_tokens": r.new_tokens,
            "forward_passes": r.forward_passes, "seconds": r.seconds, "prefill_seconds": r.prefill_seconds,
            "decode_tokens": r.decode_tokens, "accepted_per_step": r.accepted_per_step}


def bench_prompt_ids(backbone, prompts: list, settings: BenchSettings, progress: bool = True) -> list[list[int]]:
    """Token ids of the bench's prompts: user messages through the chat template (plain text
    with settings.raw), or for a two-turn set (prompts.SECOND_TURN_SETS) each conversation up
    to the backbone's second answer, after its own greedy first answer (generated here once,
    then cached: answers.second_turn_prompts)."""
    from .answers import encode_each, second_turn_prompts
    from .prompts import SECOND_TURN_SETS

    if settings.prompts in SECOND_TURN_SETS:
        return second_turn_prompts(backbone, prompts, settings.max_new_tokens, progress=progress)[0]
    return encode_each(backbone, prompts, lambda p: backbone.encode_prompt(p, chat=False if settings.raw else None),
                       "prompt", settings.max_new_tokens)


def run_bench(backbone, drafter, encoded: list[list[int]], settings: BenchSettings, reference=None,
              progress: bool = True, out_dir: Path | None = None, resume: bool = False) -> dict:
    """Run every method on every prompt, methods interleaved per prompt.

    Args:
        backbone: the backbone with the numerics under test.
        drafter: heads + CLP + gates (None if only `ar` is benchmarked).
        encoded: the prompts' token ids (bench_prompt_ids).
        settings: what to run.
        reference: an fp32 backbone for NLL and fp32-AR agreement (None: `backbone` itself).
        out_dir: when given, results.json there is rewritten (atomically) after every
            prompt, so an interrupted or failed bench keeps what it measured.
        resume: continue the bench whose results.json is in out_dir (same settings and
            prompts; its measured prompts are kept, not rerun).
    Returns:
        The results dict written to results.json.
    """
    policies = {label: make_policy(cfg, backbone, drafter) for label, cfg in bench_configs(settings, drafter).items()}
    methods = list(policies)
    for i, ids in enumerate(encoded):  # before anything is measured
        try:
            check_context(len(ids), settings.max_new_tokens, backbone.max_positions)
        except ClpError as e:
            raise ClpError(f"prompt {i + 1}: {e}") from None
    records = _resumable_records(out_dir, backbone, settings, encoded) if resume and out_dir else []
    cfg = GenerationConfig(max_new_tokens=settings.max_new_tokens)
    fp32_policy = make_policy("ar", reference) if reference is not None and reference is not backbone else None
    peers, warm_ids = [], []
    if settings.hf_generate and len(records) < len(encoded):
        warm_ids = backbone.encode_prompt(WARMUP_PROMPT, chat=False if settings.raw else None)
        peers = open_peers(backbone, [len(ids) for ids in [*encoded, warm_ids]], settings.max_new_tokens, drafter)
    try:
        if len(records) < len(encoded):
            # Warm-up: first calls pay for allocator growth and lazy initialisation. The peers
            # warm up on a prompt of their own: a llama-server in ngram-mod mode remembers
            # every request's n-grams, and must not have seen a prompt before it is timed.
            for m in methods:
                generate(backbone, encoded[0], policies[m], GenerationConfig(max_new_tokens=settings.warmup_tokens))
            for peer in peers:
                peer.warm_up(warm_ids, settings.warmup_tokens)
        _measure(backbone, drafter, settings, encoded, records, methods, policies, peers, reference, fp32_policy,
                 cfg, len(encoded), progress, out_dir)
    finally:
        close_peers(peers)
    return summarize(records, backbone, drafter, settings, len(encoded))


def bench_configs(settings: BenchSettings, drafter) -> dict:
    """What a bench runs: label -> PolicyConfig; AR always first (the reference). The methods
    as named, or with --sweep every point of each method's dial (sweep.variants)."""
    if settings.sweep:
        from .sweep import check_horizons, parse_sweep, variants

        return variants(check_horizons(parse_sweep(settings.sweep), drafter.k), settings.policy)
    return {m: settings.policy.with_method(m) for m in dict.fromkeys(["ar", *settings.methods])}


# What the peers warm up on (not a bench prompt: see run_bench).
WARMUP_PROMPT = "Write one sentence about the weather today."


def _measure(backbone, drafter, settings, encoded, records, methods, policies, peers, reference, fp32_policy,
             cfg, n_prompts, progress, out_dir) -> None:
    """The timed loop of run_bench: every method, then every peer, prompt by prompt."""
    from tqdm import tqdm

    ref = reference or backbone
    # Closed on any exit, so that an error or "interrupted" line starts on a line of its own.
    with tqdm(total=len(encoded) - len(records), desc="bench", unit="prompt", disable=not progress) as bar:
        for ids in encoded[len(records):]:
            rec: dict = {"prompt_key": _prompt_key(ids), "methods": {}}
            for m in methods:  # timed runs first, interleaved; quality measures after them
                rec["methods"][m] = _record(generate(backbone, ids, policies[m], cfg))
                bar.set_postfix(method=m)
            for peer in peers:
                rec[peer.name] = peer.time(ids, settings.max_new_tokens).as_record()
                bar.set_postfix(method=peer.name)
            for m in methods:
                rec["methods"][m]["nll"] = backbone_nll(ref, ids, rec["methods"][m]["token_ids"])
            if fp32_policy is not None:
                rec["fp32_ar"] = generate(reference, ids, fp32_policy, cfg).token_ids
            records.append(rec)
            bar.update(1)
            if out_dir is not None:
                atomic_write_text(Path(out_dir) / "results.json",
                                  json.dumps(summarize(records, backbone, drafter, settings, n_prompts), indent=1))


def summarize(records: list[dict], backbone, drafter, settings: BenchSettings, n_prompts: int) -> dict:
    """The results dict (see run_bench) of the prompts measured so far."""
    methods = list(records[0]["methods"])
    runs = {m: [rec["methods"][m] for rec in records] for m in methods}
    fp32_ar = [rec["fp32_ar"] for rec in records] if records and "fp32_ar" in records[0] else None

    def rate(rs, key):
        toks = sum(r["decode_tokens"] if key == "decode" else r["new_tokens"] for r in rs)
        secs = sum(r["seconds"] - r["prefill_seconds"] if key == "decode" else r["seconds"] for r in rs)
        return toks / secs if secs > 0 else 0.0

    ar_decode, ar_e2e = rate(runs["ar"], "decode"), rate(runs["ar"], "e2e")
    ar_ids = [r["token_ids"] for r in runs["ar"]]
    results = {}
    for m in methods:
        rs = runs[m]
        n = len(rs)
        samples = [r["token_ids"] for r in rs]
        entry = {
            "speedup": round(rate(rs, "decode") / ar_decode, 4) if ar_decode else None,
            "speedup_e2e": round(rate(rs, "e2e") / ar_e2e, 4) if ar_e2e else None,
            "tokens_per_s": round(rate(rs, "decode"), 3),
            "tokens_per_s_e2e": round(rate(rs, "e2e"), 3),
            "tokens_per_forward": round(sum(r["new_tokens"] for r in rs) / sum(r["forward_passes"] for r in rs), 4),
            "rep4": round(mean_repetition(samples, 4), 5),
            "rep3": round(mean_repetition(samples, 3), 5),
            "rep2": round(mean_repetition(samples, 2), 5),
            "distinct2": round(distinct_n(samples, 2), 5),
            "distinct3": round(distinct_n(samples, 3), 5),
            "agreement_exact": round(sum(a == b for a, b in zip(samples, ar_ids)) / n, 4),
            "common_prefix_mean": round(sum(common_prefix(a, b) for a, b in zip(samples, ar_ids)) / n, 2),
            "nll": round(sum(r["nll"] for r in rs) / n, 4),
            "n_prompts": n,
            "mean_new_tokens": round(sum(r["new_tokens"] for r in rs) / n, 1),
            "accepted_hist": _hist([a for r in rs for a in r["accepted_per_step"]], drafter.k if drafter else 0),
        }
        if fp32_ar is not None:
            entry["agreement_fp32_ar"] = round(sum(a == b for a, b in zip(samples, fp32_ar)) / n, 4)
            entry["common_prefix_fp32_ar"] = round(
                sum(common_prefix(a, b) for a, b in zip(samples, fp32_ar)) / n, 2)
        results[m] = entry
    out = {
        "backbone": backbone.info.as_dict(),
        "settings": {**settings.record(), "n_prompts": n_prompts, "torch_threads": torch.get_num_threads(),
                     "machine": platform.processor() or platform.machine(), "cpu": cpu_info()},
        "complete": len(records) == n_prompts,
        "n_prompts_done": len(records),
        "methods": results,
        "definitions": DEFINITIONS,
    }
    if drafter is not None:
        out["drafter"] = drafter.sizes()
        training = drafter.meta.get("training", {})
        if "heads" in training:
            out["head_accuracy"] = training["heads"]
        # Every shipped horizon's held-out accuracy, for the accuracy-vs-horizon plot.
        by_k = shipped_head_accuracy(backbone.name)
        if "heads" in training:
            by_k.setdefault(str(drafter.k), training["heads"])
        if by_k:
            out["head_accuracy_by_k"] = by_k
    peers = _summarize_peers(records, ar_e2e, ar_decode)
    if peers:
        out["peers"] = peers
        if "hf_generate" in peers:
            hf_rate = peers["hf_generate"]["tokens_per_s_e2e"]
            out["transformers_generate"] = {"tokens_per_s_e2e": hf_rate,
                                            "our_ar_speedup_e2e": round(ar_e2e / hf_rate, 4)}
    if settings.sweep and "verified" in results:
        from .sweep import matched_quality

        out["matched_quality"] = matched_quality(results)
    out["examples"] = {m: runs[m][0]["text"] for m in methods}
    out["runs"] = records  # per prompt and method: what `--resume` continues from
    return out


def _summarize_peers(records: list[dict], ar_e2e: float, ar_decode: float) -> dict:
    """peers of results.json: per peer, its rates against our AR's over the prompts it ran;
    for a peer with its own numerics, the share of outputs token-identical to our AR's; for
    llama-server's speculative modes, also to its own AR's, and the drafts it accepted."""
    peers = {}
    for name in PEER_NAMES:
        pairs = [(rec, PeerRun.from_record(rec[name])) for rec in records if name in rec]
        if not pairs:
            continue
        runs = [r for _, r in pairs]
        secs = sum(r.seconds for r in runs)
        rate = sum(r.new_tokens for r in runs) / secs if secs > 0 else 0.0
        row = {"tokens_per_s_e2e": round(rate, 3), "speedup_vs_ar": round(rate / ar_e2e, 4) if ar_e2e else None,
               "n_prompts": len(runs)}
        if all(r.decode_seconds is not None for r in runs):
            dsecs = sum(r.decode_seconds for r in runs)
            drate = sum(r.decode_tokens for r in runs) / dsecs if dsecs > 0 else 0.0
            row["tokens_per_s"] = round(drate, 3)
            row["speedup_decode_vs_ar"] = round(drate / ar_decode, 4) if ar_decode else None
        if name in OWN_NUMERICS:  # its own numerics (the GGUF's quantised weights): its tokens may differ
            row["same_tokens_as_ar"] = round(sum(
                r.token_ids == rec["methods"]["ar"]["token_ids"] for rec, r in pairs) / len(runs), 4)
        if name.startswith("llama_server_") and name != "llama_server_ar":
            base = [(r, PeerRun.from_record(rec["llama_server_ar"])) for rec, r in pairs if "llama_server_ar" in rec]
            if base:
                row["same_tokens_as_llama_server_ar"] = round(sum(a.token_ids == b.token_ids for a, b in base)
                                                              / len(base), 4)
        if any(r.draft_n is not None for r in runs):
            drafted, accepted = sum(r.draft_n or 0 for r in runs), sum(r.draft_accepted or 0 for r in runs)
            row.update(draft_n=drafted, draft_accepted=accepted,
                       draft_acceptance=round(accepted / drafted, 4) if drafted else None)
        peers[name] = row
    return peers


def _hist(values: list[int], k: int) -> list[int]:
    h = [0] * (k + 1)
    for v in values:
        h[min(v, k)] += 1
    return h


def write_report(results: dict, out_dir: Path, command: str) -> list[Path]:
    """results.json, report.md and PNG plots in out_dir; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    p = out_dir / "results.json"
    atomic_write_text(p, json.dumps(results, indent=1))
    written.append(p)
    p = out_dir / "report.md"
    atomic_write_text(p, render_markdown(results, command))
    written.append(p)
    written.extend(_plots(results, out_dir))
    return written


def table(results: dict) -> str:
    rows = ["| method | speedup | speedup e2e | tok/s | tokens/forward | rep4 | rep3 | rep2 | = AR | common prefix "
            "| NLL |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in results["methods"].items():
        rows.append(f"| {m} | {r['speedup']:.2f}x | {r['speedup_e2e']:.2f}x | {r['tokens_per_s']:.1f} | "
                    f"{r['tokens_per_forward']:.2f} | {r['rep4']:.4f} | {r['rep3']:.4f} | {r['rep2']:.4f} | "
                    f"{r['agreement_exact']:.2f} | {r['common_prefix_mean']:.1f} | {r['nll']:.3f} |")
    return "\n".join(rows)


def peer_table(peers: dict) -> str:
    def x(v):
        return f"{v:.2f}x" if v is not None else "-"

    rows = ["| peer (same prompts) | tok/s end to end | vs our AR (e2e) | decode tok/s | vs our AR (decode) | "
            "same tokens as AR | drafts accepted |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in peers.items():
        same = p.get("same_tokens_as_ar", "same model and numerics")
        if "same_tokens_as_llama_server_ar" in p:
            same = f"{same} ({p['same_tokens_as_llama_server_ar']} as llama_server_ar)"
        drafts = "-"
        if "draft_n" in p:
            rate = f"{p['draft_acceptance']:.2f}, " if p.get("draft_acceptance") is not None else ""
            drafts = f"{rate}{p['draft_accepted']} of {p['draft_n']}"
        decode = f"{p['tokens_per_s']:.1f}" if "tokens_per_s" in p else "-"
        rows.append(f"| {name} | {p['tokens_per_s_e2e']:.1f} | {x(p['speedup_vs_ar'])} | {decode} | "
                    f"{x(p.get('speedup_decode_vs_ar'))} | {same} | {drafts} |")
    return "\n".join(rows)


def render_markdown(results: dict, command: str) -> str:
    s = results["settings"]
    b = results["backbone"]
    lines = [
        "# clp-decode benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Backbone {b['name']} (d = {b['hidden_size']}, {b['num_layers']} layers, {b['params']:,} parameters), "
        f"numerics {b['numerics']}, prompts {s['prompts']} (n = {s['n_prompts']}), greedy, "
        f"max_new_tokens {s['max_new_tokens']}, k = {s['k']}, CLP threshold {s['clp_threshold']}, "
        f"gate threshold {s['gate_threshold']}, verified drafts from {s['draft']}, "
        f"{s['torch_threads']} torch threads.",
        "",
        f"CPU: {cpu_summary(s['cpu'])}." if "cpu" in s else "CPU: not recorded (an older results file).",
        "",
        table(results),
        "",
    ]
    if any("agreement_fp32_ar" in r for r in results["methods"].values()):
        lines += ["Agreement with fp32 AR (numerics check): " + ", ".join(
            f"{m} {r['agreement_fp32_ar']:.2f} (prefix {r['common_prefix_fp32_ar']:.1f})"
            for m, r in results["methods"].items()), ""]
    if "transformers_generate" in results:
        t = results["transformers_generate"]
        lines += [f"transformers' generate() (greedy, same numerics): {t['tokens_per_s_e2e']:.1f} tok/s end to end; "
                  f"our AR loop is {t['our_ar_speedup_e2e']:.2f}x that.", ""]
    if "peers" in results:
        lines += peer_table(results["peers"]).split("\n")
        lines += ["", "hf_* peers run transformers on our very model and numerics; llama_cpp (llama-cpp-python, in "
                  "process) and llama_server_* (llama.cpp's server, one process per mode, sent our prompt token ids) "
                  "run the GGUF file the backbone was converted from, with its quantised weights. llama_server_ar is "
                  "its plain decoding, the others its n-gram speculative modes (--spec-type; lossless, so their text "
                  "should equal llama_server_ar's). Decode tok/s: tokens after the first over the time after the "
                  "prefill (ours from our loop, llama-server's from its own `timings`); drafts accepted: "
                  "accepted / drafted tokens, as llama-server reports them.", ""]
    if "drafter" in results:
        d = results["drafter"]
        lines += ["Sizes: " + ", ".join(f"{k} {v['params']:,} parameters" for k, v in d.items()), ""]
    if "head_accuracy" in results:
        h = results["head_accuracy"]
        extra = "".join(f", {key.replace('_', ' ')} {h[key]}" for key in ("head_top5", "chain_accept", "mean_accepted")
                        if key in h)
        lines += [f"Draft accuracy recorded when the drafter was trained ({h.get('design', 'heads')}, k = {h['k']}, "
                  f"{h['tokens']} positions of that run's own held-out split; `clp eval-heads --prompts mtbench` "
                  f"scores prompts no training saw): top-1 {h['head_top1']}{extra}", ""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in results["definitions"].items()]
    lines += ["", "## First answer of each method", ""]
    for m, text in results.get("examples", {}).items():
        lines += [f"**{m}**:", "", "> " + text.replace("\n", "\n> "), ""]
    if "matched_quality" in results:
        from .sweep import SWEEP_PNG, report_lines

        lines += report_lines(results, SWEEP_PNG)
    return "\n".join(lines) + "\n"


def _plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        written.append(path)

    ms = results["methods"]
    if "matched_quality" in results:
        from .sweep import SWEEP_PNG, figure

        save(figure(results), SWEEP_PNG)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in ms.items():
        ax.scatter(r["rep4"], r["speedup"], s=60)
        ax.annotate(m, (r["rep4"], r["speedup"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("repetition ratio rep-4 (lower is better)")
    ax.set_ylabel("decode speedup vs AR")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_title("speed vs repetition")
    save(fig, "speedup_vs_repetition.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(ms))
    for j, (m, r) in enumerate(ms.items()):
        h = r["accepted_hist"]
        total = max(1, sum(h))
        ax.bar([i + 1 + j * width for i in range(len(h))], [c / total for c in h], width=width, label=m)
    ax.set_xlabel("tokens emitted per forward (1 + accepted head tokens)")
    ax.set_ylabel("share of steps")
    ax.legend(fontsize=8)
    save(fig, "tokens_per_forward_hist.png")

    acc = results.get("head_accuracy_by_k", {})
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, h in acc.items():
            xs = [f"t+{i + 2}" for i in range(len(h["head_top1"]))]
            ax.plot(xs, h["head_top1"], marker="o", label=f"k={k} top-1")
            ax.plot(xs, h["head_top5"], marker="x", ls="--", label=f"k={k} top-5")
        ax.set_ylabel("held-out accuracy vs greedy continuation")
        ax.set_xlabel("head target")
        ax.legend(fontsize=8)
        save(fig, "head_accuracy_vs_horizon.png")
    return written
