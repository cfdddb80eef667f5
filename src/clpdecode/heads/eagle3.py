"""The EAGLE-3 drafter: the default design, under Backbone-as-Architect.

EAGLE-3 (Li et al., 2025) drafts from three of the backbone's layers instead of its last
state, with one decoder layer whose attention reads the token embedding beside that state::

    g   = fc([a_low ; a_mid ; a_high])                # inputs of three backbone layers, 3d -> d
    u   = [RMSNorm_in(e(token)) ; RMSNorm_h(g)]       # 2d: embedding first, then the state
    x   = g + Attn(u)                                  # q/k/v read 2d, GQA, RoPE, over its own cache
    x   = x + SwiGLU(RMSNorm_post(x))
    logits = lm_head(RMSNorm_out(x))                   # its own head over a draft vocabulary
    next g = x                                         # a draft step feeds its pre-norm output back

The backbone's LM head emits t+1 (Backbone-as-Architect); step 1 reads (g_t, e(x_{t+1})) and
predicts t+2, step s reads step s-1's x and the token it drafted. This is exactly the
checkpoint layout of SpecForge's ``LlamaForCausalLMEagle3``, which vLLM, SGLang and llama.cpp
(``--spec-type draft-eagle3``) load: heads/export.py writes it (fc, midlayer.*, norm,
lm_head, d2t, t2d). The layer ids are the inputs of layers [2, L/2, L-3] by default, the
convention of vLLM and llama.cpp.

Training (``forward_train``) is unrolled as in EAGLE-3's "training-time test": step s at
position j reads step s-1's own output and the text's token x_{j+s}, and attends to the
step-1 entries 0..j and the chain's entries at j for steps 2..s (one attention call with a
(L, sL) mask). Inference keeps a small KV cache of its own (ChainState) and drafts on the
C++ kernels under q4 backbones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .chained import (
    ChainSession,
    ChainState,
    RMSNorm,
    UnrolledAttention,
    apply_rope,
    drafting_rope_table,
    grouped_attention,
    rope,
)
from .modules import top_candidates


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high layers (their inputs): vLLM's and llama.cpp's default,
    [2, L/2, L-3], kept inside the model for very shallow (test) models."""
    last = num_layers - 1
    return (min(2, last), min(num_layers // 2, last), max(0, min(num_layers - 3, last)))


@dataclass
class Eagle3Config:
    k: int = 4  # draft steps (tokens t+2 .. t+1+k)
    hidden_size: int = 576  # d, the drafter's width (the backbone's)
    target_hidden_size: int = 576  # the backbone's d
    aux_layers: tuple[int, ...] = (2, 15, 27)  # backbone layers whose inputs are fused
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5
    vocab_size: int = 49152  # the backbone's vocabulary
    draft_vocab: int = 8192  # tokens the drafter may propose (0 = all)
    max_position_embeddings: int = 8192
    design: str = "eagle3"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 1 <= self.k <= 8:
            raise ValueError(f"k must be in 1..8, got {self.k}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.aux_layers = tuple(int(i) for i in self.aux_layers)
        if len(self.aux_layers) != 3:
            raise ValueError(f"EAGLE-3 fuses exactly 3 layers, got {self.aux_layers}")

    @classmethod
    def from_backbone_config(cls, cfg, **kw) -> "Eagle3Config":
        heads = cfg.num_attention_heads
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
        if isinstance(theta, dict) or theta is None:  # per layer type (Gemma 3): the global one
            rp = getattr(cfg, "rope_parameters", None) or {}
            theta = (rp.get("full_attention") or {}).get("rope_theta", 10000.0)
        kw.setdefault("aux_layers", default_aux_layers(cfg.num_hidden_layers))
        return cls(hidden_size=cfg.hidden_size, target_hidden_size=cfg.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   intermediate_size=cfg.intermediate_size, rope_theta=float(theta),
                   rms_eps=float(getattr(cfg, "rms_norm_eps", 1e-5)), vocab_size=cfg.vocab_size,
                   max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 8192)), **kw)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["aux_layers"] = list(self.aux_layers)
        return d


class Eagle3Drafter(nn.Module):
    """EAGLE-3's draft model. ``cfg.k`` steps; its own LM head over ``draft_ids``."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.cfg = cfg
        d, eps = cfg.hidden_size, cfg.rms_eps
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.fc = nn.Linear(3 * cfg.target_hidden_size, d, bias=False)
        self.input_layernorm = RMSNorm(d, eps)  # on the token embedding
        self.hidden_norm = RMSNorm(d, eps)  # on g
        self.q_proj = nn.Linear(2 * d, q_out, bias=False)
        self.k_proj = nn.Linear(2 * d, kv_out, bias=False)
        self.v_proj = nn.Linear(2 * d, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.norm = RMSNorm(d, eps)
        n_draft = cfg.draft_vocab or cfg.vocab_size
        self.lm_head = nn.Linear(d, n_draft, bias=False)
        self.register_buffer("draft_ids", torch.arange(n_draft, dtype=torch.long))
        self._embed = None  # (V, d) the backbone's input embedding table, bound by attach()

    @property
    def aux_layers(self) -> tuple[int, ...]:
        return self.cfg.aux_layers

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- set-up ---------------------------------------------------------------------------
    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        draft_ids = draft_ids.to(torch.long).sort().values  # ascending: d2t offsets as SpecForge writes them
        if draft_ids.numel() != self.lm_head.out_features:
            raise ValueError(f"{draft_ids.numel()} draft ids for a {self.lm_head.out_features}-row head")
        self.draft_ids = draft_ids.clone()

    def init_from_backbone(self, lm_head_weight: torch.Tensor) -> None:
        """Start the head from the backbone's LM-head rows of the draft vocabulary."""
        with torch.no_grad():
            self.lm_head.weight.copy_(lm_head_weight.detach().float()[self.draft_ids.to(lm_head_weight.device)])

    def attach(self, lm_head_weight: torch.Tensor | None = None, embed_weight: torch.Tensor | None = None):
        """Bind the backbone's embedding table (frozen, shared: not part of the drafter)."""
        self._embed = (embed_weight if embed_weight is not None else lm_head_weight).detach()
        return self

    # ---- the block ----------------------------------------------------------------------------
    def _attend(self, q, k, v, mask) -> torch.Tensor:
        return grouped_attention(q, k, v, mask, self.cfg.num_kv_heads)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(.., d) pre-norm outputs -> (.., Vd) logits over the draft vocabulary."""
        return self.lm_head(self.norm(x))

    # ---- training: teacher-forced, unrolled ---------------------------------------------------
    def forward_train(self, aux: torch.Tensor, next_tokens_emb: list[torch.Tensor],
                      steps: int | None = None, own_tokens: bool = False) -> list[torch.Tensor]:
        """Unrolled drafter over whole sequences.

        Args:
            aux: (B, L, 3 d_t) inputs of the three backbone layers at positions 0..L-1.
            next_tokens_emb: for step s (1-based), (B, L, d) embeddings of x_{j+s} at start j.
            steps: unrolled steps (default cfg.k).
            own_tokens: only step 1's embeddings are used; later steps embed the drafter's
                own top-1 drafts (what inference proposes: evaluation).
        Returns:
            `steps` tensors (B, L, d): step s's pre-norm output at start j, which predicts
            x_{j+s+1} (target: the backbone's distribution at position j+s).
        """
        c = self.cfg
        steps = steps or c.k
        B, L, _ = aux.shape
        dev = aux.device
        pos = torch.arange(L, device=dev)
        memory = UnrolledAttention(L, dev, c.num_kv_heads)
        g = self.fc(aux)
        outs = []
        emb = next_tokens_emb[0]
        for s in range(steps):
            if s:
                emb = (self._embed[self.draft_ids[self.logits(g).argmax(-1)]].to(g.dtype) if own_tokens
                       else next_tokens_emb[s])
            u = torch.cat([self.input_layernorm(emb), self.hidden_norm(g)], -1)
            q = self.q_proj(u).view(B, L, c.num_heads, c.head_dim).transpose(1, 2)
            k = self.k_proj(u).view(B, L, c.num_kv_heads, c.head_dim).transpose(1, 2)
            v = self.v_proj(u).view(B, L, c.num_kv_heads, c.head_dim).transpose(1, 2)
            p = (pos + s).expand(B, L)
            q, k = rope(q, p, c.rope_theta), rope(k, p, c.rope_theta)
            x = g + self.o_proj(memory(q, k, v))
            x = self._mlp(x)
            outs.append(x)
            g = x
        return outs

    # ---- inference (batch 1) -----------------------------------------------------------------
    def prepare_inference(self, dtype=None) -> dict:
        """Drafting weights: fp32 copies (dtype None), or "q8": 8-bit groups on the C++ kernels
        (backbone/kernels.py) with the RMSNorms, SiLU * up and residuals fused; torch.qint8 /
        float16 fall back to fp32 here (the kernels or full precision)."""
        from ..backbone import kernels

        if dtype == "q8" and kernels.load() is not None:
            from ..backbone.quant import Int8Linear, Int8Weight

            def lin(*ws):
                return Int8Linear(Int8Weight.from_float(torch.cat([w.detach().float() for w in ws], 0)))

            d = self.cfg.hidden_size
            wq, wk, wv = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
            # u = [norm(e) ; norm(g)]: each half's product with its own norm fused, then summed.
            mods = {"kernels": True, "fc": lin(self.fc.weight),
                    "qkv_e": lin(wq[:, :d], wk[:, :d], wv[:, :d]), "qkv_g": lin(wq[:, d:], wk[:, d:], wv[:, d:]),
                    "o": lin(self.o_proj.weight), "mlp_in": lin(self.gate_proj.weight, self.up_proj.weight),
                    "down": lin(self.down_proj.weight), "head": lin(self.lm_head.weight)}
        else:
            mods = {"kernels": False}
        self.__dict__["_fast"] = mods
        return mods

    def train(self, mode: bool = True):
        self.__dict__.pop("_fast", None)
        return super().train(mode)

    def _fast_mods(self) -> dict:
        return self.__dict__.get("_fast") or self.prepare_inference()

    def _rope_table(self, n: int, signed: bool = False):
        return drafting_rope_table(self, n, signed)

    def _step(self, g: torch.Tensor, emb: torch.Tensor, start: int, state: ChainState) -> torch.Tensor:
        """The layer on n rows at positions start..start+n-1 (causal over state[:start + n]):
        (n, d) inputs g and token embeddings -> (n, d) pre-norm outputs."""
        c = self.cfg
        n = g.shape[0]
        state.ensure(start + n)
        mods = self._fast_mods()
        if mods["kernels"]:
            cos, sin = self._rope_table(start + n, signed=True)
            ie, hn = self.input_layernorm, self.hidden_norm
            h = mods["qkv_e"](emb.contiguous(), norm=ie.weight, eps=ie.eps)
            h = mods["qkv_g"](g.contiguous(), norm=hn.weight, eps=hn.eps, residual=h)
            q = torch.ops.clp.rope_store(h, cos[start : start + n], sin[start : start + n], state.k, state.v, start,
                                         c.num_heads)
            a = torch.ops.clp.decode_attention(q, state.k, state.v, start, None, c.head_dim ** -0.5)
            x = mods["o"](a.view(n, -1), residual=g.contiguous())
            h = mods["mlp_in"](x, norm=self.post_attention_layernorm.weight, eps=self.post_attention_layernorm.eps)
            return mods["down"](h, act="silu", residual=x)
        cos, sin = self._rope_table(start + n)
        cos, sin = cos[start : start + n], sin[start : start + n]
        u = torch.cat([self.input_layernorm(emb), self.hidden_norm(g)], -1)
        q = apply_rope(self.q_proj(u).view(1, n, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(u).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1), cos, sin)
        state.k[:, start : start + n] = k
        state.v[:, start : start + n] = self.v_proj(u).view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)
        mask = torch.ones(n, start + n, dtype=torch.bool).tril(start) if n > 1 else None
        keys, vals = state.k[None, :, : start + n], state.v[None, :, : start + n]
        x = g + self.o_proj(self._attend(q, keys, vals, mask)[0])
        return self._mlp(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._fast_mods()
        if mods["kernels"]:
            return mods["head"](x.contiguous(), norm=self.norm.weight, eps=self.norm.eps)
        return self.logits(x)

    def session(self) -> ChainSession:
        """Per-generation drafting state: the chain's session, fed the backbone's aux-layer rows
        (observe) instead of its last states; extend/draft_candidates have the chain's interface."""
        return ChainSession(self)

    def new_state(self) -> ChainState:
        return ChainState(self.cfg)

    @torch.inference_mode()
    def extend(self, state: ChainState, aux: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Add context entries (fc(aux_j), x_{j+1}) for the next len(tokens) positions; returns
        (d,) the output at the last one (its draft is the token after the last of `tokens`)."""
        mods = self._fast_mods()
        g = mods["fc"](aux.float().contiguous()) if mods["kernels"] else self.fc(aux.float())
        emb = self._embed[torch.tensor(tokens)].float()
        L0 = state.length
        x = self._step(g, emb, L0, state)
        state.length = L0 + len(tokens)
        return x[-1]

    @torch.inference_mode()
    def draft_candidates(self, state: ChainState, x: torch.Tensor, steps: int,
                         width: int = 1) -> list[list[tuple[int, float]]]:
        """Greedy chain from the output x of extend(), with runners-up per depth (as
        ChainedHeads.draft_candidates); the chain's own cache entries go past the context."""
        out: list[list[tuple[int, float]]] = []
        L0 = state.length
        for s in range(steps):
            top = top_candidates(self._head(x[None]), self.draft_ids, width)[0]
            out.append(top)
            if s + 1 == steps:
                break
            x = self._step(x[None], self._embed[top[0][0]][None].float(), L0 + s, state)[0]
        return out


__all__ = ["Eagle3Config", "Eagle3Drafter", "default_aux_layers"]
