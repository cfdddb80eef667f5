"""MTP heads under Backbone-as-Architect: head i predicts token t+1+i, never t+1.

Every head is a small residual block on the backbone's last hidden state h_t, projected
through the backbone's own frozen LM head (restricted to a draft vocabulary):

- ``residual`` (Medusa-style): h' = h + SiLU(W h + b), W zero-initialised, so an
  untrained head starts as "the backbone's own next-token guess".
- ``fused``: h' = h + SiLU(W h + U e(x_{t+1}) + b): the block also sees the embedding of
  the token the backbone just chose at t+1, which the backbone decides before the heads
  run. Knowing t+1 is most of what predicting t+2 needs.

``offset`` is the distance of head 1's target from t: 2 under Backbone-as-Architect (head
i -> t+1+i); 1 for the ``competing`` ablation, where heads also predict t+1 and the
emitted span comes from heads alone (the prior design the paper blames for repetition).

Draft vocabulary: projecting through all 49,152 rows costs 13.6 ms per position in fp32
on our CPU; the heads project through the ``draft_ids`` rows only (the most frequent
tokens of the training answers), which a head can then never propose outside of.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

DESIGNS = ("residual", "fused")


def top_candidates(logits: torch.Tensor, draft_ids: torch.Tensor, width: int) -> list[list[tuple[int, float]]]:
    """(n, Vd) logits over a draft vocabulary -> per row, up to `width` (backbone token id,
    probability) candidates, best first; with width 1 only the argmax, probability nan (no
    softmax is computed on that hot path). Shared by independent heads and the chain."""
    if width <= 1:
        return [[(t, float("nan"))] for t in draft_ids[logits.argmax(-1)].tolist()]
    probs, idx = torch.softmax(logits.float(), -1).topk(min(width, logits.shape[-1]), -1)  # (n, w)
    return [list(zip(draft_ids[i].tolist(), p.tolist())) for i, p in zip(idx, probs)]


@dataclass
class HeadsConfig:
    k: int = 2  # number of heads (the horizon): head i predicts t+offset-1+i
    hidden_size: int = 576  # d, the backbone's hidden size
    design: str = "fused"  # "residual" (Medusa block) or "fused" (+ embedding of x_{t+1})
    offset: int = 2  # 2: Backbone-as-Architect (t+2..); 1: the competing ablation (t+1..)
    draft_vocab: int = 8192  # rows of the LM head the heads may propose (0 = all)

    def __post_init__(self):
        if not 1 <= self.k <= 8:
            raise ValueError(f"k must be in 1..8, got {self.k}")
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {self.design!r}")
        if self.offset not in (1, 2):
            raise ValueError("offset must be 2 (Backbone-as-Architect) or 1 (competing)")
        if self.offset == 1 and self.design == "fused":
            raise ValueError("competing heads predict t+1 themselves, so they cannot read its embedding")

    def as_dict(self) -> dict:
        return asdict(self)


class MTPHeads(nn.Module):
    """k residual heads sharing the backbone's frozen LM head (draft rows only)."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.cfg = cfg
        d, k = cfg.hidden_size, cfg.k
        self.w_hidden = nn.Parameter(torch.zeros(k, d, d))  # (k, d_out, d_in), zero init
        self.bias = nn.Parameter(torch.zeros(k, d))
        if cfg.design == "fused":
            self.w_token = nn.Parameter(torch.zeros(k, d, d))
        # Filled by attach(): (Vd,) backbone ids and (Vd, d) LM-head rows. The ids are
        # saved with the heads; the rows are taken from the backbone, never shipped.
        self.register_buffer("draft_ids", torch.zeros(0, dtype=torch.long))
        self.proj: torch.Tensor | None = None

    # ---- set-up ---------------------------------------------------------------------
    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        self.draft_ids = draft_ids.to(torch.long).clone()

    def attach(self, lm_head_weight: torch.Tensor) -> "MTPHeads":
        """Bind the frozen LM-head rows of the draft vocabulary (call after loading)."""
        if self.draft_ids.numel() == 0:
            self.draft_ids = torch.arange(lm_head_weight.shape[0])
        self.proj = lm_head_weight.detach()[self.draft_ids].float().contiguous()  # (Vd, d)
        return self

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward --------------------------------------------------------------------
    def states(self, hidden: torch.Tensor, token_emb: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d) hidden [+ (N, d) embedding of x_{t+1}] -> (N, k, d) head states."""
        pre = torch.einsum("nd,kod->nko", hidden, self.w_hidden) + self.bias  # (N, k, d)
        if self.cfg.design == "fused":
            if token_emb is None:
                raise ValueError("fused heads need the embedding of the backbone's token t+1")
            pre = pre + torch.einsum("nd,kod->nko", token_emb, self.w_token)
        return hidden.unsqueeze(1) + F.silu(pre)

    def forward(self, hidden: torch.Tensor, token_emb: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d) -> (N, k, Vd) logits over the draft vocabulary."""
        if self.proj is None:
            raise RuntimeError("heads are not attached to a backbone: call attach()")
        return self.states(hidden, token_emb) @ self.proj.to(hidden.device).T

    def session(self, embed=None) -> "HeadsSession":
        """Per-generation drafting state: the same interface as a chain's (heads keep none)."""
        return HeadsSession(self, embed)

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, token_emb: torch.Tensor | None = None) -> list[int]:
        """(d,) hidden at t [+ (d,) embedding of x_{t+1}] -> k backbone token ids (top-1)."""
        return [c[0][0] for c in self.candidates(hidden, token_emb)]

    @torch.inference_mode()
    def candidates(self, hidden: torch.Tensor, token_emb: torch.Tensor | None = None,
                   width: int = 1) -> list[list[tuple[int, float]]]:
        """Per head, up to `width` (token id, probability) candidates, best first (the
        probability is nan when width is 1: no softmax is computed)."""
        emb = token_emb.unsqueeze(0) if token_emb is not None else None
        return top_candidates(self.forward(hidden.float().unsqueeze(0), emb)[0], self.draft_ids, width)


class HeadsSession:
    """Independent heads read only the last state (and the embedding of t+1 when fused)."""

    def __init__(self, heads: MTPHeads, embed=None):
        self.heads, self.embed = heads, embed

    def observe(self, rows: torch.Tensor, tokens: list[int]) -> None:
        pass

    def propose(self, hidden: torch.Tensor, token: int, m: int) -> list[int]:
        return [c[0][0] for c in self.candidates(hidden, token, m)]

    def candidates(self, hidden: torch.Tensor, token: int, m: int, width: int = 1) -> list[list[tuple[int, float]]]:
        """As propose, with up to `width` (token, probability) candidates per depth."""
        if m <= 0:
            return []
        emb = self.embed(torch.tensor(token)).float() if self.heads.cfg.design == "fused" else None
        return self.heads.candidates(hidden, emb, width)[:m]
