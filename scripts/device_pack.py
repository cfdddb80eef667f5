"""Pack what the GPU drafter run (scripts/device_drafter.py) needs into files small enough to
send to a device machine.

The device machine has torch and transformers but no `gguf` package, no ShareGPT package
and a 64 MiB limit on what one call carries. So:

- the embedded GGUF's tensors are written as their raw quantised blocks (Q8_0 / Q4_1 /
  F32, 96.6 MB in all), q/k rows already in transformers' order, split in two parts sent by
  two calls; `load_packed` dequantises them there with the package's own GGUF reader
  (backbone/gguf.py), exactly as gguf-py does (`--check` compares them with transformers'
  own GGUF loader: bit-identical);
- with --drafter-data, the backbone's config and tokenizer, the training-split ShareGPT
  prompts to self-distil (prompts.npz, chosen as `clp distill` chooses them) and every
  training-split answer with its earlier turns as context (sequences.npz, as `clp sequences`
  writes them): only records that the held-out rule lets train (datasets.sharegpt_split).

    python scripts/device_pack.py --drafter-data --out .gpu --sd-prompts 8000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def pack_weights(gguf_path: Path, cfg: dict, out: Path, parts: int = 2) -> list[Path]:
    """The GGUF's tensors as their raw blocks (backbone/gguf.py reads them: q/k rows already in
    transformers' order), under their Hugging Face names, in `parts` weights.npz files."""
    from clpdecode.backbone.gguf import GGUFFile, hf_name

    f = GGUFFile(gguf_path, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    items = []
    for name in f.tensors:
        kind, shape, raw = f.read(name)
        items.append((hf_name(name), kind, list(shape), np.ascontiguousarray(raw)))
    total = sum(a.nbytes for *_, a in items)
    files, cur, size, n = [], {}, 0, 0
    for name, kind, shape, arr in items:
        cur[f"{kind}|{'x'.join(map(str, shape))}|{name}"] = arr
        size += arr.nbytes
        if size >= total / parts and n < parts - 1:
            files.append(_save(out / f"w{n}", cur))
            cur, size, n = {}, 0, n + 1
    files.append(_save(out / f"w{n}", cur))
    return files


def _save(folder: Path, arrays: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "weights.npz", **arrays)
    return folder


def dequantize(kind: str, shape: list[int], raw: np.ndarray):
    """A packed tensor in fp32, as the package reads the same blocks (gguf.py's decoders, quant.py's
    weights): bit for bit what gguf-py and transformers' GGUF loader compute."""
    import torch

    from clpdecode.backbone.gguf import DECODERS
    from clpdecode.backbone.quant import from_blocks

    if kind == "F32":
        return torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
    if kind not in DECODERS:
        raise ValueError(f"packed tensor type {kind} is not read here")
    return from_blocks(DECODERS[kind](raw.reshape(shape[0], -1), shape[1])).dequantize().reshape(shape)


def load_packed(folders: list[Path]) -> dict:
    state = {}
    for f in folders:
        with np.load(Path(f) / "weights.npz") as z:
            for key in z.files:
                kind, shape, name = key.split("|")
                state[name] = dequantize(kind, [int(x) for x in shape.split("x")], z[key])
    return state


def packed_model(weight_dirs, config_path):
    """The fp32 transformers model of `config_path` with the packed blocks' weights (tied
    embeddings), and load_state_dict's (missing, unexpected) names for the caller to judge."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in json.loads(Path(config_path).read_text()).items()
                                  if k not in ("transformers_version",)})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_packed([Path(w) for w in weight_dirs]), strict=False)
    model.tie_weights()
    return model, missing, unexpected


def pack_drafter_data(backbone, out: Path, n_prompts: int, max_len: int = 384) -> dict:
    """What scripts/device_drafter.py reads beside the weights: the backbone's config and
    tokenizer (backbone/), the training-split ShareGPT prompts to self-distil (prompts.npz,
    chosen as `clp distill` chooses them) and every answer of the training-split
    conversations with its earlier turns as context (sequences.npz, as `clp sequences` writes
    them)."""
    import shutil

    from clpdecode.training.data import flat_ids, write_sequences
    from clpdecode.training.distill import DistillConfig, _select_prompts

    folder = Path(backbone.source)  # the transformers folder it was loaded from (converted from the GGUF)
    dest = out / "backbone"
    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith((".", "clp_")):
            shutil.copy(f, dest / f.name)
    (dest / "name.json").write_text(json.dumps({"name": backbone.name}))
    chosen = [c for c in _select_prompts(backbone, DistillConfig(n_prompts=n_prompts)) if c[2] == "train"]
    ids, off = flat_ids([c[3] for c in chosen])
    np.savez_compressed(out / "prompts.npz", ids=ids, off=off,
                        meta=np.asarray([(c[0], c[1]) for c in chosen], np.int64).reshape(-1, 2))
    seqs = write_sequences(backbone, out / "sequences.npz", max_len=max_len)  # as `clp sequences` writes them
    return {"prompts": len(chosen), "answers": seqs["sequences"], "answer_tokens": seqs["tokens"],
            "trained_tokens": seqs["trained_tokens"],
            "sizes": {f.name: f.stat().st_size for f in (out / "prompts.npz", out / "sequences.npz")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--sd-prompts", type=int, default=12000, help="training-split prompts to self-distil")
    ap.add_argument("--drafter-data", action="store_true",
                    help="also pack the backbone's config and tokenizer, --sd-prompts training-split prompts and "
                         "every training conversation (without it: the weights only)")
    ap.add_argument("--check", action="store_true", help="compare dequantised weights with transformers'")
    args = ap.parse_args()
    from clpdecode.backbone import load_backbone
    from clpdecode.backbone.loading import embedded_gguf_path

    out = Path(args.out)
    bb = load_backbone("embedded", numerics="fp32")  # fp32: the reference --check compares with
    cfg = bb.model.config.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    folders = pack_weights(embedded_gguf_path(), cfg, out)
    print("weights:", [(str(f), (f / "weights.npz").stat().st_size) for f in folders])
    if args.check:
        import torch

        state = load_packed(folders)
        ref = bb.model.state_dict()
        bad = [k for k, v in state.items() if not torch.equal(v, ref[k])]
        print("dequantised tensors:", len(state), "differing from transformers':", bad[:5], len(bad))
    if args.drafter_data:
        print("drafter data:", pack_drafter_data(bb, out, args.sd_prompts))


if __name__ == "__main__":
    main()
