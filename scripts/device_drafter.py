"""The drafter's training run on a device machine: the package's one training path, wrapped.

A device machine has torch, transformers and accelerate but neither the embedded GGUF's
package nor ShareGPT's, and one call carries at most 64 MiB. So this script only unpacks
and packs around the package's own functions, the ones `clp distill` and `clp train` run:

1. rebuild the backbone as a transformers folder from the GGUF blocks and tokenizer that
   `scripts/device_pack.py --drafter-data` wrote (or take --model DIR as it is);
2. self-distil: `corpus.greedy_answers` on the GPU (Backbone.fp32_model) for the packed
   training-split ShareGPT prompts, under a time budget, each batch kept in --out
   (answers.npz: the compact token ids to commit as the corpus);
3. train: `training.data.drafter_sequences` on those answers and the packed teacher-forced
   conversations (every human turn in context) through `training.drafter.train_drafter`
   (the backbone's targets batched on the GPU), then CLP and the gates;
4. write the bundle into --out, its weights split into parts under the 16 MiB a returned file
   may have; `--assemble RUN --out DIR` rejoins them here into a drafter folder.

    # here
    python scripts/device_pack.py --drafter-data --out .gpu --sd-prompts 8000
    # on the device (PYTHONPATH=src; the two weight halves travel in two calls, or carried)
    python3 scripts/device_drafter.py --weights .gpu/w0 .gpu/w1 --data .gpu --out $OUT \
        --design chain --k 4 --device cuda --distil-seconds 150 --minutes 4 --batch-sequences 32
    # here
    python scripts/device_drafter.py --assemble RUN --out my-drafter
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

PART_BYTES = 15 * 2**20  # a returned file holds at most 16 MiB


def log(*a) -> None:
    print("device_drafter:", *a, file=sys.stderr, flush=True)


def rebuild_backbone(weights: list[str], data: Path, folder: Path) -> Path:
    """A transformers folder (config, tokenizer, fp32 safetensors) from the packed GGUF blocks,
    dequantised as gguf-py does (device_pack.load_packed)."""
    from device_pack import packed_model

    src = data / "backbone"
    folder.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, folder / f.name)
    model, missing, unexpected = packed_model(weights, src / "config.json")
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise SystemExit(f"packed weights do not fit the config: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(folder)
    return folder


def distil(backbone, data: Path, out: Path, budget_s: float, batch: int, max_new: int, device: str) -> list[dict]:
    """Greedy answers to the packed prompts until the budget is spent; answers.npz in `out`
    is rewritten after every batch, so a rerun (or a run cut short) keeps what was done."""
    from clpdecode.corpus import greedy_answers
    from clpdecode.training.data import flat_ids

    with np.load(data / "prompts.npz") as z:
        ids, off, meta = z["ids"].astype(np.int64), z["off"], z["meta"]  # meta: (i, record) per prompt
    prompts = [ids[a:b].tolist() for a, b in zip(off[:-1], off[1:])]
    done = {}
    path = out / "answers.npz"
    if path.exists():
        with np.load(path) as z:
            for n, a, b in zip(z["prompt"], z["off"][:-1], z["off"][1:]):
                done[int(n)] = z["ids"][a:b].tolist()
    todo = [n for n in range(len(prompts)) if n not in done]
    t0 = time.time()
    for answers in greedy_answers(backbone, [prompts[n] for n in todo], max_new, batch, desc="distill on device",
                                  device=device):
        for j, ans in answers:
            done[todo[j]] = ans
        keys = sorted(done)
        flat, flat_off = flat_ids([done[n] for n in keys])
        np.savez(path, prompt=np.asarray(keys, np.int64), meta=meta[keys], ids=flat, off=flat_off)
        if time.time() - t0 > budget_s:
            break
    log(f"distilled {len(done)} of {len(prompts)} prompts ({sum(map(len, done.values()))} answer tokens)")
    # Every packed prompt is of ShareGPT's training split (device_pack chose them so).
    return [{"i": int(meta[n][0]), "record": int(meta[n][1]), "split": "train", "prompt": prompts[n],
             "answer": done[n]} for n in sorted(done)]


def split_bundle(folder: Path, out: Path) -> None:
    """The bundle's tensors in parts of at most PART_BYTES, beside its config.json."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "config.json", out / "config.json")
    part, size, n = {}, 0, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if part and size + nbytes > PART_BYTES:
            save_file(part, str(out / f"part-{n}.safetensors"))
            part, size, n = {}, 0, n + 1
        part[name], size = t.contiguous(), size + nbytes
    save_file(part, str(out / f"part-{n}.safetensors"))


