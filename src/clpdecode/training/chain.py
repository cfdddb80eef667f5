"""The chained drafter's training loss on whole sequences of backbone states.

Only one-step targets are needed: at every position p of any text, the backbone's own
next-token distribution softmax(E f_p) and its state f_p. Both come from one prefill (or
from cached states: the distribution is recomputed from f_p through the frozen LM head),
so teacher-forced text is as good a source as self-distilled answers.

Step s (1-based) of the chain started at j reads x_{j+s} and predicts x_{j+s+1}; its
targets are the backbone's distribution at p = j+s (soft cross-entropy over the draft
vocabulary) and, optionally, the state f_{j+s} (SmoothL1 "feature regression").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..heads.accuracy import shifted
from ..heads.chained import ChainedHeads


@dataclass
class ChainLossConfig:
    steps: int = 4  # unrolled steps ("training-time test"); the shipped k
    feature_weight: float = 0.5  # SmoothL1 on the next state; 0 = distribution only
    step_decay: float = 0.8  # loss weight of step s is step_decay ** (s - 1)
    hard: bool = False  # hard labels (argmax of the backbone) instead of its distribution

    def as_dict(self) -> dict:
        return asdict(self)


def chain_loss(chain: ChainedHeads, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
               embed: torch.Tensor, cfg: ChainLossConfig) -> tuple[torch.Tensor, dict]:
    """Loss of the unrolled chain on a batch of sequences.

    Args:
        features: (B, L, d) backbone post-norm states (any float dtype).
        tokens: (B, L) token ids of the text.
        mask: (B, L) bool: position p's next-token distribution is a training target
            (answer positions of real, non-padding text).
        embed: (V, d) the backbone's input embedding table.
    Returns:
        (loss, stats) with stats["top1"][s-1] the share of valid positions where step s's
        argmax equals the backbone's argmax (teacher-forced).
    """
    f32 = features.float()
    embs = [embed[shifted(tokens, s)].to(f32.dtype) for s in range(1, cfg.steps + 1)]
    outs = chain.forward_train(f32, embs, steps=cfg.steps)
    proj = chain.proj
    # Zero, but on the graph: a batch with no trainable position steps with zero gradients.
    total = outs[0].sum() * 0.0
    wsum = 0.0
    top1 = []
    for s, g in enumerate(outs, start=1):
        valid = mask & shifted(mask, s, False)  # chain start j and target position j+s both count
        if not valid.any():
            top1.append(0.0)
            continue
        target_f = shifted(f32, s)[valid]  # (N, d)
        student = g[valid].float() @ proj.T  # (N, Vd)
        with torch.no_grad():
            teacher = target_f @ proj.T
        logp = F.log_softmax(student, -1)
        if cfg.hard:
            ce = F.nll_loss(logp, teacher.argmax(-1))
        else:
            ce = -(F.softmax(teacher, -1) * logp).sum(-1).mean()
        loss = ce
        if cfg.feature_weight:
            loss = loss + cfg.feature_weight * F.smooth_l1_loss(g[valid].float(), target_f)
        w = cfg.step_decay ** (s - 1)
        total = total + w * loss
        wsum += w
        top1.append(float((student.argmax(-1) == teacher.argmax(-1)).float().mean()))
    return total / max(wsum, 1e-9), {"top1": top1}
