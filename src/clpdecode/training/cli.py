"""`clp distill` and `clp train`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ClpError


def default_corpus_dir(backbone_name: str) -> Path:
    """The committed token-id corpus of a backbone, inside the package: found from anywhere."""
    from ..corpus import corpus_dir

    return corpus_dir(backbone_name)


def features_dir(arg: str | None, backbone_name: str, must_exist: bool = True) -> Path:
    """--features, else <cache>/features/<backbone>; with must_exist, a clear error if absent."""
    from ..backbone.loading import cache_dir

    path = Path(arg) if arg else cache_dir() / "features" / backbone_name
    if must_exist and not path.is_dir():
        raise ClpError(f"no cached hidden states at {path}: run `clp distill` first")
    return path


def cmd_distill(args) -> int:
    from ..backbone import load_backbone
    from .distill import DistillConfig, build_features, build_teacher_features, generate_corpus

    backbone = load_backbone(args.model)
    corpus = Path(args.corpus) if args.corpus else default_corpus_dir(backbone.name)
    features = features_dir(args.features, backbone.name, must_exist=False)
    if args.prompts:
        generate_corpus(backbone, corpus, DistillConfig(n_prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                                                        batch_size=args.batch_size, prompt_set=args.prompt_set))
    if args.corpus_only:
        print(f"corpus: {corpus}")
        return 0
    build_features(backbone, corpus, features)
    if args.teacher_forced:
        build_teacher_features(backbone, features, n_conversations=args.teacher_forced)
    print(f"corpus: {corpus}\nhidden states: {features}")
    return 0


def cmd_train(args) -> int:
    import torch

    from ..backbone import load_backbone
    from ..heads.artifacts import save_drafter
    from .data import load_features
    from ..errors import check_positive_int
    from .train import TrainConfig, train_all

    check_positive_int("--k", args.k)
    backbone = load_backbone(args.model)
    features = features_dir(args.features, backbone.name)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / f".{out.name}-work"
    torch.manual_seed(args.seed)
    feats = load_features(features, sources=args.sources)
    tcfg = TrainConfig(k=args.k, design=args.design, draft_vocab=args.draft_vocab, steps=args.steps,
                       batch_size=args.batch_size, predictor_steps=args.predictor_steps,
                       competing=not args.no_competing, competing_steps=args.competing_steps, seed=args.seed,
                       sources=args.sources)
    drafter, report = train_all(feats, backbone, tcfg, work)
    from .train import _accelerator

    if not _accelerator().is_main_process:
        return 0
    save_drafter(drafter, out, backbone)
    print(json.dumps({"out": str(out), **{k: report[k] for k in ("heads", "clp", "positions")}}, indent=1))
    return 0


def add_training_commands(sub, add_model_args, add_drafter_args) -> None:
    from .distill import DISTILL_PROMPT_SETS

    d = sub.add_parser(
        "distill", help="make self-distilled training data (resumable)",
        description="Answer ShareGPT prompts with the backbone's own greedy decoding (token ids, resumable, "
                    "compact enough to commit), then cache the backbone's hidden states of every answer "
                    "position (fp16) so that training never reruns the backbone. --teacher-forced N adds the "
                    "hidden states of N ShareGPT answers read by the backbone (prefill only, ~10x cheaper).")
    add_model_args(d, numerics=False)
    d.add_argument("--corpus", default=None, help="token-id corpus folder (default: the package's assets/corpus/<backbone>)")
    d.add_argument("--features", default=None, help="hidden-state cache folder (default: <cache>/features/<backbone>)")
    d.add_argument("--prompts", type=int, default=0,
                   help="answer this many ShareGPT prompts first (0: only cache the existing corpus) (default: 0)")
    d.add_argument("--prompt-set", default="sharegpt", choices=list(DISTILL_PROMPT_SETS),
                   help="sharegpt: first human turns through the chat template (instruct models); passages: "
                        "plain-text openings of ShareGPT answers to continue (base models such as gemma3-270m); "
                        "either way the held-out prompts are those of the deduplicated split (README, \"Held-out "
                        "data\"), and prompts that duplicate a benchmark prompt are never answered (default: sharegpt)")
    d.add_argument("--corpus-only", action="store_true",
                   help="stop after the token-id corpus (skip caching hidden states)")
    d.add_argument("--max-new-tokens", type=int, default=192, help="answer length cap (default: 192)")
    d.add_argument("--batch-size", type=int, default=32, help="generation batch (default: 32)")
    d.add_argument("--teacher-forced", type=int, default=0,
                   help="also cache N teacher-forced ShareGPT answers (default: 0)")
    d.set_defaults(func=cmd_distill)

    t = sub.add_parser(
        "train", help="train MTP heads, CLP, gates and competing heads for one k",
        description="Train on cached hidden states (see `clp distill`): the k MTP heads (head i -> token "
                    "t+1+i), then CLP and the gate baseline on the heads' predictions, then the "
                    "head-competition ablation heads. Checkpoints every 250 steps; rerun to resume. Writes "
                    "a heads folder (config.json + model.safetensors).")
    add_model_args(t, numerics=False)
    t.add_argument("--k", type=int, default=2, help="horizon: number of heads (default: 2)")
    t.add_argument("--design", default="fused", choices=["fused", "residual"],
                   help="head design (default: fused)")
    t.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size, 0 = all (default: 8192)")
    t.add_argument("--steps", type=int, default=3000, help="head optimiser steps (default: 3000)")
    t.add_argument("--predictor-steps", type=int, default=1500, help="CLP / gate steps (default: 1500)")
    t.add_argument("--batch-size", type=int, default=256, help="positions per step (default: 256)")
    t.add_argument("--no-competing", action="store_true", help="skip the competing-ablation heads")
    t.add_argument("--competing-steps", type=int, default=0,
                   help="optimiser steps of the competing heads (default: half of --steps)")
    t.add_argument("--features", default=None, help="hidden-state cache (default: <cache>/features/<backbone>)")
    t.add_argument("--sources", default="all", choices=["all", "distilled", "teacher"],
                   help="head training data: self-distilled answers, teacher-forced ShareGPT, or both (default: all)")
    t.add_argument("--out", required=True, help="output heads folder")
    t.add_argument("--work", default=None, help="checkpoint folder (default: beside --out)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)
