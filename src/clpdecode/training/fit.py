"""The one trainer: the optimiser loop every module of `clp train` goes through, and the
small heads (CLP, the gates, independent MTP heads and the head-competition ablation's)
trained by one function over (states, targets) tensors, whichever design made the states.

Schedule (all of them): AdamW, linear warm-up, then cosine decay to 10% of the peak rate
(`lr_lambda`); checkpoints every `checkpoint_every` steps, atomically, and a rerun with
the same checkpoint resumes (the optimiser, the schedule and the batch sampler's state).
A small head draws `batch_size` rows at random (with replacement) at every step.

Loss weighting across MTP heads: head i's cross-entropy is weighted by
``head_decay ** (i-1)`` (0.8 by default, as in Medusa). A head's token is only ever used
when every earlier head's token was accepted, so its errors matter less, and later heads
are intrinsically harder; the decay keeps them from pulling the shared optimisation effort
away from head 1, which carries most of the gain.

CLP weighting (our reading of the paper's "relative weighting with linear warm-up"): the
class weights are w_c = (n / ((k+1) n_c)) ** alpha, the inverse class frequency raised to
alpha, where alpha ramps linearly from 0 (plain cross-entropy) to its final value over the
first `ramp` share of the steps. Length 0 dominates the labels; the ramp lets the layer
first learn the easy majority decision, then shifts weight to the rarer, valuable long
spans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..atomic import atomic_file
from ..heads.modules import MTPHeads
from ..predictors.modules import CLP, Gates, PredictorConfig
from .data import IGNORE

# The small heads' schedule, for both designs of `clp train`.
HEADS_LR = 2e-3  # MTP heads (independent and competing): AdamW peak rate
PREDICTOR_LR = 3e-3  # CLP and the gates
BATCH_SIZE = 256  # rows per step
WARMUP = 100  # linear warm-up steps
CHECKPOINT_EVERY = 250
HEAD_DECAY = 0.8  # loss weight of MTP head i is HEAD_DECAY ** (i - 1)
CLP_ALPHA = 0.5  # final exponent of CLP's inverse-frequency class weights
CLP_RAMP = 0.3  # share of CLP's steps over which that exponent ramps from 0


@dataclass
class Schedule:
    """How one module trains: its steps, peak learning rate and the shared schedule."""

    steps: int
    lr: float
    warmup: int = WARMUP
    batch_size: int = BATCH_SIZE
    checkpoint_every: int = CHECKPOINT_EVERY
    weight_decay: float = 0.0
    seed: int = 0


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 10% at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def accelerator():
    """The accelerate engine: one process here; several under `accelerate launch`."""
    from accelerate import Accelerator

    return Accelerator()


def _save(obj, path: Path) -> None:
    atomic_file(path, lambda tmp: torch.save(obj, tmp))


def optimise(module, loss_fn, sched: Schedule, ckpt: Path, desc: str, stop=None, clip: float = 0.0,
             device: torch.device | None = None, local: bool = False) -> int:
    """Train `module` on `loss_fn(generator, step)` under `sched`; checkpoints and resumes
    from `ckpt`. Returns the steps done. `stop()`, checked before every step: when true,
    checkpoint and return early (a time budget; a rerun continues). `clip` > 0 clips the
    gradients' global norm to it. `device`: where the module trains (default: accelerate's
    device for this process). `local`: this process trains alone (no gradient averaging,
    no barrier), e.g. a module only the main process trains.

    Under `accelerate launch` each process draws its own batches (seed + rank) and the
    gradients are averaged across processes before every step, so N processes train with
    an N-times larger batch; only the main process writes checkpoints.
    """
    from tqdm import tqdm

    acc = accelerator()
    module.to(device if device is not None else acc.device)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sched.lr, weight_decay=sched.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched.warmup, sched.steps))
    gen = torch.Generator().manual_seed(sched.seed + acc.process_index)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start = state["step"]

    def checkpoint(step: int) -> None:
        if acc.is_main_process:
            _save({"module": module.state_dict(), "opt": opt.state_dict(), "sched": lr_sched.state_dict(),
                   "gen": gen.get_state(), "step": step}, ckpt)

    bar = (tqdm(total=sched.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
           if acc.is_main_process else None)
    ema = None
    step = sched.steps
    for step in range(start, sched.steps):
        if stop is not None and stop():
            checkpoint(step)
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
        lr_sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % sched.checkpoint_every == 0 or step + 1 == sched.steps:
            checkpoint(step + 1)
    else:
        step = sched.steps
    if bar is not None:
        bar.close()
    if not local:
        acc.wait_for_everyone()
    module.to("cpu")
    return step


def fit(module, data: tuple[torch.Tensor, ...], loss: Callable[..., torch.Tensor], sched: Schedule, ckpt: Path,
        desc: str, rows: torch.Tensor | None = None, device=None, local: bool = False):
    """Train `module` on rows of `data` (tensors of equal length, indexed together), drawn at
    random at every step: `loss(*batch, step=step)`, each batch tensor on the module's
    device. `rows`: the rows that may be drawn (default: all). Returns the module in eval mode."""
    n = len(rows) if rows is not None else len(data[0])

    def loss_fn(gen, step):
        idx = torch.randint(n, (sched.batch_size,), generator=gen)
        if rows is not None:
            idx = rows[idx]
        dev = next(module.parameters()).device
        return loss(*(t[idx].to(dev) for t in data), step=step)

    optimise(module, loss_fn, sched, ckpt, desc, device=device, local=local)
    return module.eval()


def fit_heads(heads: MTPHeads, states: torch.Tensor, targets: torch.Tensor, sched: Schedule, ckpt: Path, desc: str,
              head_decay: float = HEAD_DECAY, tokens: torch.Tensor | None = None, embed=None,
              rows: torch.Tensor | None = None, device=None, local: bool = False) -> MTPHeads:
    """MTP heads (draft vocabulary set, LM head attached) by cross-entropy, head i weighted
    head_decay ** (i-1).

    Args:
        states: (N, d) backbone hidden states.
        targets: (N, n) each head's target as a draft-vocabulary index (IGNORE: none).
        tokens, embed: the fused design's second input, embed(tokens) (N,): the token each
            row's state chose.
    """
    weights = torch.tensor([head_decay ** i for i in range(targets.shape[1])])

    def loss(h, tgt, *tok, step):
        # The embedding table stays on the CPU, where the backbone is.
        emb = embed(tok[0].cpu()).float().to(h.device) if tok else None
        logits = heads(h.float(), emb)  # (B, n, Vd)
        per_head = torch.stack([
            F.cross_entropy(logits[:, i], tgt[:, i], ignore_index=IGNORE) if (tgt[:, i] != IGNORE).any()
            else logits.sum() * 0 for i in range(tgt.shape[1])
        ])
        w = weights.to(per_head.device)
        return (per_head * w).sum() / w.sum()

    data = (states, targets) + ((tokens,) if tokens is not None else ())
    return fit(heads, data, loss, sched, ckpt, desc, rows=rows, device=device, local=local)


def clp_class_weights(labels: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Inverse class frequency ** alpha, normalised to a mean example weight of 1."""
    counts = torch.bincount(labels, minlength=k + 1).float().clamp(min=1)
    w = (counts.sum() / ((k + 1) * counts)) ** alpha
    return w / (w * counts).sum() * counts.sum()  # keep the mean example weight at 1


