"""Training: MTP heads, then CLP and the gate baseline on the heads' own predictions.

The backbone is frozen and never rerun: everything trains on cached hidden states
(see distill.py). Each stage checkpoints every `checkpoint_every` steps (atomically) and
resumes from its checkpoint when rerun with the same output folder.

Loss weighting across heads: head i's cross-entropy is weighted by ``head_decay ** (i-1)``
(0.8 by default, as in Medusa). Our reason: a head's token is only ever used when every
earlier head's token was accepted, so its errors matter less, and later heads are
intrinsically harder; the decay keeps them from pulling shared optimisation effort (the
learning-rate schedule, early stopping) away from head 1, which carries most of the gain.

CLP weighting (our reading of the paper's "relative weighting with linear warm-up"): the
class weights are w_c = (n / ((k+1) n_c)) ** alpha, the inverse class frequency raised to
alpha, where alpha ramps linearly from 0 (plain cross-entropy) to ``clp_alpha`` over the
first ``clp_warmup`` share of the steps. Length 0 dominates the labels; the ramp lets the
layer first learn the easy majority decision, then shifts weight to the rarer, valuable
long spans. `clp train` also trains a plain cross-entropy CLP and reports both.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_file, atomic_write_text
from ..heads.accuracy import heldout_accuracy
from ..heads.artifacts import Drafter
from ..heads.modules import HeadsConfig, MTPHeads
from ..predictors.modules import CLP, Gates, PredictorConfig
from .data import IGNORE, Features, draft_vocabulary, sequence_states, to_draft_index


@dataclass
class TrainConfig:
    k: int = 2  # horizon: number of heads
    design: str = "fused"  # head design: "fused" or "residual"
    draft_vocab: int = 8192  # LM-head rows heads may propose (0 = all)
    steps: int = 3000  # head optimiser steps
    batch_size: int = 256  # positions per step
    lr: float = 2e-3  # AdamW peak learning rate (heads)
    weight_decay: float = 0.0
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10%
    head_decay: float = 0.8  # loss weight of head i is head_decay ** (i - 1)
    predictor_steps: int = 1500  # CLP and gate optimiser steps
    predictor_lr: float = 3e-3
    clp_alpha: float = 0.5  # final exponent of the inverse-frequency class weights
    clp_warmup: float = 0.3  # share of CLP steps over which alpha ramps from 0
    competing: bool = True  # also train the head-competition ablation heads
    competing_steps: int = 0  # their optimiser steps (0 = half of `steps`: it is an ablation)
    checkpoint_every: int = 250
    seed: int = 0
    sources: str = "all"  # head training data (recorded; the caller loads the features)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _atomic_save(obj, path: Path) -> None:
    atomic_file(path, lambda tmp: torch.save(obj, tmp))


def _progress(total: int, desc: str, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def _accelerator():
    """The accelerate engine: one process here; several under `accelerate launch`."""
    from accelerate import Accelerator

    return Accelerator()


def _optimise(module, loss_fn, steps, lr, warmup, ckpt: Path, desc: str, seed: int,
              checkpoint_every: int, weight_decay: float = 0.0, stop=None, clip: float = 0.0,
              device: torch.device | None = None, local: bool = False) -> int:
    """AdamW with warm-up and cosine decay; checkpoints and resumes from `ckpt`. Returns the
    steps done. `stop()`, checked before every step: when true, checkpoint and return early
    (a time budget; a rerun continues). `clip` > 0 clips the gradients' global norm to it.
    `device`: where the module trains (default: accelerate's device for this process).
    `local`: this process trains alone (no gradient averaging, no barrier), e.g. a module
    only the main process trains.

    Under `accelerate launch` each process draws its own batches (seed + rank) and the
    gradients are averaged across processes before every step, so N processes train with
    an N-times larger batch; only the main process writes checkpoints.
    """
    acc = _accelerator()
    module.to(device if device is not None else acc.device)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps))
    start = 0
    gen = torch.Generator().manual_seed(seed + acc.process_index)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start = state["step"]
    bar = _progress(steps, desc, start) if acc.is_main_process else None
    ema = None
    step = start
    for step in range(start, steps):
        if stop is not None and stop():
            if acc.is_main_process:
                _atomic_save({"module": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                              "gen": gen.get_state(), "step": step}, ckpt)
            break
        loss = loss_fn(gen, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if acc.num_processes > 1 and not local:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
        if acc.is_main_process and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _atomic_save({"module": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "gen": gen.get_state(), "step": step + 1}, ckpt)
    else:
        step = steps
    if bar is not None:
        bar.close()
    if not local:
        acc.wait_for_everyone()
    module.to("cpu")
    return step


def _dev(module) -> torch.device:
    return next(module.parameters()).device


def train_heads(feats: Features, embed, lm_head_weight: torch.Tensor, cfg: HeadsConfig,
                tcfg: TrainConfig, ckpt: Path, desc: str) -> MTPHeads:
    """Fit k heads by cross-entropy against the backbone's greedy continuation."""
    torch.manual_seed(tcfg.seed)
    vocab = lm_head_weight.shape[0]
    heads = MTPHeads(cfg)
    heads.set_draft_vocab(draft_vocabulary(feats.tokens[feats.rows("heads")], cfg.draft_vocab, vocab))
    heads.attach(lm_head_weight)
    rows = feats.rows("heads")
    targets = to_draft_index(feats.targets(cfg.k, cfg.offset), heads.draft_ids, vocab)  # (N, k)
    weights = torch.tensor([tcfg.head_decay ** i for i in range(cfg.k)])

    def loss_fn(gen, step):
        idx = rows[torch.randint(len(rows), (tcfg.batch_size,), generator=gen)]
        dev = _dev(heads)
        h = feats.hidden[idx].float().to(dev)
        emb = embed(feats.tokens[idx]).float().to(dev) if cfg.design == "fused" else None
        logits = heads(h, emb)  # (B, k, Vd)
        tgt = targets[idx].to(dev)  # (B, k)
        per_head = torch.stack([
            F.cross_entropy(logits[:, i], tgt[:, i], ignore_index=IGNORE) if (tgt[:, i] != IGNORE).any()
            else logits.sum() * 0 for i in range(cfg.k)
        ])
        return (per_head * weights.to(dev)).sum() / weights.sum()

    _optimise(heads, loss_fn, tcfg.steps, tcfg.lr, tcfg.warmup, ckpt, desc, tcfg.seed,
              tcfg.checkpoint_every, tcfg.weight_decay)
    heads.eval()
    return heads


@torch.no_grad()
def head_predictions(heads: MTPHeads, feats: Features, embed, rows: torch.Tensor, topk: int = 5,
                     chunk: int = 2048) -> torch.Tensor:
    """(R, k, topk) backbone token ids of each head's top predictions at `rows`."""
    out = []
    for s in range(0, len(rows), chunk):
        idx = rows[s : s + chunk]
        emb = embed(feats.tokens[idx]).float() if heads.cfg.design == "fused" else None
        logits = heads(feats.hidden[idx].float(), emb)
        out.append(heads.draft_ids[logits.topk(topk, -1).indices])
    return torch.cat(out) if out else torch.zeros(0, heads.cfg.k, topk, dtype=torch.long)


def accepted_lengths(top1: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(R, k) predictions, (R, k) targets -> (R,) longest prefix of correct heads (CLP label)."""
    correct = (top1 == targets) & (targets != IGNORE)
    return correct.long().cumprod(1).sum(1)


def clp_class_weights(labels: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Inverse class frequency ** alpha, normalised to a mean example weight of 1."""
    counts = torch.bincount(labels, minlength=k + 1).float().clamp(min=1)
    w = (counts.sum() / ((k + 1) * counts)) ** alpha
    return w / (w * counts).sum() * counts.sum()  # keep the mean example weight at 1


def train_clp(feats: Features, heads: MTPHeads, embed, tcfg: TrainConfig, ckpt: Path, alpha: float,
              desc: str) -> tuple[CLP, dict]:
    """Fit CLP on the predictor split; labels = accepted length of the heads' top-1."""
    torch.manual_seed(tcfg.seed)
    k = heads.cfg.k
    rows = feats.rows("predictor")
    labels = accepted_lengths(head_predictions(heads, feats, embed, rows, topk=1)[..., 0],
                              feats.targets(k, heads.cfg.offset)[rows])
    clp = CLP(PredictorConfig(k=k, hidden_size=heads.cfg.hidden_size))
    final_w = clp_class_weights(labels, k, alpha)
    ramp_steps = max(1, int(tcfg.clp_warmup * tcfg.predictor_steps))
    def loss_fn(gen, step):
        # Class weights ramp linearly from uniform to final_w over the warm-up; the step
        # comes from the optimiser loop, so a resumed run continues the ramp where it was.
        ramp = min(1.0, step / ramp_steps)
        w = 1 + ramp * (final_w - 1)
        idx = torch.randint(len(rows), (tcfg.batch_size,), generator=gen)
        dev = _dev(clp)
        return F.cross_entropy(clp(feats.hidden[rows[idx]].float().to(dev)), labels[idx].to(dev), weight=w.to(dev))

    _optimise(clp, loss_fn, tcfg.predictor_steps, tcfg.predictor_lr, tcfg.warmup, ckpt, desc, tcfg.seed,
              tcfg.checkpoint_every)
    clp.eval()
    dist = torch.bincount(labels, minlength=k + 1).tolist()
    return clp, {"label_counts": dist, "alpha": alpha}


def train_gates(feats: Features, heads: MTPHeads, embed, tcfg: TrainConfig, ckpt: Path) -> Gates:
    """Fit one gate per head by BCE on whether that head's top-1 token is right."""
    torch.manual_seed(tcfg.seed)
    k = heads.cfg.k
    rows = feats.rows("predictor")
    targets = feats.targets(k, heads.cfg.offset)[rows]
    top1 = head_predictions(heads, feats, embed, rows, topk=1)[..., 0]
    correct = (top1 == targets).float()
    valid = (targets != IGNORE).float()
    gates = Gates(PredictorConfig(k=k, hidden_size=heads.cfg.hidden_size))

    def loss_fn(gen, step):
        idx = torch.randint(len(rows), (tcfg.batch_size,), generator=gen)
        dev = _dev(gates)
        logits = gates(feats.hidden[rows[idx]].float().to(dev))
        c, v = correct[idx].to(dev), valid[idx].to(dev)
        return F.binary_cross_entropy_with_logits(logits, c, weight=v, reduction="sum") / v.sum().clamp(min=1)

    _optimise(gates, loss_fn, tcfg.predictor_steps, tcfg.predictor_lr, tcfg.warmup, ckpt, "train: gates",
              tcfg.seed, tcfg.checkpoint_every)
    gates.eval()
    return gates


@torch.no_grad()
def evaluate_clp(clp: CLP, feats: Features, heads: MTPHeads, embed, thresholds=(0.3, 0.5, 0.7)) -> dict:
    """On held-out data: mean accepted length and the share of accepted head tokens that are
    wrong, per decision threshold (what unverified CLP decoding would emit)."""
    k = heads.cfg.k
    rows = feats.rows("heldout")
    labels = accepted_lengths(head_predictions(heads, feats, embed, rows, topk=1)[..., 0],
                              feats.targets(k, heads.cfg.offset)[rows])
    p = torch.softmax(clp(feats.hidden[rows].float()), -1)
    at_least = p.flip(1).cumsum(1).flip(1)  # (R, k+1)
    out = {"class_accuracy": round(float((p.argmax(1) == labels).float().mean()), 4)}
    for thr in thresholds:
        m = ((at_least >= thr).long() * torch.arange(k + 1)).max(1).values
        wrong = (m - torch.minimum(m, labels)).sum()
        out[f"thr{thr}"] = {"mean_accepted": round(float(m.float().mean()), 4),
                            "wrong_token_share": round(float(wrong / m.sum().clamp(min=1)), 4)}
    return out


def training_embed(backbone):
    """Token embeddings usable in autograd (Backbone.embed returns inference tensors)."""
    table = backbone.model.get_input_embeddings()

    def embed(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return table(ids)
    return embed


def train_all(feats: Features, backbone, tcfg: TrainConfig, work: Path) -> tuple[Drafter, dict]:
    """Heads, CLP (weighted and plain), gates and competing heads; returns the bundle + report."""
    work = Path(work)
    embed = training_embed(backbone)
    lm_w = backbone.lm_head_weight
    d = backbone.info.hidden_size
    t0 = time.time()
    hcfg = HeadsConfig(k=tcfg.k, hidden_size=d, design=tcfg.design, offset=2, draft_vocab=tcfg.draft_vocab)
    heads = train_heads(feats, embed, lm_w, hcfg, tcfg, work / "heads.pt", f"train: heads (k={tcfg.k})")
    # Held-out accuracy by the definitions `clp eval-heads` uses (heads/accuracy.py).
    heldout = sequence_states(feats, "heldout")
    report = {"train_config": asdict(tcfg), "heads": heldout_accuracy(heads, backbone, heldout, tcfg.k)}
    clp, clp_info = train_clp(feats, heads, embed, tcfg, work / "clp.pt", tcfg.clp_alpha, "train: CLP (weighted)")
    plain, _ = train_clp(feats, heads, embed, tcfg, work / "clp_plain.pt", 0.0, "train: CLP (plain CE)")
    report["clp"] = {"weighted": evaluate_clp(clp, feats, heads, embed),
                     "plain_ce": evaluate_clp(plain, feats, heads, embed), **clp_info}
    gates = train_gates(feats, heads, embed, tcfg, work / "gates.pt")
    competing = None
    if tcfg.competing:
        ccfg = HeadsConfig(k=tcfg.k + 1, hidden_size=d, design="residual", offset=1, draft_vocab=tcfg.draft_vocab)
        csteps = tcfg.competing_steps or max(1, tcfg.steps // 2)
        ctcfg = TrainConfig(**{**asdict(tcfg), "steps": csteps})
        competing = train_heads(feats, embed, lm_w, ccfg, ctcfg, work / "competing.pt", "train: competing heads")
        report["competing"] = heldout_accuracy(competing, backbone, heldout, ccfg.k)
    report["train_seconds"] = round(time.time() - t0, 1)
    report["positions"] = {s: int(len(feats.rows(s))) for s in ("heads", "predictor", "heldout")}
    drafter = Drafter(heads=heads, clp=clp, gates=gates, competing=competing,
                      meta={"training": report})
    if _accelerator().is_main_process:
        atomic_write_text(work / "report.json", json.dumps(report, indent=1))
    return drafter, report