def assemble(run: Path, out: Path) -> None:
    """Rejoin split_bundle's parts into a drafter folder (config.json + model.safetensors)."""
    from safetensors.torch import load_file, save_file

    from clpdecode.atomic import atomic_folder

    parts = sorted(run.glob("drafter/part-*.safetensors"))
    if not parts:
        raise SystemExit(f"no drafter/part-*.safetensors in {run}")
    tensors = {}
    for p in parts:
        tensors.update(load_file(str(p)))
    with atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        shutil.copy(run / "drafter" / "config.json", tmp / "config.json")
    log(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="*", default=[], help="packed GGUF block folders (device_pack.py's w0 w1)")
    ap.add_argument("--model", default=None, help="a transformers folder to use as it is instead of --weights")
    ap.add_argument("--data", type=Path, default=Path(".gpu"), help="device_pack.py --drafter-data's folder")
    ap.add_argument("--out", type=Path, required=True, help="results: answers.npz, drafter/, report.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clp-drafter-work"), help="checkpoints (rerun resumes)")
    ap.add_argument("--assemble", type=Path, default=None, metavar="RUN",
                    help="here, after the run: rejoin RUN/drafter's parts into the drafter folder --out")
    ap.add_argument("--design", default="chain", choices=["chain", "eagle3"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--distil-seconds", type=float, default=150.0, help="self-distillation budget (0: none)")
    ap.add_argument("--distil-batch", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=4.0, help="the drafter's training budget (0: all --steps)")
    ap.add_argument("--batch-sequences", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    args = ap.parse_args()
    if args.assemble:
        assemble(args.assemble, args.out)
        return 0

    from clpdecode.backbone import load_backbone
    from clpdecode.heads.artifacts import save_drafter
    from clpdecode.training.data import drafter_sequences
    from clpdecode.training.drafter import DrafterTrainConfig, train_drafter

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model:
        folder = Path(args.model)
    else:
        name = json.loads((args.data / "backbone" / "name.json").read_text())["name"]
        folder = rebuild_backbone(args.weights, args.data, Path("/tmp/clp-backbone") / name)
    backbone = load_backbone(str(folder), numerics="fp32")
    log(f"backbone {backbone.name} ready after {time.time() - t0:.0f} s")
    records = distil(backbone, args.data, args.out, args.distil_seconds, args.distil_batch, args.max_new_tokens,
                     args.device) if args.distil_seconds > 0 else []
    cfg = DrafterTrainConfig(design=args.design, k=args.k, draft_vocab=args.draft_vocab, steps=args.steps,
                             minutes=args.minutes, batch_sequences=args.batch_sequences, max_len=args.max_len,
                             lr=args.lr, device=args.device)
    train, pred = drafter_sequences(backbone, records, args.max_len, predictor_share=cfg.predictor_share,
                                    seed=cfg.seed, sequences=args.data / "sequences.npz")
    log(f"{len(train)} training sequences ({sum(len(i) for i, _ in train)} tokens), {len(pred)} for CLP and gates")
    drafter, report = train_drafter(backbone, train, pred, cfg, args.work)
    report["wall_seconds"] = round(time.time() - t0, 1)
    report["distilled_answers"] = len(records)
    save_drafter(drafter, args.work / "bundle", backbone)
    split_bundle(args.work / "bundle", args.out / "drafter")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("drafter_steps", "sequences_seen", "distilled_answers",
                                             "wall_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
