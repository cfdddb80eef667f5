"""Score drafter training checkpoints on fresh answers, as `clp eval-heads --prompts` does.

`clp train` writes the drafter's checkpoint (work/drafter.pt) every 25 steps, but a bundle only
at the end. To follow a run (or compare runs) on prompts no training saw, copy checkpoints
aside and score them here: each one's weights go into the bundle it started from (--init) or
the shipped drafter of that k, and it is scored on the backbone's greedy 128-token answers
(cached by `clp eval-heads`) with heads/accuracy.py's metric. The backbone's states of the
answers are computed once for all checkpoints.

    python scripts/score_checkpoints.py --k 4 --prompts mtbench sharegpt-heldout --limit 80 \\
        base build/drafters/chain-ft/drafter-step200.pt

"base" scores the bundle itself. `--full-vocab` lets a chain propose any token (its head is the
backbone's frozen LM head: only the rows change) instead of its 8,192-token draft vocabulary.
One JSON line per checkpoint on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clpdecode.backbone import load_backbone  # noqa: E402
from clpdecode.evaluation.answers import prompt_answers  # noqa: E402
from clpdecode.evaluation.prompts import load_prompts  # noqa: E402
from clpdecode.heads import default_drafter  # noqa: E402
from clpdecode.heads.accuracy import heldout_accuracy, heldout_states  # noqa: E402
from clpdecode.heads.chained import ChainedHeads  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help='drafter.pt files of `clp train` work folders, or "base"')
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--heads", default=None, help="the bundle the checkpoints started from (default: shipped)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", nargs="+", default=["mtbench", "sharegpt-heldout"])
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--full-vocab", action="store_true",
                    help="a chain drafts over the whole vocabulary (its head is the backbone's LM head)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(args.model)
    heads = default_drafter(bb, k=args.k, folder=args.heads).heads
    chain = isinstance(heads, ChainedHeads)
    if args.full_vocab and not chain:
        raise SystemExit("--full-vocab: only a chain's head is the backbone's LM head")
    embed = bb.model.get_input_embeddings().weight.detach().float()
    base = {k: v.clone() for k, v in heads.state_dict().items()}
    aux = getattr(heads, "aux_layers", ())
    states = {}
    for name in args.prompts:
        recs, _ = prompt_answers(bb, load_prompts(name, args.limit), 128, batch_size=16)
        states[name] = heldout_states(bb, recs, aux_layers=aux)
    for ck in args.checkpoints:
        step, state = 0, base
        if ck != "base":
            st = torch.load(ck, weights_only=False, map_location="cpu")
            step, state = st["step"], st["module"]
        heads.set_draft_vocab(state["draft_ids"])  # sized by the state, so set before loading
        heads.load_state_dict(state)
        if args.full_vocab:
            heads.set_draft_vocab(torch.arange(bb.info.vocab_size))
        if chain:  # a chain's head is the LM-head rows of its draft vocabulary
            heads.attach(bb.lm_head_weight, embed)
        row = {"checkpoint": ck, "step": step, "draft_vocab": int(heads.draft_ids.numel())}
        for name, st in states.items():
            r = heldout_accuracy(heads, bb, st, args.k)
            row[name] = {"mean_accepted": r["mean_accepted"], "t+2_top1": r["head_top1"][0], "tokens": r["tokens"]}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
