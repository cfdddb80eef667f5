"""`clp eval-heads` and `clp bench`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..errors import ClpError


def _baseline_folder(backbone_name: str, k: int) -> Path:
    from ..heads.artifacts import shipped_drafter_dir

    folder = shipped_drafter_dir(backbone_name, k, baseline=True)
    if folder is None:
        raise ClpError(f"no independent heads are shipped for {backbone_name!r} with k={k}")
    return folder


def cmd_eval_heads(args) -> int:
    from ..backbone import load_backbone
    from ..backbone.loading import backbone_name
    from ..corpus import corpus_dir, read_corpus
    from ..errors import check_positive_int
    from ..heads import check_drafter, load_drafter, resolve_drafter
    from ..heads.accuracy import heldout_accuracy, heldout_states
    from ..heads.artifacts import default_k

    # Everything a user can get wrong is checked before the backbone loads.
    name = backbone_name(args.model)
    check_drafter(args.model, args.k, args.heads)
    if args.baseline and args.heads is None:  # with --heads, the folder's k is known once it is read
        _baseline_folder(name, args.k if args.k is not None else default_k(name))
    source: dict = {}
    if args.prompts is not None:
        from .prompts import SECOND_TURN_SETS, load_prompts, load_turn_pairs

        if args.corpus is not None:
            raise ClpError("--corpus and --prompts are two sources of answers: give one")
        max_new_tokens = 128 if args.max_new_tokens is None else args.max_new_tokens
        check_positive_int("--max-new-tokens", max_new_tokens)
        check_positive_int("--batch-size", args.batch_size)
        two_turn = args.prompts in SECOND_TURN_SETS
        prompts = (load_turn_pairs if two_turn else load_prompts)(args.prompts, args.limit)
    else:
        if args.limit is not None or args.max_new_tokens is not None:
            raise ClpError("--limit and --max-new-tokens go with --prompts (the corpus's answers are fixed)")
        corpus = Path(args.corpus) if args.corpus else corpus_dir(name)
        if not corpus.is_dir():
            raise ClpError(f"no corpus at {corpus}: pass --corpus DIR (written by `clp distill`)")
        all_records = read_corpus(corpus)
        records = [r for r in all_records if r.get("split") == "heldout"]
        if not records:
            raise ClpError(f"{corpus} has no held-out answers")
        source = {"source": "corpus", "corpus": str(corpus), "sequences": len(records)}
        was = sum(r.get("split_at_generation") == "heldout" for r in all_records)
        if "split_at_generation" in records[0]:
            source["heldout_at_generation"] = was
    backbone = load_backbone(args.model, numerics=args.numerics)
    drafter = resolve_drafter(backbone, args.k, args.heads)
    base = load_drafter(_baseline_folder(backbone.name, drafter.k), backbone) if args.baseline else None
    if args.prompts is not None:
        from .answers import prompt_answers, second_turn_answers

        answer = second_turn_answers if two_turn else prompt_answers
        records, cached = answer(backbone, prompts, max_new_tokens, batch_size=args.batch_size)
        source = {"source": "prompts", "prompts": args.prompts, "sequences": len(records),
                  "max_new_tokens": max_new_tokens, "numerics": args.numerics, "answers_cached": cached}
    aux = drafter.aux_layers or (base.aux_layers if base is not None else ())
    states = heldout_states(backbone, records, aux_layers=aux)
    res = heldout_accuracy(drafter.heads, backbone, states, drafter.k)
    res.update(source)
    if base is not None:
        res["baseline"] = heldout_accuracy(base.heads, backbone, states, base.k)
    if args.json:
        print(json.dumps(res))
        return 0
    if source["source"] == "corpus":
        what = f"{source['sequences']} held-out answers of {source['corpus']}"
        if "heldout_at_generation" in source:
            what += (f" (of the {source['heldout_at_generation']} held out when it was made, the rest now train: "
                     "their prompts have duplicates in training)")
    else:
        what = (f"the backbone's greedy answers ({source['max_new_tokens']} new tokens at most, "
                f"{source['numerics']}) to {source['sequences']} prompts of {source['prompts']}")
    print(f"scored on {what}")
    rows = [res] + ([res["baseline"]] if args.baseline else [])
    for r in rows:
        print(f"{r['design']}: k = {r['k']}, {r['tokens']} positions, "
              f"mean accepted {r['mean_accepted']:.3f} drafts per verified step")
        for i in range(r["k"]):
            print(f"  draft {i + 1} (token t+{i + 2}): top-1 {r['head_top1'][i]:.3f}  top-5 {r['head_top5'][i]:.3f}"
                  f"  drafts 1..{i + 1} all right {r['chain_accept'][i]:.3f}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from ..backbone import threads

    threads.freeze()  # --threads auto: the cores free now, fixed while the methods are timed

    from ..backbone import load_backbone
    from ..decoding import METHODS, GenerationConfig
    from ..heads import check_drafter, resolve_drafter
    from .bench import BenchSettings, bench_prompt_ids, prepare_out_dir, run_bench, table, write_report
    from .prompts import SECOND_TURN_SETS, load_prompts, load_turn_pairs

    # Every check a user can fail comes before the slow backbone load and the first prompt.
    chosen = args.methods is not None
    methods = tuple(m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ClpError(f"unknown method(s) {', '.join(bad) or repr(args.methods)}; choose from {', '.join(METHODS)}")
    sweep = None
    if args.sweep is not None:
        from .sweep import DEFAULT_SWEEP, SWEEP_KEYS, parse_sweep

        if chosen:
            raise ClpError("--sweep runs its own methods (AR, verified and the swept ones): drop --methods")
        parsed = parse_sweep(" ".join(args.sweep) or DEFAULT_SWEEP)  # every value checked before the load
        sweep = " ".join(f"{k}=" + ",".join(f"{v:g}" for v in vals) for k, vals in parsed.items())
        methods = tuple(dict.fromkeys(["verified", *(SWEEP_KEYS[k][0] for k in parsed)]))
    GenerationConfig(max_new_tokens=args.max_new_tokens)
    two_turn = args.prompts in SECOND_TURN_SETS
    if two_turn and args.raw:
        raise ClpError(f"--raw: {args.prompts} is a set of conversations, which go through the chat template")
    prompts = (load_turn_pairs if two_turn else load_prompts)(args.prompts, args.limit)
    needs = any(m != "ar" for m in methods)
    check_drafter(args.model, args.k, args.heads, required=needs)
    if args.hf_generate:
        from .peers import find_llama_server

        find_llama_server()  # a $CLP_LLAMA_SERVER that names no executable fails here, not after the load
    out_dir = prepare_out_dir(Path(args.out))
    backbone = load_backbone(args.model, numerics=args.numerics)
    drafter = resolve_drafter(backbone, args.k, args.heads) if needs else None
    if drafter is not None:
        if drafter.competing is None and "competing" in methods and not chosen:
            # The default methods on a drafter trained without the ablation's heads: the
            # other rows still run (asked for by name, `competing` fails with its reason).
            methods = tuple(m for m in methods if m != "competing")
            print("clp bench: no competing row: this drafter has no head-competition heads "
                  "(`clp train` without --no-competing makes them)", file=sys.stderr)
    numerics = backbone.info.numerics  # "auto" resolved
    reference = load_backbone(args.model, numerics="fp32", progress=False) if numerics != "fp32" else None
    settings = BenchSettings(prompts=args.prompts, limit=args.limit, methods=methods,
                             max_new_tokens=args.max_new_tokens, numerics=numerics, policy=args.policy,
                             k=drafter.k if drafter else (args.k or 0), threads=torch.get_num_threads(),
                             hf_generate=args.hf_generate, raw=args.raw, sweep=sweep)
    encoded = bench_prompt_ids(backbone, prompts, settings)
    try:
        results = run_bench(backbone, drafter, encoded, settings, reference=reference, out_dir=out_dir,
                            resume=args.resume)
    except KeyboardInterrupt:
        if (out_dir / "results.json").is_file():
            print(f"clp: the prompts measured so far are in {out_dir / 'results.json'}; "
                  "rerun with --resume to continue", file=sys.stderr)
        raise
    command = "clp " + " ".join(shlex.quote(a) for a in args.argv)
    written = write_report(results, out_dir, command)
    print(table(results))
    print(f"\nreport: {written[1]}  (results.json and plots beside it)")
    return 0


def _int_list(flag: str, text: str, empty: bool = False) -> tuple[int, ...]:
    """'1,2,5' -> (1, 2, 5), each at least 1."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ClpError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if (not vals and not empty) or any(v < 1 for v in vals):
        raise ClpError(f"{flag} takes comma-separated numbers >= 1, got {text!r}")
    return vals


