"""Held-out accuracy of a drafter against the backbone's greedy continuation.

Below both training and evaluation (both import it). The held-out data are self-distilled
answers: the backbone's own greedy continuations, so the token after each answer position
is the backbone's t+1 and the ones after it are what drafts must equal.

Metrics, for k drafts after the backbone's token t+1, over every answer position:

- head_top1[i] / head_top5[i]: draft i+1 (token t+2+i) right, top-1 / in the top 5, counting
  positions where that token exists. For a chain, draft i+1 is computed from its own
  earlier drafts, as inference runs it (top-5 is of that step's distribution).
- chain_accept[i]: share of positions whose drafts 1..i+1 are all right (every position
  counts; near the end of an answer the missing tokens count as misses);
- mean_accepted: sum of chain_accept = expected drafts kept per verified step at span k.

Heads of the competing ablation (offset 1) predict from t+1 on: their draft i+1 is
token t+1+i, scored the same way.
"""

from __future__ import annotations

import torch

from .chained import ChainedHeads
from .eagle3 import Eagle3Drafter


def shifted(x: torch.Tensor, s: int, fill=0) -> torch.Tensor:
    """x[:, j + s] at column j (B, L, ...), padded with `fill` past the end."""
    if s == 0:
        return x
    pad = torch.full_like(x[:, :s], fill)
    return torch.cat([x[:, s:], pad], 1)


@torch.no_grad()
def draft_topk(drafter_heads, features: torch.Tensor, tokens: torch.Tensor, embed: torch.Tensor,
               steps: int, topk: int = 5) -> torch.Tensor:
    """(B, L, steps, topk) token ids each draft step ranks first at every chain start.

    Args:
        features: (B, L, d) backbone post-norm states, or for an EAGLE-3 drafter (B, L, 3d)
            the inputs of its aux layers; tokens (B, L) the text, whose token at j+1 is the
            backbone's t+1 after position j.
        embed: (V, d) input embedding table (for independent fused heads and chains).
    """
    heads = drafter_heads
    if isinstance(heads, Eagle3Drafter):
        outs = heads.forward_train(features.float(), [embed[shifted(tokens, 1)].float()], steps=steps,
                                   own_tokens=True)
        return torch.stack([heads.draft_ids[heads.logits(x).topk(topk, -1).indices] for x in outs], 2)
    if isinstance(heads, ChainedHeads):
        outs = heads.forward_train(features.float(), [embed[shifted(tokens, 1)].float()], steps=steps,
                                   own_tokens=True)
        return torch.stack([heads.draft_ids[heads.logits(g).topk(topk, -1).indices] for g in outs], 2)
    B, L, d = features.shape
    h = features.reshape(-1, d).float()
    emb = embed[shifted(tokens, 1).reshape(-1)].float() if heads.cfg.design == "fused" else None
    logits = heads(h, emb)[:, :steps]  # (B*L, steps, Vd)
    return heads.draft_ids[logits.topk(topk, -1).indices].reshape(B, L, steps, topk)


@torch.no_grad()
def accuracy_counts(drafter_heads, features, tokens, answer_mask, embed, steps: int) -> dict:
    """Raw counts on one batch (sum them over batches, then finish with `summarise`).

    answer_mask: (B, L) bool, True at position p when tokens[p+1] is an answer token.
    """
    top = draft_topk(drafter_heads, features, tokens, embed, steps)  # (B, L, steps, 5)
    # Draft s's target lies s + ahead tokens after p: t+1+s (ahead 1), or t+s for the
    # competing ablation's heads (offset 1). Chains have no offset: they draft from t+2.
    ahead = getattr(drafter_heads.cfg, "offset", 2) - 1
    starts = answer_mask
    right = torch.ones_like(starts)
    c = {"starts": int(starts.sum()), "exists": [], "top1": [], "top5": [], "chain": []}
    for s in range(1, steps + 1):
        target = shifted(tokens, s + ahead)
        exists = starts & shifted(answer_mask, s + ahead - 1, False)
        ok1 = top[:, :, s - 1, 0] == target
        ok5 = (top[:, :, s - 1] == target[..., None]).any(-1)
        right = right & ok1
        c["exists"].append(int(exists.sum()))
        c["top1"].append(int((ok1 & exists).sum()))
        c["top5"].append(int((ok5 & exists).sum()))
        c["chain"].append(int((right & exists).sum()))
    return c


def summarise(counts: list[dict], k: int, design: str) -> dict:
    starts = sum(c["starts"] for c in counts)

    def tot(key, i):
        return sum(c[key][i] for c in counts)

    top1 = [round(tot("top1", i) / max(1, tot("exists", i)), 4) for i in range(k)]
    top5 = [round(tot("top5", i) / max(1, tot("exists", i)), 4) for i in range(k)]
    chain = [round(tot("chain", i) / max(1, starts), 4) for i in range(k)]
    return {"k": k, "design": design, "head_top1": top1, "head_top5": top5, "chain_accept": chain,
            "mean_accepted": round(sum(chain), 4), "tokens": starts}


@torch.no_grad()
def heldout_states(backbone, records: list[dict], progress: bool = True,
                   aux_layers: tuple[int, ...] = ()) -> list[tuple]:
    """One prefill per held-out answer: [(states (1, T, d), ids (1, T), answer_mask (1, T),
    aux (1, T, 3d) or None)].

    Args:
        records: {"prompt": ids, "answer": ids} with the answer the backbone's greedy output.
        aux_layers: also keep the inputs of these layers (an EAGLE-3 drafter's features).
    """
    from tqdm import tqdm

    out = []
    for r in tqdm(records, desc="eval-heads: backbone states of held-out answers", unit="answer",
                  disable=not progress):
        if len(r["answer"]) < 2:
            continue
        ids = list(r["prompt"]) + list(r["answer"])
        out_ = backbone.forward(torch.tensor([ids]), backbone.new_cache(), aux_layers=aux_layers)
        states, aux = out_ if aux_layers else (out_, None)  # (1, T, d), (1, T, 3d)
        mask = torch.zeros(1, len(ids), dtype=torch.bool)
        mask[0, len(r["prompt"]) - 1 : len(ids) - 1] = True  # p's next token is an answer token
        out.append((states.float(), torch.tensor([ids]), mask, None if aux is None else aux.float()))
    return out


@torch.no_grad()
def heldout_accuracy(drafter_heads, backbone, states: list[tuple], k: int) -> dict:
    """Accuracy of heads or a chain on held-out answers whose states heldout_states computed."""
    embed = backbone.model.get_input_embeddings().weight.detach().float()
    eagle = isinstance(drafter_heads, Eagle3Drafter)
    if eagle and any(aux is None for *_, aux in states):
        raise ValueError("an EAGLE-3 drafter is scored on aux-layer states: heldout_states(aux_layers=...)")
    counts = [accuracy_counts(drafter_heads, aux if eagle else f, ids, mask, embed, k) for f, ids, mask, aux in states]
    return summarise(counts, k, drafter_heads.cfg.design)
