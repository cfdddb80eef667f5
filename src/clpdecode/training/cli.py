"""`clp distill` and `clp train`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ClpError


def features_dir(arg: str | None, backbone_name: str, must_exist: bool = True) -> Path:
    """--features, else <cache>/features/<backbone>; with must_exist, a clear error if absent."""
    from ..backbone.loading import cache_dir

    path = Path(arg) if arg else cache_dir() / "features" / backbone_name
    if must_exist and not path.is_dir():
        raise ClpError(f"no cached hidden states at {path}: run `clp distill` first")
    return path


def _out_and_work(args) -> Path:
    """`clp train`'s two output folders, checked before anything loads (a run that trained
    for an hour must not die writing them): --out, and --work, else a hidden folder beside
    --out. Returns the work folder."""
    from ..atomic import check_writable

    out = check_writable(args.out, "--out")
    return check_writable(args.work or out.parent / f".{out.name}-work", "--work")


def check_device(arg: str) -> None:
    """--device: cpu, or cuda (cuda:N) where a GPU is; a clear error otherwise."""
    import torch

    try:
        device = torch.device(arg)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ClpError(f"--device takes cpu or cuda (or cuda:N), got {arg!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClpError("--device cuda: no CUDA device is available here")


def cmd_distill(args) -> int:
    from ..atomic import check_writable
    from ..backbone import load_backbone
    from ..backbone.loading import backbone_name
    from ..corpus import default_corpus, start_user_corpus, user_corpus_dir
    from ..errors import check_positive_int
    from .distill import DistillConfig, build_features, build_teacher_features, generate_corpus

    if args.prompts is not None:
        check_positive_int("--prompts", args.prompts)  # leave it out to answer nothing
    for opt in ("max_new_tokens", "batch_size"):
        check_positive_int("--" + opt.replace("_", "-"), getattr(args, opt))
    if args.teacher_forced < 0:
        raise ClpError(f"--teacher-forced must be >= 0, got {args.teacher_forced}")
    check_device(args.device)
    # Where it writes, checked before the load. The shipped corpus is read-only input: new
    # answers go to the cache (begun as its copy) or to --corpus.
    name = backbone_name(args.model)
    if args.corpus:
        corpus = Path(args.corpus)
    else:
        corpus = user_corpus_dir(name) if args.prompts else default_corpus(name)
    if args.prompts:
        check_writable(corpus, "--corpus" if args.corpus else "the corpus folder")
    features = features_dir(args.features, name, must_exist=False)
    if not args.corpus_only:
        check_writable(features, "--features" if args.features else "the hidden-state folder")
    backbone = load_backbone(args.model)
    if args.prompts and not args.corpus:
        start_user_corpus(name)
    print(f"distill: corpus {corpus}" + ("" if args.corpus_only else f", hidden states {features}"), file=sys.stderr)
    if args.prompts:
        generate_corpus(backbone, corpus, DistillConfig(n_prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                                                        batch_size=args.batch_size, prompt_set=args.prompt_set,
                                                        device=args.device))
    if args.corpus_only:
        print(f"corpus: {corpus}")
        return 0
    build_features(backbone, corpus, features)
    if args.teacher_forced:
        build_teacher_features(backbone, features, n_conversations=args.teacher_forced)
    print(f"corpus: {corpus}\nhidden states: {features}")
    return 0


def _aux_layers(arg: str | None, design: str) -> tuple[int, ...]:
    """--aux-layers "2,15,27" -> (2, 15, 27); () when not given. Checked before anything loads."""
    if not arg:
        return ()
    if design != "eagle3":
        raise ClpError("--aux-layers goes with --design eagle3")
    try:
        layers = tuple(int(x) for x in arg.split(","))
    except ValueError:
        raise ClpError(f"--aux-layers takes three layer indices, e.g. 2,15,27; got {arg!r}") from None
    if len(layers) != 3 or min(layers) < 0:
        raise ClpError(f"--aux-layers takes three layer indices >= 0, e.g. 2,15,27; got {arg!r}")
    return layers


def cmd_train_drafter(args, work: Path) -> int:
    """`clp train --design eagle3|chain`: token corpora in, a drafter bundle out."""
    from ..backbone import load_backbone
    from ..corpus import default_corpus, read_corpus
    from ..errors import check_positive_int
    from ..heads.artifacts import save_drafter
    from .data import drafter_sequences
    from .drafter import DrafterTrainConfig, load_init, train_drafter
    from .fit import accelerator

    for opt in ("batch_sequences", "max_len"):
        check_positive_int("--" + opt.replace("_", "-"), getattr(args, opt))
    if args.sequences and args.conversations is not None:
        raise ClpError("--sequences replaces ShareGPT's conversations: give it or --conversations, not both")
    if args.sequences and args.turns != "all":
        raise ClpError("--turns picks ShareGPT's answers; a --sequences file was tokenised already")
    if args.conversations is not None and args.conversations < 0:
        raise ClpError(f"--conversations must be >= 0, got {args.conversations}")
    if args.minutes < 0:
        raise ClpError(f"--minutes must be >= 0, got {args.minutes}")
    if args.lr is not None and not args.lr > 0:
        raise ClpError(f"--lr must be > 0, got {args.lr}")
    aux_layers = _aux_layers(args.aux_layers, args.design)
    if args.chain_mlp is not None:
        if args.design != "chain" or args.init:
            raise ClpError("--chain-mlp goes with --design chain, from scratch (an --init bundle has its own width)")
        check_positive_int("--chain-mlp", args.chain_mlp)
    if args.init:
        from ..heads.artifacts import check_heads_folder

        check_heads_folder(args.init)  # before the backbone loads
    check_device(args.device)
    backbone = load_backbone(args.model, numerics=args.numerics)
    if any(i >= backbone.info.num_layers for i in aux_layers):
        raise ClpError(f"--aux-layers {args.aux_layers}: {backbone.name} has layers 0..{backbone.info.num_layers - 1}")
    corpus = Path(args.corpus) if args.corpus else default_corpus(backbone.name)
    records = read_corpus(corpus) if corpus.is_dir() else []
    cfg = DrafterTrainConfig(design=args.design, aux_layers=aux_layers, chain_mlp=args.chain_mlp or 0,
                             init=args.init or "", k=args.k,
                             draft_vocab=args.draft_vocab, steps=args.steps, minutes=args.minutes,
                             batch_sequences=args.batch_sequences, max_len=args.max_len, seed=args.seed,
                             device=args.device,
                             **({"lr": args.lr} if args.lr is not None else {}),
                             **({"predictor_steps": args.predictor_steps} if args.predictor_steps is not None else {}),
                             **({"competing_steps": 0} if args.no_competing else
                                {"competing_steps": args.competing_steps} if args.competing_steps is not None else {}))
    init = load_init(args.init, cfg, backbone) if args.init else None  # before the data are read
    train, pred = drafter_sequences(backbone, records, max_len=args.max_len, conversations=args.conversations,
                                    predictor_share=cfg.predictor_share, seed=args.seed, sequences=args.sequences,
                                    turns=args.turns)
    if not train:
        answers = sum(r.get("split") == "train" for r in records)
        if answers or args.conversations != 0:  # there was text, and --max-len cut every answer off
            raise ClpError(f"no training sequence has an answer token within its first --max-len {args.max_len} "
                           "tokens: raise --max-len")
        raise ClpError(f"no training sequences: corpus {corpus} has no training answers (run `clp distill` first) "
                       "and --conversations 0 reads none of ShareGPT's")
    print(f"train: {len(train):,} sequences ({sum(sum(m) for _, m in train):,} trained tokens); {len(pred):,} "
          "self-distilled answers held back for CLP, the gates and the competing heads", file=sys.stderr)
    drafter, report = train_drafter(backbone, train, pred, cfg, work, init)
    if not accelerator().is_main_process:
        return 0
    save_drafter(drafter, Path(args.out), backbone)
    print(json.dumps({"out": args.out, "drafter_steps": report["drafter_steps"], "finished": report["finished"],
                      "sequences": report["sequences"], "predictors": report.get("predictors")}, indent=1))
    return 0


def cmd_train_heads(args, work: Path) -> int:
    """`clp train --design fused|residual`: cached hidden states in, independent heads out."""
    import torch

    from ..backbone import load_backbone
    from ..errors import check_positive_int
    from ..heads.artifacts import save_drafter
    from .data import load_features
    from .fit import accelerator
    from .train import TrainConfig, train_all

    if args.init:
        raise ClpError("--init goes with --design eagle3 or chain")
    check_positive_int("--batch-size", args.batch_size)
    backbone = load_backbone(args.model, numerics="fp32")
    features = features_dir(args.features, backbone.name)
    torch.manual_seed(args.seed)
    feats = load_features(features, sources=args.sources)
    tcfg = TrainConfig(k=args.k, design=args.design, draft_vocab=args.draft_vocab, steps=args.steps,
                       batch_size=args.batch_size, competing=not args.no_competing,
                       competing_steps=args.competing_steps or 0, seed=args.seed, sources=args.sources,
                       **({"predictor_steps": args.predictor_steps} if args.predictor_steps is not None else {}))
    drafter, report = train_all(feats, backbone, tcfg, work)
    if not accelerator().is_main_process:
        return 0
    save_drafter(drafter, Path(args.out), backbone)
    print(json.dumps({"out": args.out, **{k: report[k] for k in ("heads", "clp", "positions")}}, indent=1))
    return 0


def cmd_train(args) -> int:
    """`clp train`: the checks every design shares, before anything loads, then its design's command."""
    from ..errors import check_positive_int
    from .drafter import DESIGNS

    for opt in ("k", "steps", "predictor_steps", "competing_steps"):
        if getattr(args, opt) is not None:
            check_positive_int("--" + opt.replace("_", "-"), getattr(args, opt))
    if args.draft_vocab < 0:
        raise ClpError(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {args.draft_vocab}")
    work = _out_and_work(args)
    return (cmd_train_drafter if args.design in DESIGNS else cmd_train_heads)(args, work)


def cmd_sequences(args) -> int:
    """`clp sequences`: ShareGPT's training-split answers tokenised for `clp train --sequences`."""
    from ..atomic import check_writable
    from ..backbone import load_backbone
    from ..errors import check_positive_int
    from .data import write_sequences

    check_positive_int("--max-len", args.max_len)
    if args.conversations is not None:
        check_positive_int("--conversations", args.conversations)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ClpError(f"--out {out}: a sequences file ends in .npz")
    check_writable(out, "--out", folder=False)
    backbone = load_backbone(args.model, numerics="fp32")  # only its tokenizer and chat template are read
    print(json.dumps(write_sequences(backbone, out, max_len=args.max_len, conversations=args.conversations,
                                     turns=args.turns), indent=1))
    return 0


def _add_sequence_args(p, scope: str = "") -> None:
    """--turns and --max-len: how ShareGPT's conversations become sequences, the same for
    `clp train` and `clp sequences` (which writes what train would read)."""
    from .data import TURNS

    p.add_argument("--turns", choices=TURNS, default=TURNS[0],
                   help=f"{scope}which answers of each ShareGPT conversation train: all (one sequence per "
                        "answer, its earlier turns as context as they fit) or each conversation's first "
                        f"(an ablation) (default: {TURNS[0]})")
    p.add_argument("--max-len", type=int, default=384, help=f"{scope}tokens per sequence (default: 384)")


def add_training_commands(sub, add_model_args, add_drafter_args) -> None:
    from .distill import DISTILL_PROMPT_SETS

    d = sub.add_parser(
        "distill", help="make self-distilled training data (resumable)",
        description="Answer ShareGPT prompts with the backbone's own greedy decoding (token ids, resumable, "
                    "compact enough to commit), then cache the backbone's hidden states of every answer "
                    "position (fp16) so that training never reruns the backbone. --teacher-forced N adds the "
                    "hidden states of N ShareGPT answers read by the backbone (prefill only, ~10x cheaper).")
    add_model_args(d, numerics=False)
    d.add_argument("--corpus", default=None,
                   help="token-id corpus folder to extend (or, without --prompts, to read) (default: "
                        "<cache>/corpus/<backbone>, begun as a copy of the corpus shipped for the backbone, which "
                        "is read-only input; without --prompts the shipped one until the cache holds one)")
    d.add_argument("--features", default=None, help="hidden-state cache folder (default: <cache>/features/<backbone>)")
    d.add_argument("--prompts", type=int, default=None,
                   help="answer the first N prompts of a seeded order first, N >= 1; those the corpus holds "
                        "already are skipped, so a rerun resumes (default: none, only cache the hidden states of "
                        "the existing corpus)")
    d.add_argument("--prompt-set", default="sharegpt", choices=list(DISTILL_PROMPT_SETS),
                   help="sharegpt: first human turns through the chat template (instruct models); passages: "
                        "plain-text openings of ShareGPT answers to continue (base models such as gemma3-270m); "
                        "either way the held-out prompts are those of the deduplicated split (README, \"Held-out "
                        "data\"), and prompts that duplicate a benchmark prompt are never answered (default: sharegpt)")
    d.add_argument("--corpus-only", action="store_true",
                   help="stop after the token-id corpus (skip caching hidden states)")
    d.add_argument("--max-new-tokens", type=int, default=192, help="answer length cap (default: 192)")
    d.add_argument("--batch-size", type=int, default=32, help="generation batch (default: 32; hundreds on a GPU)")
    d.add_argument("--device", default="cpu",
                   help="where the answers are generated: cpu (the backbone as loaded) or cuda (an fp32 copy of "
                        "it on the GPU); the hidden-state cache is always made on the CPU (default: cpu)")
    d.add_argument("--teacher-forced", type=int, default=0,
                   help="also cache N teacher-forced ShareGPT answers (default: 0)")
    d.set_defaults(func=cmd_distill)

    t = sub.add_parser(
        "train", help="train a drafter (EAGLE-3 by default), CLP and the gates for one k",
        description="The default design (--design eagle3): the EAGLE-3 drafter trained on token sequences "
                    "(the self-distilled corpus of `clp distill` and the training split of ShareGPT's "
                    "conversations, every answer with its earlier turns as context) whose targets the frozen "
                    "backbone computes on the fly, unrolled k steps (training-time test), then CLP and the gates "
                    "on its own drafts over held-back self-distilled answers. --design chain trains the chain (the "
                    "shipped drafters' design) the same way; --init DIR starts from a drafter folder, e.g. "
                    "to fine-tune a shipped one. Checkpoints every 25 steps; rerun to "
                    "resume; --minutes bounds the run. Runs on CPU or CUDA (--device), and data-parallel "
                    "under `accelerate launch`. --design fused|residual trains independent MTP heads (the "
                    "earlier baseline) on cached hidden states (`clp distill`), with the head-competition "
                    "ablation heads. Writes a heads folder (config.json + model.safetensors).")
    add_model_args(t, numerics=True)
    t.add_argument("--k", type=int, default=4, help="horizon: draft steps / heads (default: 4)")
    t.add_argument("--design", default="eagle3", choices=["eagle3", "chain", "fused", "residual"],
                   help="drafter design: eagle3 (three layers' states), chain (the last state, the shipped "
                        "drafters' design), fused|residual (independent heads on cached states) (default: eagle3)")
    t.add_argument("--aux-layers", default=None, metavar="A,B,C",
                   help="eagle3: the three backbone layers whose inputs the drafter fuses, e.g. 27,27,27 for the "
                        "high layer alone (an ablation) (default: 2, L/2, L-3 as vLLM and llama.cpp)")
    t.add_argument("--chain-mlp", type=int, default=None, metavar="N",
                   help="chain: the width of its MLP, e.g. 1024 for Gemma 3 270M's shipped chain (a smaller file "
                        "for a wide backbone) (default: the backbone's)")
    t.add_argument("--init", default=None, metavar="DIR",
                   help="eagle3/chain: start from this drafter folder (same design and k; its draft vocabulary "
                        "is kept), e.g. to fine-tune a shipped drafter on more data (default: from scratch)")
    t.add_argument("--lr", type=float, default=None,
                   help="eagle3/chain: AdamW peak learning rate (default: 1e-3; lower it to fine-tune)")
    t.add_argument("--minutes", type=float, default=0.0,
                   help="eagle3/chain: stop the drafter's training after this many minutes and go on to CLP and the "
                        "gates (0: all --steps); a rerun resumes (default: 0)")
    t.add_argument("--conversations", type=int, default=None,
                   help="eagle3/chain: ShareGPT conversations to train on, teacher-forced; 0: only the self-distilled "
                        "corpus (default: all of the training split)")
    t.add_argument("--sequences", default=None, metavar="FILE",
                   help="eagle3/chain: teacher-forced sequences already tokenised (an .npz of token ids and the "
                        "mask of trained positions, written by `clp sequences`) in place of ShareGPT's "
                        "conversations, e.g. on a machine without the ShareGPT package (default: none)")
    _add_sequence_args(t, "eagle3/chain: ")
    t.add_argument("--batch-sequences", type=int, default=4, help="eagle3/chain: sequences per step (default: 4)")
    t.add_argument("--corpus", default=None,
                   help="eagle3/chain: self-distilled corpus (default: the one `clp distill` wrote in "
                        "<cache>/corpus/<backbone>, else the one shipped for the backbone)")
    t.add_argument("--device", default="cpu",
                   help="eagle3/chain: where the drafter trains and the frozen backbone computes its targets: cpu "
                        "(the backbone as loaded, one sequence at a time) or cuda (an fp32 copy of the backbone on "
                        "the GPU, the whole batch at once; raise --batch-sequences there, e.g. 32; under "
                        "`accelerate launch` each process takes its own GPU) (default: cpu)")
    t.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size, 0 = all (default: 8192)")
    t.add_argument("--steps", type=int, default=3000, help="head optimiser steps (default: 3000)")
    t.add_argument("--predictor-steps", type=int, default=None,
                   help="CLP / gate steps (default: 800 for eagle3/chain, 1500 for fused|residual)")
    t.add_argument("--batch-size", type=int, default=256, help="positions per step (default: 256)")
    t.add_argument("--no-competing", action="store_true",
                   help="skip the competing-ablation heads (`clp bench`'s competing row; a bundle from --init keeps "
                        "its own)")
    t.add_argument("--competing-steps", type=int, default=None,
                   help="optimiser steps of the competing heads (default: 800 for eagle3/chain, on the predictor "
                        "share's states; half of --steps for fused|residual)")
    t.add_argument("--features", default=None, help="hidden-state cache (default: <cache>/features/<backbone>)")
    t.add_argument("--sources", default="all", choices=["all", "distilled", "teacher"],
                   help="head training data: self-distilled answers, teacher-forced ShareGPT, or both (default: all)")
    t.add_argument("--out", required=True, help="output heads folder")
    t.add_argument("--work", default=None, help="checkpoint folder (default: beside --out)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    q = sub.add_parser(
        "sequences", help="tokenise ShareGPT's training answers into a file for `clp train --sequences`",
        description="Write the teacher-forced data `clp train --design eagle3|chain` reads from ShareGPT's package "
                    "(the deduplicated training split, one sequence per answer with its earlier turns as context, "
                    "through the backbone's chat template; a base model reads each answer as plain text) to one "
                    "compressed .npz of token ids and trained-position masks, written atomically, so that a "
                    "machine without the ShareGPT package (a GPU box) trains on the same data: `clp train "
                    "--sequences FILE`. The self-distilled corpus is not included (`clp train` reads it from "
                    "--corpus). Prints what it wrote as JSON.")
    add_model_args(q, numerics=False)
    q.add_argument("--out", required=True, metavar="FILE.npz", help="the sequences file to write")
    q.add_argument("--conversations", type=int, default=None,
                   help="ShareGPT conversations to read (default: all of the training split)")
    _add_sequence_args(q)
    q.set_defaults(func=cmd_sequences)
