"""Distil and train the chained drafter on a GPU, in one run, bringing back only weights.

Run on a device machine (torch + transformers there; no gguf, no network) with the files
that `scripts/device_pack.py` wrote:

    PYTHONPATH=src python3 scripts/device_train.py --weights /tmp/w0 .gpu/w1 --data .gpu --out $OUT

Phases, each under a wall-clock budget so the whole run fits a device lease:

1. rebuild the embedded backbone (fp32) from the packed GGUF blocks;
2. self-distil: greedy answers of the backbone to ShareGPT prompts, in large batches;
3. prefill every sequence (self-distilled + teacher-forced ShareGPT + held-out) in fp32
   (TF32 off), keeping the post-norm states in fp16 on the GPU;
4. train the chained drafter variants (time-budgeted each, cosine schedule over the
   budget), with soft targets recomputed from the cached states through the LM head;
5. CLP and gates (k = 2 and 4) on the chain's accepted lengths over a predictor split;
6. held-out acceptance of every variant; weights and report.json into --out.

On CPU, ``--model gemma3-270m`` (any backbone `clp` loads) replaces phases 1-2: the backbone
is loaded as `clp` loads it and the self-distilled answers come packed in tokens.npz
(`device_pack.py --model gemma3-270m`, from the committed corpus); ``--ks 2`` trains and
unrolls the chain for k = 2 only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))


def _bare_package(name: str, folder: Path) -> None:
    """Register a package without running its __init__ (which imports the CPU-only stack)."""
    import types

    mod = types.ModuleType(name)
    mod.__path__ = [str(folder)]
    sys.modules[name] = mod


for _name in ("clpdecode", "clpdecode.heads", "clpdecode.training", "clpdecode.predictors"):
    _bare_package(_name, ROOT / "src" / Path(*_name.split(".")))

from clpdecode.heads.accuracy import accuracy_counts, summarise  # noqa: E402
from clpdecode.heads.artifacts import stored_tensors  # noqa: E402
from clpdecode.heads.chained import ChainConfig, ChainedHeads  # noqa: E402
from clpdecode.predictors.modules import CLP, Gates, PredictorConfig  # noqa: E402
from clpdecode.training.chain import ChainLossConfig, chain_loss, chain_lengths  # noqa: E402
from clpdecode.training.train import clp_class_weights  # noqa: E402

T0 = time.time()


# The clock of the training budgets: wall time (a device lease), or this process's CPU time
# (--budget-clock process), which a CPU run sharing its machine, or paused, does not lose.
CLOCK = time.time


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def unflat(z, name):
    ids, off = z[f"{name}_ids"].astype(np.int64), z[f"{name}_off"]
    return [ids[off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)]


def build_backbone(weight_dirs, config_path, dev):
    from device_pack import packed_model

    model, missing, unexpected = packed_model(weight_dirs, config_path)
    log("backbone: missing", missing, "unexpected", unexpected)
    return model.to(dev).eval()


@torch.no_grad()
def self_distil(model, prompts, eos, budget_s, batch, max_new, dev, work: Path):
    """Greedy answers (TF32 on, as fast as possible); stops starting batches at the budget.

    Each batch is written to work/distil-NNNNN.json atomically; a rerun keeps those and
    continues with the next batch (same prompt order), so nothing is lost or repeated.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[b : b + batch] for b in range(0, len(order), batch)]
    out, t0, n_tok = [], time.time(), 0
    work.mkdir(parents=True, exist_ok=True)
    for n, idx in enumerate(batches):
        shard = work / f"distil-{n:05d}.json"
        if shard.exists():
            out.extend((prompts[i], a) for i, a in json.loads(shard.read_text()))
            continue
        if time.time() - t0 > budget_s:
            break
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=eos, eos_token_id=eos)
        answers = []
        for r, i in enumerate(idx):
            ans = gen[r, width:].tolist()
            if eos in ans:
                ans = ans[: ans.index(eos) + 1]
            n_tok += len(ans)
            out.append((prompts[i], ans))
            answers.append((i, ans))
        atomic_json(shard, answers)
        log(f"self-distil: {len(out)} answers, {n_tok} new tokens, {n_tok / (time.time() - t0):.0f} tok/s")
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


