"""Turn the weights a `scripts/device_train.py` run brought back into shipped drafter bundles.

    python scripts/assemble_drafter.py --run .gpu/run1 [--variant attn_soft_feat]

Writes src/clpdecode/assets/drafters/<backbone>/k<k> for each k the run trained CLP for
(2 and 4 by default): the chain (its k set to k), the CLP and gates trained on its accepted
lengths for that k, and the competing-ablation heads, copied from the independent-heads
bundle of the same k (they do not depend on the drafter), else the ones the run trained
(`device_train.py --competing-steps`; `--model gemma3-270m` ships k2 this way). The
independent heads stay shipped as the baseline in independent-k2/-k4.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="folder with report.json, chain-*.safetensors, predictors.safetensors")
    ap.add_argument("--variant", default="attn_soft_feat")
    ap.add_argument("--model", default="embedded")
    args = ap.parse_args()
    from clpdecode.backbone import load_backbone
    from clpdecode.heads.artifacts import Drafter, load_drafter, loaded_tensors, save_drafter, shipped_drafter_dir
    from clpdecode.heads.chained import ChainConfig, ChainedHeads
    from clpdecode.heads.modules import HeadsConfig, MTPHeads
    from clpdecode.predictors.modules import CLP, Gates, PredictorConfig

    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    variant = report["variants"][args.variant]
    state = loaded_tensors(load_file(str(run / f"chain-{args.variant}.safetensors")))
    pred = loaded_tensors(load_file(str(run / "predictors.safetensors")))
    backbone = load_backbone(args.model)
    trained_competing = None
    if "competing" in report:  # trained in the run (a backbone without independent heads)
        trained_competing = MTPHeads(HeadsConfig(**report["competing"]["heads"]))
        part = {n[len("competing."):]: t for n, t in pred.items() if n.startswith("competing.")}
        trained_competing.set_draft_vocab(part["draft_ids"])
        trained_competing.load_state_dict(part)
    for k in sorted(int(name[1:]) for name in report["predictors"]):
        chain = ChainedHeads(ChainConfig(**{**variant["chain"], "k": k}))
        chain.set_draft_vocab(state["draft_ids"])
        chain.load_state_dict(state)
        pc = PredictorConfig(k=k, hidden_size=chain.cfg.hidden_size)
        clp, gates = CLP(pc), Gates(pc)
        clp.load_state_dict({n[len(f"k{k}.clp."):]: t for n, t in pred.items() if n.startswith(f"k{k}.clp.")})
        gates.load_state_dict({n[len(f"k{k}.gates."):]: t for n, t in pred.items() if n.startswith(f"k{k}.gates.")})
        baseline = shipped_drafter_dir(backbone.name, k, baseline=True)
        competing = load_drafter(baseline).competing if baseline else trained_competing
        heldout = dict(variant["heldout"])
        for key in ("head_top1", "head_top5", "chain_accept"):  # per-depth lists: the first k
            heldout[key] = heldout[key][:k]
        heldout["mean_accepted"] = round(sum(heldout["chain_accept"]), 4)
        heldout["k"] = k
        training = {"heads": heldout, "variant": args.variant, "device": report.get("device"),
                    "data": report["data"], "train": variant["train"], "loss": variant["loss"],
                    "predictors": report.get("predictors", {}).get(f"k{k}"),
                    "command": "scripts/device_pack.py + scripts/device_train.py (see README: Training)"}
        drafter = Drafter(heads=chain, clp=clp, gates=gates, competing=competing, meta={"training": training})
        out = shipped_drafter_dir(backbone.name, k, create=True)
        save_drafter(drafter, out, backbone)
        print(f"wrote {out}: chain {chain.num_params} params, held-out {heldout}")


if __name__ == "__main__":
    main()