def fit_clp(states: torch.Tensor, lengths: torch.Tensor, k: int, sched: Schedule, ckpt: Path, desc: str,
            alpha: float = CLP_ALPHA, ramp: float = CLP_RAMP, device=None, local: bool = False) -> CLP:
    """CLP on (N, d) states and (N,) accepted lengths in 0..k, class weights ramped (above)."""
    clp = CLP(PredictorConfig(k=k, hidden_size=states.shape[1]))
    final_w = clp_class_weights(lengths, k, alpha)
    ramp_steps = max(1, int(ramp * sched.steps))

    def loss(h, y, step):
        # The step comes from the optimiser loop, so a resumed run continues the ramp.
        w = 1 + min(1.0, step / ramp_steps) * (final_w - 1)
        return F.cross_entropy(clp(h.float()), y, weight=w.to(h.device))

    return fit(clp, (states, lengths), loss, sched, ckpt, desc, device=device, local=local)


def fit_gates(states: torch.Tensor, correct: torch.Tensor, sched: Schedule, ckpt: Path,
              valid: torch.Tensor | None = None, device=None, local: bool = False) -> Gates:
    """One gate per head on (N, d) states by BCE on (N, k) `correct` (is that head's top-1
    right?); `valid` (N, k): the targets that exist (default: all)."""
    gates = Gates(PredictorConfig(k=correct.shape[1], hidden_size=states.shape[1]))
    valid = torch.ones_like(correct, dtype=torch.float) if valid is None else valid.float()

    def loss(h, c, v, step):
        logits = gates(h.float())
        return F.binary_cross_entropy_with_logits(logits, c.float(), weight=v, reduction="sum") / v.sum().clamp(min=1)

    return fit(gates, (states, correct, valid), loss, sched, ckpt, "train: gates", device=device, local=local)
