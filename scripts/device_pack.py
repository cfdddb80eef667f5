"""Pack what the GPU drafter run needs into files small enough to send to a device machine.

The device machine has torch and transformers but no `gguf` package, no ShareGPT package
and a 64 MiB limit on what one call carries. So:

- the embedded GGUF's tensors are written as their raw quantised blocks (Q8_0 / Q4_1 /
  F32, 96.6 MB in all), q/k rows already un-permuted into transformers' layout, split in
  two parts sent by two calls; `load_packed` dequantises them there with the package's own
  GGUF reader (backbone/gguf.py), exactly as gguf-py does (`--check` compares them with
  transformers' own GGUF loader: bit-identical);
- the token data: ShareGPT prompts to self-distil on the GPU, teacher-forced ShareGPT
  conversations, and the committed corpus's held-out answers, as token-id arrays.

With ``--model gemma3-270m`` (any backbone other than the embedded one) nothing is packed
but tokens: the committed passages corpus (already self-distilled on CPU) and plain-text
teacher-forced answers, for `device_train.py --device cpu --model gemma3-270m`.

Only ShareGPT records that the held-out rule lets train (datasets.sharegpt_split: held-out
clusters and duplicates of benchmark prompts excluded) feed anything that trains; the
held-out answers are the committed corpus's, relabelled under the same rule.

    python scripts/device_pack.py --out .gpu
"""

from __future__ import annotations

import argparse
import json
import random
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


def pack_tokens(backbone, out: Path, n_sd: int, n_tf: int, max_prompt: int = 320, max_len: int = 640,
                seed: int = 0) -> dict:
    from clpdecode.corpus import read_corpus
    from clpdecode.datasets import opening_prompt, sharegpt_conversations, sharegpt_split
    from clpdecode.errors import ClpError

    tok = backbone.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rule = sharegpt_split("prompts")
    records = []  # (prompt number, human text, gpt text or None) of the records that may train
    idx = 0
    for r, rec in enumerate(sharegpt_conversations()):
        human = opening_prompt(rec)
        if human is None:
            continue
        turns = rec["conversations"]
        ans = turns[1].get("value") if len(turns) > 1 and turns[1].get("from") == "gpt" else None
        if rule.of_record(r) == "train":
            records.append((idx, human, ans))
        idx += 1
    train = records
    random.Random(seed).shuffle(train)
    sd_prompts, tf_seqs, tf_plen = [], [], []
    for i, human, _ in train:
        if len(sd_prompts) >= n_sd:
            break
        try:
            ids = backbone.encode_prompt(human)
        except ClpError:
            continue
        if len(ids) <= max_prompt:
            sd_prompts.append(ids)
    for i, human, ans in train:
        if len(tf_seqs) >= n_tf:
            break
        if not ans or not ans.strip():
            continue
        try:
            p = backbone.encode_prompt(human)
        except ClpError:
            continue
        if len(p) > max_prompt:
            continue
        a = tok(ans, add_special_tokens=False)["input_ids"] + [eos]
        seq = (p + a)[:max_len]
        if len(seq) - len(p) < 16:
            continue
        tf_seqs.append(seq)
        tf_plen.append(len(p))
    from clpdecode.corpus import corpus_dir

    held = [r for r in read_corpus(corpus_dir(backbone.name)) if r["split"] == "heldout"]
    ho_seqs = [r["prompt"] + r["answer"] for r in held]
    ho_plen = [len(r["prompt"]) for r in held]

    arrays = {}
    for name, seqs in (("sd_prompts", sd_prompts), ("tf", tf_seqs), ("heldout", ho_seqs)):
        arrays[f"{name}_ids"], arrays[f"{name}_off"] = flat(seqs)
    arrays["tf_plen"] = np.asarray(tf_plen, np.int32)
    arrays["heldout_plen"] = np.asarray(ho_plen, np.int32)
    out.mkdir(parents=True, exist_ok=True)
    # Two files, so that each of the two device calls carries one beside a weights part.
    tf_keys = ("tf_ids", "tf_off", "tf_plen")
    np.savez_compressed(out / "tf.npz", **{k: arrays[k] for k in tf_keys})
    np.savez_compressed(out / "tokens.npz", **{k: v for k, v in arrays.items() if k not in tf_keys})
    return {"sd_prompts": len(sd_prompts), "tf": len(tf_seqs), "tf_tokens": int(sum(map(len, tf_seqs))),
            "heldout": len(ho_seqs), "heldout_tokens": int(sum(len(r["answer"]) for r in held))}


def flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated token ids (uint32) and their offsets: the package's layout."""
    from clpdecode.training.data import flat_ids

    return flat_ids(seqs)