@torch.no_grad()
def prefill_all(model, seqs, plens, L, dev, batch=64):
    """fp32 post-norm states of every sequence, padded to L: (N, L, d) fp16, tokens, masks."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    N, d = len(seqs), model.config.hidden_size
    feats = torch.zeros(N, L, d, dtype=torch.float16, device=dev)
    tokens = torch.zeros(N, L, dtype=torch.long, device=dev)
    mask = torch.zeros(N, L, dtype=torch.bool, device=dev)  # p's next token is an answer token
    order = sorted(range(N), key=lambda i: len(seqs[i]))
    for b in range(0, N, batch):
        idx = order[b : b + batch]
        w = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), w, dtype=torch.long)
        am = torch.zeros(len(idx), w, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            am[r, : len(seqs[i])] = 1
        h = model.model(input_ids=ids.to(dev), attention_mask=am.to(dev)).last_hidden_state  # (b, w, d)
        for r, i in enumerate(idx):
            n = len(seqs[i])
            feats[i, :n] = h[r, :n].half()
            tokens[i, :n] = ids[r, :n].to(dev)
            mask[i, plens[i] - 1 : n - 1] = True
    return feats, tokens, mask


def cached_prefill(model, train, heldout, args, dev, work: Path):
    """prefill_all of the training and held-out sequences, kept in work/states.pt on CPU runs
    so that a resumed run does not prefill again (the file is checked against the inputs).

    Returns:
        feats, tokens, mask of the training sequences and the held-out triple.
    """
    key = {"train": train, "heldout": heldout, "max_len": args.max_len, "model": args.model}
    path = work / "states.pt"
    if dev.type == "cpu" and path.exists():
        st = torch.load(path, weights_only=False)
        if st["key"] == key:
            log("prefill: states loaded from", path)
            return (*st["train"], st["heldout"])
    out = prefill_all(model, *train, args.max_len, dev)
    ho = prefill_all(model, *heldout, args.max_len, dev)
    if dev.type == "cpu":
        tmp = path.with_suffix(".tmp")
        torch.save({"key": key, "train": out, "heldout": ho}, tmp)
        tmp.replace(path)
    return (*out, ho)


def train_variant(name, ccfg, lcfg, data, embed, lm_head, draft_ids, budget_s, dev, batch, ckpt: Path,
                  lr=1e-3, seed=0, checkpoint_s=120.0):
    """Train one chain for `budget_s` seconds of its own (cosine schedule over the budget).

    Checkpoints (atomically) every `checkpoint_s` seconds and at the end; a rerun resumes
    from the checkpoint with the time already spent counted.
    """
    torch.manual_seed(seed)
    chain = ChainedHeads(ccfg).to(dev)
    chain.set_draft_vocab(draft_ids.to(dev))
    chain.attach(lm_head, embed)
    feats, tokens, mask, rows = data
    opt = torch.optim.AdamW(chain.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    spent, step, ema, seen = 0.0, 0, None, 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if ckpt.exists():
        st = torch.load(ckpt, map_location=dev, weights_only=False)
        chain.load_state_dict(st["chain"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        spent, step, seen = st["spent"], st["step"], st["seen"]
        log(f"{name}: resumed at step {step} ({spent:.0f} s spent)")

    def save_ckpt():
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"chain": chain.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "spent": spent + CLOCK() - t0, "step": step, "seen": seen}, tmp)
        tmp.replace(ckpt)

    t0, last_save = CLOCK(), time.time()
    while True:
        frac = (spent + CLOCK() - t0) / budget_s
        if frac >= 1:
            break
        if time.time() - last_save > checkpoint_s:
            save_ckpt()
            last_save = time.time()
        warm = min(1.0, (step + 1) / 100)
        for gr in opt.param_groups:
            gr["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = rows[torch.randint(len(rows), (batch,), generator=gen)].to(dev)
        m = mask[idx]
        width = int(m.any(0).nonzero().max()) + 2
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, st = chain_loss(chain, feats[idx, :width], tokens[idx, :width], m[:, :width], embed, lcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(chain.parameters(), 1.0)
        opt.step()
        step += 1
        seen += int(m.sum())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 200 == 0:
            log(f"{name}: step {step} loss {ema:.3f} top1 {[round(x, 3) for x in st['top1']]} positions {seen}")
    save_ckpt()
    log(f"{name}: done, {step} steps, {seen} positions seen")
    return chain.eval(), {"steps": step, "positions_seen": seen, "budget_s": budget_s}


@torch.no_grad()
def evaluate(chain, data, embed, steps, chunk=64):
    feats, tokens, mask = data
    counts = [accuracy_counts(chain, feats[b : b + chunk], tokens[b : b + chunk], mask[b : b + chunk], embed, steps)
              for b in range(0, len(feats), chunk)]
    return summarise(counts, steps, chain.cfg.design)


def train_predictors(chain, pdata, embed, lm_head, k, dev, steps=1500, batch=512, lr=3e-3, alpha=0.5, warmup=0.3):
    """CLP (weighted, ramped) and gates on the chain's accepted lengths at the predictor split."""
    feats, tokens, mask = pdata
    H, LAB, COR = [], [], []
    for b in range(0, len(feats), 64):
        f, t, m = feats[b : b + 64], tokens[b : b + 64], mask[b : b + 64]
        lengths, correct = chain_lengths(chain, f, t, m, embed, lm_head, k)
        H.append(f[m].float())
        LAB.append(lengths[m])
        COR.append(correct[m])
    h, lab, cor = torch.cat(H), torch.cat(LAB), torch.cat(COR).float()
    pc = PredictorConfig(k=k, hidden_size=h.shape[1])
    clp, gates = CLP(pc).to(dev), Gates(pc).to(dev)
    final_w = clp_class_weights(lab, k, alpha).to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    for mod, kind in ((clp, "clp"), (gates, "gates")):
        opt = torch.optim.AdamW(mod.parameters(), lr=lr)
        for step in range(steps):
            frac = step / steps
            for gr in opt.param_groups:
                gr["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            idx = torch.randint(len(h), (batch,), generator=g).to(dev)
            if kind == "clp":
                ramp = min(1.0, step / max(1, int(warmup * steps)))
                w = 1 + ramp * (final_w - 1)
                loss = F.cross_entropy(clp(h[idx]), lab[idx], weight=w)
            else:
                loss = F.binary_cross_entropy_with_logits(gates(h[idx]), cor[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clp.eval(), gates.eval(), {"label_counts": torch.bincount(lab, minlength=k + 1).tolist(),
                                      "alpha": alpha, "positions": int(len(h))}


def train_competing(data, lm_head, draft_ids, k, dev, steps, batch=256, lr=1e-3, seed=0):
    """The head-competition ablation for a backbone without independent heads to copy them
    from: k residual heads, head i predicting t+i from f_t (offset 1), hard cross-entropy.

    Args:
        data: (feats, tokens, mask, rows): rows should be self-distilled sequences, whose
            text is the backbone's greedy continuation (so token p+i is the target).
        lm_head: (V, d) the frozen LM head; draft_ids: its rows the heads may propose.
        steps: optimiser steps of `batch` positions.
    Returns:
        (heads, info) with the heads in eval mode.
    """
    from clpdecode.heads.modules import HeadsConfig, MTPHeads

    feats, tokens, mask, rows = data
    cfg = HeadsConfig(k=k, hidden_size=feats.shape[-1], design="residual", offset=1, draft_vocab=len(draft_ids))
    torch.manual_seed(seed)
    heads = MTPHeads(cfg).to(dev)
    heads.set_draft_vocab(draft_ids.to(dev))
    heads.attach(lm_head)
    lut = torch.full((lm_head.shape[0],), -100, dtype=torch.long, device=dev)
    lut[draft_ids.to(dev)] = torch.arange(len(draft_ids), device=dev)
    L = tokens.shape[1]
    seq, pos = mask[rows].nonzero(as_tuple=True)
    seq = rows.to(dev)[seq]
    targets = torch.full((len(seq), k), -100, dtype=torch.long, device=dev)
    for i in range(1, k + 1):  # head i's target x_{p+i} exists while p+i-1 still predicts answer text
        ok = (pos + i < L) & mask[seq, (pos + i - 1).clamp(max=L - 1)]
        targets[ok, i - 1] = lut[tokens[seq[ok], pos[ok] + i]]
    opt = torch.optim.AdamW(heads.parameters(), lr=lr)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(seq), (batch,), generator=g).to(dev)
        logits = heads(feats[seq[idx], pos[idx]].float(), None)  # (B, k, Vd)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[idx].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return heads.eval(), {"k": k, "steps": steps, "positions": int(len(seq)), "final_loss": round(loss.item(), 3)}


def save(module, path):
    from safetensors.torch import save_file

    save_file(stored_tensors(module), str(path))


def load_model(args, data_dir: Path):
    """The backbone model and its EOS id: packed GGUF blocks (--weights) or `clp`'s loader (--model)."""
    if args.model:
        from clpdecode.backbone import load_backbone

        bb = load_backbone(args.model)
        return bb.model, min(bb.eos_ids)
    if not args.weights:
        raise SystemExit("give --weights (packed GGUF blocks) or --model")
    return build_backbone([Path(w) for w in args.weights], data_dir / "config.json", torch.device(args.device)), 2


def chain_config(cfg, k: int, draft_vocab: int, intermediate: int, **kw) -> ChainConfig:
    """The chain's block as a layer of the backbone (heads, widths), with an optional
    narrower MLP (a smaller shipped file for a wide backbone)."""
    from dataclasses import replace

    cc = ChainConfig.from_backbone_config(cfg, k=k, draft_vocab=draft_vocab, **kw)
    return replace(cc, intermediate_size=intermediate) if intermediate else cc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="+", default=None, help="packed GGUF blocks (device_pack.py)")
    ap.add_argument("--model", default=None, help="load this backbone with clp's loader instead of --weights "
                    "(CPU; the answers come packed as sd_answers)")
    ap.add_argument("--ks", default="2,4", help="horizons to ship: the chain is trained and unrolled for the "
                    "largest, CLP and gates are trained for each (default: 2,4)")
    ap.add_argument("--budget-clock", default="wall", choices=["wall", "process"],
                    help="what the training budgets count: wall-clock seconds, or this process's CPU seconds "
                         "(a CPU run on a shared machine; all threads counted) (default: wall)")
    ap.add_argument("--competing-steps", type=int, default=0,
                    help="also train the competing-ablation heads (k+1 residual heads) for this many steps on "
                         "the self-distilled rows, saved in predictors.safetensors (default 0: none; the "
                         "embedded backbone's are copied from its independent heads)")
    ap.add_argument("--chain-intermediate", type=int, default=0,
                    help="the chain's MLP width (default 0: the backbone's)")
    ap.add_argument("--data", required=True, help="folder with config.json and tokens.npz")
    ap.add_argument("--tf", required=True, help="tf.npz: teacher-forced ShareGPT sequences")
    ap.add_argument("--out", required=True)
    ap.add_argument("--distil-seconds", type=float, default=120)
    ap.add_argument("--distil-batch", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--main-seconds", type=float, default=150)
    ap.add_argument("--ablation-seconds", type=float, default=45)
    ap.add_argument("--batch", type=int, default=32, help="sequences per training step")
    ap.add_argument("--max-len", type=int, default=640)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants to train "
                    "(default: all; attn_soft_feat is the shipped one and must be among them)")
    ap.add_argument("--sd-limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    ap.add_argument("--tf-limit", type=int, default=0, help="use only the first N teacher-forced sequences")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny random model")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.budget_clock == "process" else time.time
    dev = torch.device(args.device)
    out = Path(args.out)
    (out / "work").mkdir(parents=True, exist_ok=True)  # checkpoints (and distilled batches, if distilling)
    data_dir = Path(args.data)
    report = {"args": vars(args)}

    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=2048, tie_word_embeddings=True,
                                             eos_token_id=2, pad_token_id=2)).eval()
        eos = 2
    else:
        model, eos = load_model(args, data_dir)
    cfg = model.config
    ks = sorted(int(k) for k in args.ks.split(","))
    kmax = ks[-1]
    embed = model.get_input_embeddings().weight.detach()
    lm_head = model.get_output_embeddings().weight.detach()
    z, ztf = np.load(data_dir / "tokens.npz"), np.load(args.tf)
    sd_prompts, tf, held = unflat(z, "sd_prompts"), unflat(ztf, "tf"), unflat(z, "heldout")
    tf_plen, ho_plen = ztf["tf_plen"].tolist(), z["heldout_plen"].tolist()
    if args.tiny:
        sd_prompts, tf, tf_plen, held, ho_plen = sd_prompts[:24], tf[:12], tf_plen[:12], held[:6], ho_plen[:6]
    if args.sd_limit:
        sd_prompts = sd_prompts[: args.sd_limit]
    if args.tf_limit:
        tf, tf_plen = tf[: args.tf_limit], tf_plen[: args.tf_limit]
    log(f"data: {len(sd_prompts)} prompts, {len(tf)} teacher-forced, {len(held)} held-out")

    if "sd_answers_ids" in z:  # distilled already (the committed corpus of a CPU-trained backbone)
        sd = list(zip(sd_prompts, unflat(z, "sd_answers")[: len(sd_prompts)]))
    else:
        sd = self_distil(model, sd_prompts, eos, args.distil_seconds, args.distil_batch, args.max_new, dev,
                         out / "work")
    sd_seqs = [(p + a)[: args.max_len] for p, a in sd if len(a) >= 2]
    sd_plen = [len(p) for p, a in sd if len(a) >= 2]
    # The last 8% of the self-distilled answers train CLP and the gates only.
    n_pred = max(1, len(sd_seqs) // 12)
    seqs = sd_seqs + tf
    plens = sd_plen + tf_plen
    held = [h[: args.max_len] for h in held]  # the state cache is max_len wide; longer held-out text is cut
    feats, tokens, mask, ho = cached_prefill(model, (seqs, plens), (held, ho_plen), args, dev, out / "work")
    log(f"prefill: {feats.shape[0]} sequences, {int(mask.sum())} target positions "
        f"({int(mask[: len(sd_seqs)].sum())} self-distilled)")
    n_sd = len(sd_seqs)
    pred_rows = torch.arange(n_sd - n_pred, n_sd)
    train_rows = torch.cat([torch.arange(0, n_sd - n_pred), torch.arange(n_sd, len(seqs))])
    report["data"] = {"self_distilled_sequences": n_sd, "self_distilled_tokens": int(sum(len(a) for _, a in sd)),
                      "teacher_forced_sequences": len(tf), "train_positions": int(mask[train_rows].sum()),
                      "predictor_positions": int(mask[pred_rows].sum()), "heldout_positions": int(ho[2].sum())}
    # Draft vocabulary: the most frequent tokens the backbone emits in the training answers.
    greedy_next = tokens[train_rows][:, 1:][mask[train_rows][:, :-1]]
    counts = torch.bincount(greedy_next, minlength=lm_head.shape[0])
    draft_ids = counts.topk(min(args.draft_vocab, lm_head.shape[0])).indices.sort().values.cpu()
    report["data"]["draft_vocab_coverage"] = round(float(counts[draft_ids.to(dev)].sum() / counts.sum()), 4)
    log("data:", report["data"])

    ccfg = lambda **kw: chain_config(cfg, kmax, len(draft_ids), args.chain_intermediate, **kw)  # noqa: E731
    variants = [
        ("attn_soft_feat", ccfg(attention=True), ChainLossConfig(steps=kmax, feature_weight=0.5), args.main_seconds),
        ("attn_soft_feat_short", ccfg(attention=True), ChainLossConfig(steps=kmax, feature_weight=0.5),
         args.ablation_seconds),
        ("attn_soft", ccfg(attention=True), ChainLossConfig(steps=kmax, feature_weight=0.0), args.ablation_seconds),
        ("mlp_soft_feat", ccfg(attention=False), ChainLossConfig(steps=kmax, feature_weight=0.5),
         args.ablation_seconds),
        ("attn_soft_feat_no_ttt", ccfg(attention=True), ChainLossConfig(steps=1, feature_weight=0.5), args.ablation_seconds),
    ]
    tdata = (feats, tokens, mask, train_rows)
    report["variants"] = {}
    chains = {}
    if args.variants:
        keep = args.variants.split(",")
        unknown = set(keep) - {v[0] for v in variants}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in variants]}")
        variants = [v for v in variants if v[0] in keep]
    for name, cc, lc, budget in variants:
        chain, info = train_variant(name, cc, lc, tdata, embed, lm_head, draft_ids, budget, dev, args.batch,
                                    out / "work" / f"ckpt-{name}.pt")
        res = evaluate(chain, ho, embed, kmax)
        log(name, res)
        report["variants"][name] = {"chain": cc.as_dict(), "loss": lc.as_dict(), "train": info, "heldout": res,
                                    "params": chain.num_params}
        chains[name] = chain
        save(chain, out / f"chain-{name}.safetensors")
        (out / "report.json").write_text(json.dumps(report, indent=1))

    main_chain = chains["attn_soft_feat"]
    pdata = (feats[pred_rows], tokens[pred_rows], mask[pred_rows])
    report["predictors"] = {}
    pred = {}
    for k in ks:
        clp, gates, info = train_predictors(main_chain, pdata, embed, lm_head, k, dev)
        pred.update(stored_tensors(clp, f"k{k}.clp."))
        pred.update(stored_tensors(gates, f"k{k}.gates."))
        report["predictors"][f"k{k}"] = info
        log(f"predictors k={k}:", info)
    if args.competing_steps:
        sd_rows = torch.arange(0, n_sd - n_pred)
        competing, info = train_competing((feats, tokens, mask, sd_rows), lm_head, draft_ids, kmax + 1, dev,
                                          args.competing_steps)
        pred.update(stored_tensors(competing, "competing."))
        report["competing"] = {"heads": competing.cfg.as_dict(), **info}
        log("competing heads:", info)
    from safetensors.torch import save_file

    save_file(pred, str(out / "predictors.safetensors"))
    report["seconds"] = round(time.time() - T0, 1)
    report["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log("done")


if __name__ == "__main__":
    main()
