"""Training a drafter (EAGLE-3 by default, or the chain), then CLP and the gates on its own
drafts: the one training path, on CPU or CUDA, in one process or several (``accelerate launch``).

Data: token-id sequences with a mask of the positions that train (training.sequences):
self-distilled answers (`clp distill`'s corpus) and ShareGPT conversations of the training
split, one sequence per answer with its earlier turns as context (teacher-forced: the targets are
the backbone's own distributions on that text, as EAGLE trains). Nothing big is cached on
disk: each sequence goes through the frozen backbone once when its batch comes up
(BackboneTargets: on the CPU batch 1 under the backbone's own numerics, where q4 computes
what fp32 computes for a GGUF backbone; on a GPU an fp32 copy runs the whole batch at once),
giving the drafter's features (the inputs of its three aux layers) and the targets (the
backbone's next-token distribution over the draft vocabulary, through its LM head). The
chain (design "chain", heads/chained.py) reads the backbone's last state instead of three
layers' inputs.

Loss: the training-time test, unrolled k steps (the drafter's forward_train); step s is a
soft cross-entropy against the backbone's distribution at j + s, weighted 0.8^(s-1); the
chain adds its SmoothL1 regression on the backbone's next state (training/chain.py).
`init` starts from a drafter folder of the same design (fine-tuning: its weights and its
draft vocabulary) instead of from scratch.
AdamW with warm-up and cosine decay (training.fit.optimise), checkpoints every
`checkpoint_every` steps; the data order is a fixed permutation indexed by the step, so a
resumed run continues with the sequences it had not seen.

CLP and the gates then train on a predictor share of the sequences that the drafter never
saw: labels are the drafter's accepted lengths against the backbone's greedy continuation
(drafts fed back as at inference), features the backbone's last hidden state. The
head-competition ablation's heads train on the same states (`competing_steps`; a bundle from
`init` keeps its own). All three are training/fit.py's small heads, as in the fused design.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..heads.accuracy import shifted
from ..heads.chained import ChainConfig, ChainedHeads
from ..heads.eagle3 import Eagle3Config, Eagle3Drafter
from ..heads.modules import HeadsConfig, MTPHeads
from ..predictors.modules import CLP, Gates
from .chain import ChainLossConfig, chain_loss
from .data import IGNORE, draft_vocabulary, to_draft_index, trainable
from .fit import (
    CLP_ALPHA,
    CLP_RAMP,
    HEADS_LR,
    PREDICTOR_LR,
    Schedule,
    accelerator,
    fit_clp,
    fit_gates,
    fit_heads,
    optimise,
)

DESIGNS = ("eagle3", "chain")


@dataclass
class DrafterTrainConfig:
    design: str = "eagle3"  # "eagle3" (three layers' states) or "chain" (the last state)
    aux_layers: tuple[int, ...] = ()  # eagle3: the 3 backbone layers whose inputs it fuses (): [2, L/2, L-3]
    chain_mlp: int = 0  # chain: its MLP's width (0: the backbone's; narrower: a smaller file for a wide backbone)
    init: str = ""  # a drafter folder of the same design to start from ("": from scratch)
    k: int = 4  # draft steps, unrolled in training (training-time test)
    draft_vocab: int = 8192  # tokens the drafter may propose (the most frequent training tokens)
    steps: int = 2000  # optimiser steps
    minutes: float = 0.0  # stop after this much training time (0: run all steps); a rerun resumes
    batch_sequences: int = 4  # sequences per step (per process)
    max_len: int = 384  # tokens per sequence (longer ones are cut)
    lr: float = 1e-3  # AdamW peak learning rate
    clip: float = 1.0  # gradients' global norm is clipped to this (0: off), as the GPU run did
    warmup: int = 100
    step_decay: float = 0.8  # loss weight of step s is step_decay ** (s - 1)
    feature_weight: float = 0.5  # chain: SmoothL1 weight on the backbone's next state
    predictor_share: float = 0.08  # sequences held back for CLP and gates (never seen by the drafter)
    predictor_steps: int = 800
    predictor_lr: float = PREDICTOR_LR
    clp_alpha: float = CLP_ALPHA
    clp_warmup: float = CLP_RAMP
    # The head-competition ablation (`clp bench`'s `competing` row): k+1 independent residual
    # heads on the last state, head i predicting t+i, trained on the predictor share's
    # self-distilled text (the backbone's greedy continuation). 0: none.
    competing_steps: int = 800
    checkpoint_every: int = 25
    seed: int = 0
    device: str = "cpu"  # where the drafter trains and the backbone computes its targets ("cuda": a GPU)

    def as_dict(self) -> dict:
        return asdict(self)


class BackboneTargets:
    """The frozen backbone's view of a batch of sequences: the drafter's features (the
    inputs of its aux layers; the last hidden state itself for the chain) and the hidden
    states whose LM-head distributions are its targets.

    On the CPU the backbone runs as loaded, one sequence at a time (its numerics: q4
    computes what fp32 computes for a GGUF backbone, and batching the fp32 model instead
    gained nothing here: docs/design.md, "Training on a GPU"). On a GPU an
    fp32 transformers copy runs there on the whole batch at once, right-padded: attention
    is causal, so no position sees the padding after it. `batched` forces either way
    (tests compare the two).
    """

    def __init__(self, backbone, aux_layers: tuple[int, ...], draft_ids: torch.Tensor, device="cpu",
                 batched: bool | None = None):
        self.backbone = backbone
        self.aux_layers = aux_layers
        self.device = torch.device(device)
        self.batched = self.device.type != "cpu" if batched is None else batched
        self.model = backbone.fp32_model(self.device) if self.batched else None
        head = backbone.lm_head_weight.float().to(self.device)
        self.proj = head[draft_ids.to(self.device)]  # (Vd, d) frozen LM-head rows of the draft vocabulary
        self.full = head  # (V, d), for the greedy token (CLP labels)

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """B id lists -> features (B, L, 3d) (or (B, L, d) without aux layers) and hidden
        (B, L, d), fp32 on self.device, L the longest sequence, zeros past each one's end."""
        L = max(len(ids) for ids in sequences)
        if self.batched:
            ids = torch.zeros(len(sequences), L, dtype=torch.long)  # right padding (token 0)
            for i, seq in enumerate(sequences):
                ids[i, : len(seq)] = torch.tensor(seq)
            out = self.model.base_model(input_ids=ids.to(self.device), use_cache=False,
                                        output_hidden_states=bool(self.aux_layers))
            hidden = out.last_hidden_state.float()
            # hidden_states[i] is the input of layer i, as Backbone.forward's aux_layers.
            feats = (torch.cat([out.hidden_states[i] for i in self.aux_layers], -1).float() if self.aux_layers
                     else hidden)
            live = (torch.arange(L)[None] < torch.tensor([len(s) for s in sequences])[:, None]).to(self.device)
            return feats * live[..., None], hidden * live[..., None]
        rows = []
        for seq in sequences:
            bb = self.backbone
            if self.aux_layers:
                h, a = bb.forward(torch.tensor([seq]), bb.new_cache(), aux_layers=self.aux_layers)
                rows.append((a[0].float(), h[0].float()))
            else:
                h = bb.forward(torch.tensor([seq]), bb.new_cache())[0].float()
                rows.append((h, h))
        return (_pad([a for a, _ in rows], L).to(self.device), _pad([h for _, h in rows], L).to(self.device))