def pack_corpus_tokens(backbone, out: Path, n_tf: int, max_len: int = 192, seed: int = 0) -> dict:
    """Token data for a base model whose answers were self-distilled here (`clp distill
    --prompt-set passages`): the committed corpus's train split as ready answers (sd_answers:
    device_train then skips its own distillation), its held-out split, and teacher-forced
    plain-text ShareGPT answers (BOS + text, cut to max_len) from records the held-out rule lets train.

    Args:
        backbone: the loaded backbone (its name finds the corpus, its tokenizer encodes).
        out: folder for tokens.npz and tf.npz.
        n_tf: teacher-forced sequences to pack.
    Returns:
        Counts of what was packed.
    """
    from clpdecode.corpus import corpus_dir, read_corpus
    from clpdecode.datasets import sharegpt_conversations, sharegpt_split

    recs = read_corpus(corpus_dir(backbone.name))
    if not recs:
        raise SystemExit(f"no corpus for {backbone.name}: run `clp distill --prompt-set passages` first")
    train = [r for r in recs if r["split"] == "train" and len(r["answer"]) >= 2]
    held = [r for r in recs if r["split"] == "heldout"]
    texts = []
    rule = sharegpt_split("records")
    for i, rec in enumerate(sharegpt_conversations()):
        if rule.of_record(i) != "train":
            continue
        ans = next((t.get("value") for t in rec.get("conversations") or [] if t.get("from") == "gpt"), None)
        if isinstance(ans, str) and len(ans) > 400:
            texts.append(ans)
    random.Random(seed).shuffle(texts)
    tok = backbone.tokenizer
    tf = [ids[:max_len] for ids in (tok(t)["input_ids"] for t in texts[: 2 * n_tf]) if len(ids) >= 32][:n_tf]
    arrays = {}
    for name, seqs in (("sd_prompts", [r["prompt"] for r in train]), ("sd_answers", [r["answer"] for r in train]),
                       ("heldout", [r["prompt"] + r["answer"] for r in held]), ("tf", tf)):
        arrays[f"{name}_ids"], arrays[f"{name}_off"] = flat(seqs)
    arrays["heldout_plen"] = np.asarray([len(r["prompt"]) for r in held], np.int32)
    arrays["tf_plen"] = np.ones(len(tf), np.int32)  # every position after BOS is a target
    out.mkdir(parents=True, exist_ok=True)
    tf_keys = ("tf_ids", "tf_off", "tf_plen")
    np.savez_compressed(out / "tf.npz", **{k: arrays[k] for k in tf_keys})
    np.savez_compressed(out / "tokens.npz", **{k: v for k, v in arrays.items() if k not in tf_keys})
    return {"sd": len(train), "sd_tokens": int(sum(len(r["answer"]) for r in train)), "tf": len(tf),
            "tf_tokens": int(sum(map(len, tf))), "heldout": len(held),
            "heldout_tokens": int(sum(len(r["answer"]) for r in held))}


def pack_drafter_data(backbone, out: Path, n_prompts: int, max_len: int = 384) -> dict:
    """What scripts/device_drafter.py reads beside the weights: the backbone's config and
    tokenizer (backbone/), the training-split ShareGPT prompts to self-distil (prompts.npz,
    chosen as `clp distill` chooses them) and every answer of the training-split
    conversations with its earlier turns as context (sequences.npz, as `clp sequences` writes
    them)."""
    import shutil

    from clpdecode.training.data import write_sequences
    from clpdecode.training.distill import DistillConfig, _select_prompts

    folder = Path(backbone.source)  # the transformers folder it was loaded from (converted from the GGUF)
    dest = out / "backbone"
    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith((".", "clp_")):
            shutil.copy(f, dest / f.name)
    (dest / "name.json").write_text(json.dumps({"name": backbone.name}))
    chosen = [c for c in _select_prompts(backbone, DistillConfig(n_prompts=n_prompts)) if c[2] == "train"]
    ids, off = flat([c[3] for c in chosen])
    np.savez_compressed(out / "prompts.npz", ids=ids, off=off,
                        meta=np.asarray([(c[0], c[1]) for c in chosen], np.int64).reshape(-1, 2))
    seqs = write_sequences(backbone, out / "sequences.npz", max_len=max_len)  # as `clp sequences` writes them
    return {"prompts": len(chosen), "answers": seqs["sequences"], "answer_tokens": seqs["tokens"],
            "trained_tokens": seqs["trained_tokens"],
            "sizes": {f.name: f.stat().st_size for f in (out / "prompts.npz", out / "sequences.npz")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--model", default="embedded",
                    help="embedded: pack GGUF blocks + ShareGPT prompts to distil on the device; any other "
                         "backbone (gemma3-270m): pack its committed passages corpus for a CPU run "
                         "(device_train.py --model), no weights")
    ap.add_argument("--max-len", type=int, default=192, help="teacher-forced length cap for --model other than "
                    "embedded (default: 192)")
    ap.add_argument("--sd-prompts", type=int, default=12000)
    ap.add_argument("--tf", type=int, default=4000)
    ap.add_argument("--check", action="store_true", help="compare dequantised weights with transformers'")
    ap.add_argument("--skip-weights", action="store_true", help="only (re)write tokens.npz")
    ap.add_argument("--drafter-data", action="store_true",
                    help="pack for scripts/device_drafter.py (the package's training path): the backbone's config "
                         "and tokenizer, --sd-prompts training-split prompts, every training conversation")
    args = ap.parse_args()
    from clpdecode.backbone import load_backbone
    from clpdecode.backbone.loading import embedded_gguf_path

    out = Path(args.out)
    bb = load_backbone(args.model)
    cfg = bb.model.config.to_dict()
    (out).mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    if args.model != "embedded":
        print("tokens:", pack_corpus_tokens(bb, out, args.tf, args.max_len))
        return
    folders = [] if args.skip_weights else pack_weights(embedded_gguf_path(), cfg, out)
    print("weights:", [(str(f), (f / "weights.npz").stat().st_size) for f in folders])
    if args.drafter_data:
        print("drafter data:", pack_drafter_data(bb, out, args.sd_prompts))
        return
    if args.check and folders:
        import torch

        state = load_packed(folders)
        ref = bb.model.state_dict()
        bad = [k for k, v in state.items() if not torch.equal(v, ref[k])]
        print("dequantised tensors:", len(state), "differing from transformers':", bad[:5], len(bad))
    print("tokens:", pack_tokens(bb, out, args.sd_prompts, args.tf))


if __name__ == "__main__":
    main()
