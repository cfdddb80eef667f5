"""The fused design of `clp train` (and residual): independent MTP heads on cached hidden
states, then CLP and the gate baseline on the heads' own predictions, and the
head-competition ablation's heads; every one of them trained by training/fit.py.

The backbone is frozen and never rerun: everything trains on cached hidden states
(see distill.py). Each module checkpoints every `checkpoint_every` steps (atomically) and
resumes from its checkpoint when rerun with the same work folder. `clp train` also trains
a plain cross-entropy CLP (alpha 0) beside the weighted one and reports both.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..heads.accuracy import heldout_accuracy
from ..heads.artifacts import Drafter
from ..heads.modules import HeadsConfig, MTPHeads
from ..predictors.modules import CLP, Gates
from .data import IGNORE, Features, draft_vocabulary, sequence_states, to_draft_index
from .fit import (
    BATCH_SIZE,
    CHECKPOINT_EVERY,
    CLP_ALPHA,
    CLP_RAMP,
    HEAD_DECAY,
    HEADS_LR,
    PREDICTOR_LR,
    WARMUP,
    Schedule,
    accelerator,
    fit_clp,
    fit_gates,
    fit_heads,
)


@dataclass
class TrainConfig:
    k: int = 2  # horizon: number of heads
    design: str = "fused"  # head design: "fused" or "residual"
    draft_vocab: int = 8192  # LM-head rows heads may propose (0 = all)
    steps: int = 3000  # head optimiser steps
    batch_size: int = BATCH_SIZE  # positions per step
    lr: float = HEADS_LR  # AdamW peak learning rate (heads)
    weight_decay: float = 0.0
    warmup: int = WARMUP  # linear warm-up steps, then cosine decay to 10%
    head_decay: float = HEAD_DECAY  # loss weight of head i is head_decay ** (i - 1)
    predictor_steps: int = 1500  # CLP and gate optimiser steps
    predictor_lr: float = PREDICTOR_LR
    clp_alpha: float = CLP_ALPHA  # final exponent of the inverse-frequency class weights
    clp_warmup: float = CLP_RAMP  # share of CLP steps over which alpha ramps from 0
    competing: bool = True  # also train the head-competition ablation heads
    competing_steps: int = 0  # their optimiser steps (0 = half of `steps`: it is an ablation)
    checkpoint_every: int = CHECKPOINT_EVERY
    seed: int = 0
    sources: str = "all"  # head training data (recorded; the caller loads the features)

    def schedule(self, steps: int, lr: float) -> Schedule:
        return Schedule(steps=steps, lr=lr, warmup=self.warmup, batch_size=self.batch_size,
                        checkpoint_every=self.checkpoint_every, weight_decay=self.weight_decay, seed=self.seed)


def train_heads(feats: Features, embed, lm_head_weight: torch.Tensor, cfg: HeadsConfig,
                tcfg: TrainConfig, ckpt: Path, desc: str) -> MTPHeads:
    """Fit k heads by cross-entropy against the backbone's greedy continuation."""
    torch.manual_seed(tcfg.seed)
    vocab = lm_head_weight.shape[0]
    heads = MTPHeads(cfg)
    heads.set_draft_vocab(draft_vocabulary(feats.tokens[feats.rows("heads")], cfg.draft_vocab, vocab))
    heads.attach(lm_head_weight)
    targets = to_draft_index(feats.targets(cfg.k, cfg.offset), heads.draft_ids, vocab)  # (N, k)
    fused = cfg.design == "fused"
    return fit_heads(heads, feats.hidden, targets, tcfg.schedule(tcfg.steps, tcfg.lr), ckpt, desc, tcfg.head_decay,
                     tokens=feats.tokens if fused else None, embed=embed if fused else None, rows=feats.rows("heads"))


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


def predictor_labels(feats: Features, heads: MTPHeads, embed, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """At the rows of `split`: the heads' top-1 tokens (R, k) and their targets (R, k)."""
    rows = feats.rows(split)
    top1 = head_predictions(heads, feats, embed, rows, topk=1)[..., 0]
    return top1, feats.targets(heads.cfg.k, heads.cfg.offset)[rows]


def train_clp(feats: Features, heads: MTPHeads, embed, tcfg: TrainConfig, ckpt: Path, alpha: float,
              desc: str) -> tuple[CLP, dict]:
    """Fit CLP on the predictor split; labels = accepted length of the heads' top-1."""
    torch.manual_seed(tcfg.seed)
    k = heads.cfg.k
    labels = accepted_lengths(*predictor_labels(feats, heads, embed, "predictor"))
    clp = fit_clp(feats.hidden[feats.rows("predictor")], labels, k, tcfg.schedule(tcfg.predictor_steps,
                  tcfg.predictor_lr), ckpt, desc, alpha=alpha, ramp=tcfg.clp_warmup)
    return clp, {"label_counts": torch.bincount(labels, minlength=k + 1).tolist(), "alpha": alpha}


def train_gates(feats: Features, heads: MTPHeads, embed, tcfg: TrainConfig, ckpt: Path) -> Gates:
    """Fit one gate per head by BCE on whether that head's top-1 token is right."""
    torch.manual_seed(tcfg.seed)
    top1, targets = predictor_labels(feats, heads, embed, "predictor")
    return fit_gates(feats.hidden[feats.rows("predictor")], top1 == targets,
                     tcfg.schedule(tcfg.predictor_steps, tcfg.predictor_lr), ckpt, valid=targets != IGNORE)


@torch.no_grad()
def evaluate_clp(clp: CLP, feats: Features, heads: MTPHeads, embed, thresholds=(0.3, 0.5, 0.7)) -> dict:
    """On held-out data: mean accepted length and the share of accepted head tokens that are
    wrong, per decision threshold (what unverified CLP decoding would emit)."""
    k = heads.cfg.k
    labels = accepted_lengths(*predictor_labels(feats, heads, embed, "heldout"))
    p = torch.softmax(clp(feats.hidden[feats.rows("heldout")].float()), -1)
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
    if accelerator().is_main_process:
        atomic_write_text(work / "report.json", json.dumps(report, indent=1))
    return drafter, report