def cmd_profile(args) -> int:
    from ..backbone import load_backbone
    from ..backbone.loading import context_window
    from ..errors import check_profile_context
    from ..heads import check_drafter, resolve_drafter
    from .profile import largest_step, profile_step

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if not engines or any(e not in ("lean", "hf") for e in engines):
        raise ClpError(f"--engines takes lean and/or hf, not {args.engines!r}")
    if args.context < 1 or args.repeats < 1:
        raise ClpError("--context and --repeats must be at least 1")
    tokens, tree_sizes = _int_list("--tokens", args.tokens), _int_list("--tree-sizes", args.tree_sizes, empty=True)
    step = largest_step(tokens, tree_sizes)
    # The window from the model's config or GGUF header, before the load; from the loaded
    # backbone (before the prefill) where that is not known without loading.
    check_profile_context(args.context, step, context_window(args.model))
    check_drafter(args.model, args.k, args.heads, required=False)
    rows = []
    for numerics in args.numerics_list.split(","):
        backbone = load_backbone(args.model, numerics=numerics.strip())
        check_profile_context(args.context, step, backbone.max_positions)
        drafter = resolve_drafter(backbone, args.k, args.heads, required=False)  # as `clp info` has it
        rows.append(profile_step(backbone, drafter, context=args.context, repeats=args.repeats, engines=engines,
                                 tokens=tokens, tree_sizes=tree_sizes))
        del backbone
    if args.json:
        print(json.dumps(rows))
        return 0
    cols = list(tokens) + [f"tree{s}" for s in tree_sizes]
    steps = " | ".join(f"T={c}" if isinstance(c, int) else f"{c} (T={int(c[4:]) + 1})" for c in cols)
    print(f"| numerics | engine | {steps} | T=5 / T=1 | LM head 1 row | 3 rows | heads | CLP | row diff |")
    print("| --- | --- | " + " | ".join("---" for _ in cols) + " | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for engine, f in r["forward_ms_by_engine"].items():
            own = engine == r["engine"]
            ms = " | ".join(str(f.get(c, "-")) for c in cols)
            ratio = f"{f[5] / f[1]:.2f}" if 1 in f and 5 in f else "-"
            extra = (f"{r['lm_head_ms_1_row']} | {r['lm_head_ms_3_rows']} | {r.get('heads_ms', '-')} | "
                     f"{r.get('clp_ms', '-')} | {r['row_max_abs_diff']:.2g}") if own else "| | | |"
            print(f"| {r['numerics']} | {engine} | {ms} | {ratio} | {extra} |")
    from .cpu import cpu_summary

    print(f"CPU: {cpu_summary(rows[0]['cpu'])}")
    print(f"(median ms over {rows[0]['repeats']} interleaved rounds, {rows[0]['threads']} threads, "
          f"{rows[0]['context']} cached tokens; LM head, heads, CLP and row diff with the backbone's own engine)")
    return 0


def cmd_bench_serve(args) -> int:
    from .load import bench_serve

    return bench_serve(args)


def add_bench_serve_command(sub, add_model_args, add_drafter_args) -> None:
    from ..decoding import METHODS
    from ..decoding.scheduler import BUDGETS, DEFAULT_SLOTS
    from .load import DEFAULT_CONCURRENCY
    from .prompts import PROMPT_SET_HELP

    s = sub.add_parser(
        "bench-serve", help="clp serve under concurrent clients, beside llama-server (--peers)",
        description="Start `clp serve` (its own port, the flags below) and, with --peers, `llama-server --parallel N` "
                    "on the GGUF the backbone comes from (the binary of `make peers`, $CLP_LLAMA_SERVER or PATH); for "
                    "each --concurrency C, C clients each send --requests streamed greedy requests back to back, the "
                    "same prompt token ids to both sides. Prints a table per side and C (aggregate and per-request "
                    "tokens/s, p50/p99 time to first token and latency, tokens per forward, the share of texts equal "
                    "to the side's own single-stream greedy AR text) and writes DIR/results.json, DIR/report.md and "
                    "DIR/load.png (throughput and p99 latency against concurrency). Status lines go to stderr.")
    add_model_args(s)
    add_drafter_args(s)
    s.add_argument("--method", default="verified", choices=METHODS, help="clp serve's --method (default: verified)")
    s.add_argument("--parallel", type=int, default=DEFAULT_SLOTS,
                   help="slots of both servers: clp serve --parallel and llama-server --parallel "
                        "(default: %(default)s)")
    s.add_argument("--spec-budget", default="auto", choices=BUDGETS, help="clp serve's --spec-budget (default: auto)")
    s.add_argument("--concurrency", default=DEFAULT_CONCURRENCY,
                   help=f"concurrent clients of each run, comma-separated (default: {DEFAULT_CONCURRENCY})")
    s.add_argument("--requests", type=int, default=2, help="requests each client sends back to back (default: 2)")
    s.add_argument("--same-prompts", action="store_true",
                   help="every concurrency answers the same requests: the most clients x --requests, split over "
                        "its clients (1 client sends them all back to back), so that concurrencies compare on the "
                        "same prompts; without it each client sends --requests, and 1 client answers the first "
                        "--requests prompts only")
    s.add_argument("--repeats", type=int, default=1,
                   help="rounds of every side at each concurrency, back to back, the sides' order reversed in every "
                        "other round; the report gives medians (and each round in results.json): this machine's "
                        "speed drifts by tens of percent within minutes, so settings within ~15%% of each other "
                        "need several rounds to be ranked (default: 1)")
    s.add_argument("--prompts", default="mtbench",
                   help="; ".join(f"{k}: {v}" for k, v in PROMPT_SET_HELP.items()
                                  if k in ("mtbench", "sharegpt-heldout"))
                   + '; or any set of `clp bench`, or a JSONL file of {"prompt": ...}; request j of client c asks '
                     "prompt c x --requests + j (default: mtbench)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="max_tokens of each request (default: 128)")
    s.add_argument("--out", default="bench-out/serve", help="output folder, checked before anything starts "
                                                             "(default: bench-out/serve)")
    s.add_argument("--peers", action="store_true",
                   help="also run llama-server --parallel N on the same GGUF (-c N x the context a slot needs, "
                        "-t/-tb the threads, greedy, no prompt cache)")
    s.add_argument("--also", default="",
                   help="our other settings, run at every concurrency right after the main one (this machine's "
                        "speed drifts: separate runs do not compare): ar (the same server, requests with method "
                        "ar: batched AR) and/or off (a second clp serve with --spec-budget off), comma-separated")
    s.set_defaults(func=cmd_bench_serve)


def add_evaluation_commands(sub, add_model_args, add_drafter_args, add_policy_args) -> None:
    from .prompts import PROMPT_SET_HELP, SECOND_TURN_HELP

    e = sub.add_parser(
        "eval-heads", help="held-out accuracy and chain acceptance of the drafter",
        description="Accuracy of each draft against the backbone's greedy continuation: top-1/top-5 per draft, "
                    "the share of positions whose drafts 1..i are all right, and their sum (drafts kept per "
                    "verified step). By default on the committed corpus's held-out self-distilled answers, "
                    "relabelled under the deduplicated held-out rule (answers whose prompts have duplicates in "
                    "training no longer count); with --prompts on the backbone's greedy answers to a prompt set, "
                    "generated here in batches and cached by content (prompts, backbone, numerics, "
                    "--max-new-tokens), so a rerun only recomputes the states. Computes the backbone's states "
                    "itself (about 20 s per 45 answers on 2 cores; answers ~10-40 tokens/s).")
    add_model_args(e)
    add_drafter_args(e)
    e.add_argument("--corpus", default=None, help="token-id corpus with a held-out split (default: the shipped one)")
    e.add_argument("--prompts", default=None,
                   help="score on the backbone's own greedy answers to these prompts instead of the corpus: "
                        + "; ".join(f"{k}: {v}" for k, v in PROMPT_SET_HELP.items() if k != "passages")
                        + "; passages: plain-text openings of held-out ShareGPT answers (211; read as plain text "
                          "by a backbone without a chat template, e.g. gemma3-270m)"
                        + "".join(f"; {k}: {v}" for k, v in SECOND_TURN_HELP.items())
                        + '; or a JSONL file of {"prompt": ...} lines')
    e.add_argument("--limit", type=int, default=None, help="with --prompts: the first N prompts (default: all)")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="with --prompts: answer length cap (default: 128)")
    e.add_argument("--batch-size", type=int, default=16,
                   help="with --prompts: prompts answered together (default: 16)")
    e.add_argument("--baseline", action="store_true",
                   help="also evaluate the shipped independent heads on the same positions")
    e.add_argument("--json", action="store_true",
                   help='print {"k", "design", "head_top1", "head_top5", "chain_accept", "mean_accepted", '
                        '"tokens", "source", "sequences", ...[, "baseline"]}')
    e.set_defaults(func=cmd_eval_heads)

    b = sub.add_parser(
        "bench", help="speed and quality of every method against AR, in one run",
        description="Run the methods interleaved prompt by prompt (same backbone, numerics, prompts and "
                    "max_new_tokens, after a warm-up) and write DIR/results.json, DIR/report.md and PNG plots. "
                    "Speedups are ratios against AR measured in the same run.")
    add_model_args(b)
    add_drafter_args(b)
    add_policy_args(b)
    b.add_argument("--prompts", default="mtbench",
                   help="; ".join(f"{k}: {v}" for k, v in PROMPT_SET_HELP.items())
                   + "".join(f"; {k}: {v}; the first answers are generated once (batched) and cached"
                             for k, v in SECOND_TURN_HELP.items())
                   + '; or a JSONL file of {"prompt": ...} (default: mtbench)')
    b.add_argument("--limit", type=int, default=10, help="first N prompts (default: 10)")
    from ..decoding import METHODS

    b.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default: all of {','.join(METHODS)}; competing only when the "
                        "drafter has the ablation's heads)")
    from .sweep import DEFAULT_SWEEP

    b.add_argument("--sweep", nargs="*", default=None, metavar="KEY=V1,V2",
                   help="speed against quality: instead of --methods, run AR, verified and each swept method at "
                        "every value of its dial (clp-threshold=..., gate-threshold=..., naive-k=... : naive "
                        "with at most k' drafts), interleaved; the report adds speedup against NLL and rep4 "
                        f"(sweep.png), the Pareto front and matched-quality readings (--sweep alone: {DEFAULT_SWEEP})")
    b.add_argument("--max-new-tokens", type=int, default=128, help="(default: 128)")
    b.add_argument("--out", default="bench-out",
                   help="output folder, checked before the first prompt; results.json there is rewritten after "
                        "every prompt (default: bench-out)")
    b.add_argument("--resume", action="store_true",
                   help="continue the bench whose results.json is in --out (same settings; --limit may grow): "
                        "prompts already measured there are kept, not rerun")
    b.add_argument("--raw", action="store_true",
                   help="plain-text prompts, no chat template (base models such as gemma3-270m)")
    b.add_argument("--hf-generate", action="store_true",
                   help="also time the peers on the same prompts: transformers' greedy generate() and its "
                        "prompt-lookup decoding (prompt_lookup_num_tokens=10) on our model; llama.cpp on the "
                        "backbone's GGUF, in process (llama-cpp-python) and as llama-server (AR and its ngram-simple, "
                        "ngram-mod and ngram-map-k speculative modes; the binary from `make peers`, "
                        "$CLP_LLAMA_SERVER or PATH); a peer that cannot run is skipped with one line on stderr; "
                        "results.json gets a `peers` object")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "profile", help="cost of each part of a decode step, per numerics",
        description="Median milliseconds of the trunk forward over 1, 2, 3, 5 and 8 new tokens on a KV cache of "
                    "--context tokens (the lean engine and transformers' forward, same weights), the LM head, the "
                    "MTP heads and CLP; and the largest difference between a 3-token step and three 1-token steps "
                    "(0 or float noise: rows are independent and verified decoding is exact).")
    p.add_argument("--model", default="embedded", help="backbone (default: embedded)")
    p.add_argument("--threads", default=None, metavar="N",
                   help="CPU threads, fixed while it times (default: torch's, one per core)")
    add_drafter_args(p)
    p.add_argument("--numerics-list", default="q4,fp16,fp32",
                   help="numerics to profile, comma-separated, of fp32,fp16,int8,q4 (default: q4,fp16,fp32)")
    p.add_argument("--context", type=int, default=256, help="cached tokens before the step (default: 256)")
    p.add_argument("--engines", default="lean,hf",
                   help="forwards to time: lean (ours: Llama, Qwen2, Gemma 3) and/or hf (transformers'); "
                        "default: lean,hf")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per measurement (default: 9)")
    from .profile import STEP_TOKENS

    p.add_argument("--tokens", default=",".join(map(str, STEP_TOKENS)),
                   help=f"new tokens per timed step, comma-separated (default: {','.join(map(str, STEP_TOKENS))})")
    p.add_argument("--tree-sizes", default="8",
                   help="draft trees to time as one tree step (lean engine), in draft nodes, comma-separated; "
                        "'' for none (default: 8)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per numerics")
    p.set_defaults(func=cmd_profile)

    add_bench_serve_command(sub, add_model_args, add_drafter_args)