def _pad(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros((len(rows), length) + tuple(rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def trained_vocabulary(sequences: list[tuple[list[int], list[bool]]], size: int, vocab_size: int) -> torch.Tensor:
    """The draft vocabulary of (ids, mask) sequences: data.draft_vocabulary of the tokens that
    train (token p+1 where mask[p])."""
    trained = [torch.tensor(ids[1:], dtype=torch.long)[torch.tensor(mask[:-1], dtype=torch.bool)]
               for ids, mask in sequences]
    return draft_vocabulary(torch.cat(trained) if trained else torch.zeros(0, dtype=torch.long), size, vocab_size)


class _Batches:
    """Step -> its sequences (a fixed permutation; each process takes its own slice)."""

    def __init__(self, sequences: list, cfg: DrafterTrainConfig, rank: int, world: int):
        self.sequences, self.cfg, self.rank, self.world = sequences, cfg, rank, world
        g = torch.Generator().manual_seed(cfg.seed)
        self.order = torch.randperm(len(sequences), generator=g).tolist()

    def __call__(self, step: int) -> list:
        b = self.cfg.batch_sequences
        start = (step * self.world + self.rank) * b
        return [self.sequences[self.order[(start + i) % len(self.order)]] for i in range(b)]


def training_device(requested: str, acc) -> torch.device:
    """`--device` -> where the drafter and the backbone's targets run. "cuda" is this
    process's own GPU under `accelerate launch` (cuda:N); "cpu" is the CPU."""
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None and acc.device.type == "cuda":
        return acc.device
    return dev


def drafter_loss(drafter: Eagle3Drafter | ChainedHeads, targets: BackboneTargets, batch: list,
                 cfg: DrafterTrainConfig, embed: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The unrolled loss of one batch of (ids, mask) sequences."""
    dev = next(drafter.parameters()).device
    aux, hidden = targets([ids[: cfg.max_len] for ids, _ in batch])  # (B, L, *) on the targets' device
    L = hidden.shape[1]
    ids = _pad([torch.tensor(i[: cfg.max_len]) for i, _ in batch], L).to(dev)  # (B, L)
    mask = _pad([torch.tensor(m[: cfg.max_len]) for _, m in batch], L).bool().to(dev)  # p's next token trains
    if isinstance(drafter, ChainedHeads):
        lcfg = ChainLossConfig(steps=cfg.k, feature_weight=cfg.feature_weight, step_decay=cfg.step_decay)
        return chain_loss(drafter, hidden.to(dev), ids, mask, embed.to(dev), lcfg)
    aux = aux.to(dev)
    with torch.no_grad():
        teacher = torch.softmax(hidden @ targets.proj.T, -1).to(dev)  # (B, L, Vd)
    embs = [embed[shifted(ids, s)].to(dev) for s in range(1, cfg.k + 1)]
    outs = drafter.forward_train(aux, embs, steps=cfg.k)
    # Zero, but on the graph: a batch with nothing to train (possible only when every
    # sequence's answer lies past max_len) then steps with zero gradients instead of failing.
    total, wsum, top1 = outs[0].sum() * 0.0, 0.0, []
    for s, x in enumerate(outs, start=1):
        valid = mask & shifted(mask, s, False)
        if not valid.any():
            top1.append(0.0)
            continue
        logp = F.log_softmax(drafter.logits(x[valid]), -1)
        tgt = shifted(teacher, s)[valid]
        w = cfg.step_decay ** (s - 1)
        total = total + w * -(tgt * logp).sum(-1).mean()
        wsum += w
        top1.append(float((logp.argmax(-1) == tgt.argmax(-1)).float().mean()))
    return total / max(wsum, 1e-9), {"top1": top1}


@torch.no_grad()
def drafter_lengths(drafter: Eagle3Drafter | ChainedHeads, targets: BackboneTargets, ids: list[int], mask: list[bool],
                    embed: torch.Tensor, k: int):
    """Per position of one sequence whose next token trains: the backbone's hidden state, the
    drafter's accepted length and which drafts are right (CLP's and the gates' labels,
    accepted_drafts)."""
    features, hidden = targets([ids])  # (1, L, *) on the targets' device, as the drafter
    t = torch.tensor([ids], device=hidden.device)
    m = torch.tensor([mask], device=hidden.device)
    lengths, correct = accepted_drafts(drafter, features, hidden, t, m, embed, targets.full, k)
    keep = m[0]
    return hidden[0][keep].cpu(), lengths[0][keep].cpu(), correct[0][keep].cpu()


@torch.no_grad()
def accepted_drafts(drafter: Eagle3Drafter | ChainedHeads, features: torch.Tensor, hidden: torch.Tensor,
                    tokens: torch.Tensor, mask: torch.Tensor, embed: torch.Tensor, lm_head: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's accepted length at every position (B, L) and which of its k drafts are
    right (B, L, k), its drafts fed back as at inference, against the backbone's greedy
    continuation (the greedy token after p is argmax(lm_head @ hidden[p])).

    Draft s from start j is right when it equals the greedy token after j+s, every text token
    in between followed the backbone's greedy choices (so the states are those of the greedy
    path), and mask holds at j and j+s. Positions where mask is False get length 0.
    """
    greedy = (hidden @ lm_head.T).argmax(-1)  # (B, L): the backbone's token after p
    on_path = shifted(tokens, 1) == greedy
    outs = drafter.forward_train(features, [embed[shifted(tokens, 1)]], steps=k, own_tokens=True)
    drafts = torch.stack([drafter.draft_ids[drafter.logits(x).argmax(-1)] for x in outs], -1)  # (B, L, k)
    correct, path = [], mask.clone()
    for s in range(1, k + 1):
        path = path & shifted(on_path, s - 1, False)
        correct.append(path & (drafts[:, :, s - 1] == shifted(greedy, s)) & shifted(mask, s, False))
    correct = torch.stack(correct, -1)
    return correct.long().cumprod(-1).sum(-1), correct


def next_tokens(ids: list[int], mask: list[bool], n: int) -> torch.Tensor:
    """(N, n): at each position p whose next token trains (mask[p], as drafter_lengths keeps
    them), tokens p+1 .. p+n of the text, IGNORE past its end or its answer span (token p+i
    counts while mask[p+i-1] holds)."""
    t, m = torch.tensor(ids), torch.tensor(mask[: len(ids)])
    pos = m.nonzero().flatten()  # (N,)
    out = torch.full((len(pos), n), IGNORE, dtype=torch.long)
    for i in range(1, n + 1):
        q = pos + i
        ok = (q < len(t)) & m[(q - 1).clamp(max=len(t) - 1)]
        out[ok, i - 1] = t[q[ok]]
    return out


def _train_competing(hidden: torch.Tensor, tokens: torch.Tensor, lm_head: torch.Tensor, draft_ids: torch.Tensor,
                     cfg: DrafterTrainConfig, work: Path, device) -> tuple[MTPHeads, dict]:
    """The head-competition ablation: k+1 residual heads reading the backbone's last state
    f_t (offset 1: head i predicts t+i, the first competing with the backbone's own LM
    head), hard cross-entropy against the text, over the drafter's draft vocabulary."""
    n = tokens.shape[1]
    heads = MTPHeads(HeadsConfig(k=n, hidden_size=hidden.shape[1], design="residual", offset=1,
                                 draft_vocab=len(draft_ids)))
    heads.set_draft_vocab(draft_ids.cpu())
    heads.attach(lm_head.to(device))
    targets = to_draft_index(tokens, draft_ids.cpu(), lm_head.shape[0])  # (N, n)
    sched = Schedule(steps=cfg.competing_steps, lr=HEADS_LR, seed=cfg.seed)
    fit_heads(heads, hidden, targets, sched, work / "competing.pt", "train: competing heads", device=device,
              local=True)
    heads.attach(lm_head.cpu())
    return heads, {"heads": n, "steps": cfg.competing_steps, "positions": len(hidden)}


def _train_predictors(hidden, lengths, correct, k: int, cfg: DrafterTrainConfig, work: Path) -> tuple[CLP, Gates, dict]:
    # One linear layer each, on rows gathered on the CPU: they train there whatever --device,
    # in the main process alone (under `accelerate launch` the others have finished).
    sched = Schedule(steps=cfg.predictor_steps, lr=cfg.predictor_lr, seed=cfg.seed)
    cpu = torch.device("cpu")
    clp = fit_clp(hidden, lengths, k, sched, work / "clp.pt", "train: CLP", alpha=cfg.clp_alpha,
                  ramp=cfg.clp_warmup, device=cpu, local=True)
    gates = fit_gates(hidden, correct, sched, work / "gates.pt", device=cpu, local=True)
    return clp, gates, {"label_counts": torch.bincount(lengths, minlength=k + 1).tolist()}


def load_init(folder, cfg: DrafterTrainConfig, backbone):
    """The bundle `--init` names, checked against what this run trains: same design and k,
    trained for this backbone (a ClpError otherwise)."""
    from ..errors import ClpError
    from ..heads.artifacts import check_backbone, load_drafter

    init = load_drafter(Path(folder))
    check_backbone(init.meta, backbone)
    want = Eagle3Drafter if cfg.design == "eagle3" else ChainedHeads
    if not isinstance(init.heads, want):
        raise ClpError(f"--init {folder} holds a {init.heads.cfg.design} drafter, not one for --design {cfg.design}")
    if init.heads.cfg.k != cfg.k:
        raise ClpError(f"--init {folder} was trained for k = {init.heads.cfg.k}, not --k {cfg.k}")
    if cfg.aux_layers and tuple(init.heads.cfg.aux_layers) != tuple(cfg.aux_layers):
        raise ClpError(f"--init {folder} fuses layers {list(init.heads.cfg.aux_layers)}, not --aux-layers "
                       f"{','.join(map(str, cfg.aux_layers))}")
    return init


def new_drafter(backbone, cfg: DrafterTrainConfig, train_seqs: list, work: Path, init=None):
    """The drafter to train: `init`'s (a bundle from load_init: its weights and draft
    vocabulary), else a fresh one whose draft vocabulary is the `cfg.draft_vocab` most
    frequent training tokens, kept in `work` so that a resumed run drafts over the same tokens.
    """
    if cfg.design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {cfg.design!r}")
    torch.manual_seed(cfg.seed)
    if init is not None:
        return init.heads.train()
    vocab_path = work / "draft_ids.pt"
    if vocab_path.exists():
        draft_ids = torch.load(vocab_path)
    else:
        draft_ids = trained_vocabulary(train_seqs, cfg.draft_vocab, backbone.info.vocab_size)
        torch.save(draft_ids, vocab_path)
    if cfg.design == "chain":
        ccfg = ChainConfig.from_backbone_config(backbone.config, k=cfg.k)
        drafter = ChainedHeads(replace(ccfg, intermediate_size=cfg.chain_mlp) if cfg.chain_mlp else ccfg)
        drafter.set_draft_vocab(draft_ids)
        return drafter
    layers = {"aux_layers": tuple(cfg.aux_layers)} if cfg.aux_layers else {}
    drafter = Eagle3Drafter(Eagle3Config.from_backbone_config(backbone.config, k=cfg.k, draft_vocab=len(draft_ids),
                                                              **layers))
    drafter.set_draft_vocab(draft_ids)
    drafter.init_from_backbone(backbone.lm_head_weight)
    return drafter


def train_drafter(backbone, train_seqs: list[tuple[list[int], list[bool]]],
                  pred_seqs: list[tuple[list[int], list[bool]]], cfg: DrafterTrainConfig, work: Path,
                  init=None):
    """Train the drafter (cfg.design), then CLP and gates; returns (Drafter, report).

    Args:
        train_seqs: (token ids, mask) pairs the drafter trains on; mask[p] is True when
            token p+1 trains.
        pred_seqs: self-distilled sequences the drafter never sees: CLP's and the gates' data.
        work: checkpoint folder (rerun with the same folder to resume).
        init: the bundle to start from (load_init); None loads `cfg.init` when it is set.
    """
    from ..heads.artifacts import Drafter, backbone_meta

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    acc = accelerator()
    # A sequence whose answer starts past max_len has nothing to train: drop it here, once.
    train_seqs = trainable(train_seqs, cfg.max_len)
    if not train_seqs:
        raise ValueError("no training sequences (none has a trainable token within max_len)")
    if init is None and cfg.init:
        init = load_init(cfg.init, cfg, backbone)
    drafter = new_drafter(backbone, cfg, train_seqs, work, init)
    device = training_device(cfg.device, acc)
    embed = backbone.model.get_input_embeddings().weight.detach().float().to(device)  # (V, d)
    drafter.attach(backbone.lm_head_weight.to(device), embed)
    aux_layers = drafter.aux_layers if isinstance(drafter, Eagle3Drafter) else ()
    targets = BackboneTargets(backbone, aux_layers, drafter.draft_ids, device)
    batches = _Batches(train_seqs, cfg, acc.process_index, acc.num_processes)
    stats = {"top1": None}
    deadline = time.monotonic() + cfg.minutes * 60 if cfg.minutes else math.inf

    def loss_fn(gen, step):
        loss, s = drafter_loss(drafter, targets, batches(step), cfg, embed)
        stats["top1"] = s["top1"]
        return loss

    drafter.train()
    sched = Schedule(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, checkpoint_every=cfg.checkpoint_every,
                     seed=cfg.seed)
    done_steps = optimise(drafter, loss_fn, sched, work / "drafter.pt", f"train: {cfg.design} drafter",
                          stop=lambda: time.monotonic() > deadline, clip=cfg.clip, device=device)
    state = torch.load(work / "drafter.pt", weights_only=False, map_location="cpu")
    drafter.load_state_dict(state["module"])
    drafter.to(device).eval()
    tokens_seen = done_steps * cfg.batch_sequences * acc.num_processes
    report = {"train_config": cfg.as_dict(), "drafter_steps": done_steps, "finished": done_steps >= cfg.steps,
              "sequences": {"train": len(train_seqs), "predictor": len(pred_seqs)},
              "sequences_seen": tokens_seen, "last_batch_top1": stats["top1"]}
    clp = gates = competing = None
    # The head-competition ablation does not depend on the drafter: a fine-tuned bundle
    # keeps the one it started from, so that `clp bench` still has that row.
    carried = init is not None and init.competing is not None
    if pred_seqs and acc.is_main_process:
        from tqdm import tqdm

        cut = [(ids[: cfg.max_len], m[: cfg.max_len]) for ids, m in pred_seqs]
        rows = [drafter_lengths(drafter, targets, ids, m, embed, cfg.k)
                for ids, m in tqdm(cut, desc="train: CLP and gate labels", unit="seq")]
        hidden = torch.cat([r[0] for r in rows])
        lengths = torch.cat([r[1] for r in rows])
        correct = torch.cat([r[2] for r in rows])
        if len(lengths):
            clp, gates, preport = _train_predictors(hidden, lengths, correct, cfg.k, cfg, work)
            report["predictors"] = {**preport, "positions": len(lengths),
                                    "mean_accepted_predictor_split": round(float(lengths.float().mean()), 4)}
            if cfg.competing_steps and not carried:
                tokens = torch.cat([next_tokens(ids, m, cfg.k + 1) for ids, m in cut])
                competing, report["competing"] = _train_competing(hidden, tokens, backbone.lm_head_weight,
                                                                  drafter.draft_ids, cfg, work, device)
    targets = None  # drops the GPU copy of the backbone, if any
    drafter.to("cpu")
    drafter.attach(backbone.lm_head_weight, embed.cpu())  # the bundle's drafter lives on the CPU
    if init is not None:
        if carried:
            competing = init.competing
        report["init"] = {"from": str(cfg.init), "competing": "carried over unchanged" if carried else None,
                          "training": init.meta.get("training", {}).get("command")}
    drafter_bundle = Drafter(heads=drafter, clp=clp, gates=gates, competing=competing,
                             meta={"backbone": backbone_meta(backbone), "training": report})
    (work / "report.json").write_text(json.dumps(report, indent=1))
    return drafter_bundle, report


__all__ = ["DrafterTrainConfig", "train_drafter", "load_init", "drafter_loss", "drafter_lengths", "accepted_drafts",
           "trained_vocabulary"]
