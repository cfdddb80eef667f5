"""A chained (sequential) MTP module: one small block applied k times.

The design family of DeepSeek-V3's MTP modules and EAGLE's draft layer, kept under
Backbone-as-Architect: the backbone's LM head emits t+1; the chain drafts t+2 .. t+1+k.

One block, shared by every step::

    x = fc([RMSNorm(f) ; RMSNorm(e(token))])        # (.., 2d) -> (.., d)
    x = x + Attn(RMSNorm(x))                         # optional: over the drafter's own states
    x = x + MLP(RMSNorm(x))                          # SwiGLU, as the backbone's
    g = RMSNorm(x)                                   # a feature in the backbone's post-norm space
    logits = g @ E[draft_ids].T                      # the backbone's frozen LM head, draft rows

Step 1 reads (f_t, e(x_{t+1})): the backbone's post-norm state at t and the token it just
chose, and predicts t+2. Step s reads the previous step's feature g and the token it
drafted. With ``attention`` the block attends over the drafter's entries for every earlier
position (f_j, e(x_{j+1})), j <= t, kept in a small KV cache of its own, plus the chain's
own earlier entries of this step (as EAGLE's draft layer does); without it each step is a
position-wise MLP block (cheaper, no cache).

Training (``forward_train``) is teacher-forced and unrolled ("training-time test", as in
EAGLE-3 / HASS): step s at chain start j reads step s-1's *own* output feature and the
text's token x_{j+s}, and its query attends to the step-1 entries 0..j and to the chain's
entries 2..s at j. That is exactly what it attends to at inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modules import top_candidates


def grouped_attention(q, k, v, mask, num_kv_heads: int) -> torch.Tensor:
    """Grouped-query SDPA: q (B,H,T,hd), k/v (B,KV,S,hd), mask (T,S), (B,1,T,S) bool or None
    -> (B,T,H*hd). The query group is folded into the query length: K/V are never expanded."""
    B, H, T, hd = q.shape
    group = H // num_kv_heads
    qg = q.reshape(B, num_kv_heads, group * T, hd)
    if mask is not None:  # None: a single query that sees every key
        mask = mask.repeat(group, 1) if mask.dim() == 2 else mask.repeat(1, 1, group, 1)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return o.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)


class UnrolledAttention:
    """The attention memory of a training-time-test unroll over whole sequences (chain and
    EAGLE-3 alike): each call adds one step's keys and values, and step s's query at start j
    sees step 1's entries 0..j and every later step's entry at j, as incremental drafting
    from start j would."""

    def __init__(self, L: int, device, num_kv_heads: int):
        self.causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        self.eye = torch.eye(L, dtype=torch.bool, device=device)
        self.num_kv_heads = num_kv_heads
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __call__(self, q, k, v) -> torch.Tensor:
        self.keys.append(k)
        self.values.append(v)
        mask = torch.cat([self.causal] + [self.eye] * (len(self.keys) - 1), dim=1)  # (L, steps L)
        return grouped_attention(q, torch.cat(self.keys, 2), torch.cat(self.values, 2), mask, self.num_kv_heads)


@dataclass
class ChainConfig:
    k: int = 4  # draft steps (tokens t+2 .. t+1+k)
    hidden_size: int = 576  # d, the backbone's hidden size
    num_heads: int = 9  # attention heads (the backbone's, so the block is a Llama layer)
    num_kv_heads: int = 3  # grouped K/V heads
    head_dim: int = 64
    intermediate_size: int = 1536  # SwiGLU width
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5
    attention: bool = True  # False: position-wise block, no drafter KV cache
    draft_vocab: int = 8192  # LM-head rows the chain may propose (0 = all)
    design: str = "chained"

    def __post_init__(self):
        if not 1 <= self.k <= 8:
            raise ValueError(f"k must be in 1..8, got {self.k}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @classmethod
    def from_backbone_config(cls, cfg, **kw) -> "ChainConfig":
        heads = cfg.num_attention_heads
        return cls(hidden_size=cfg.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   intermediate_size=cfg.intermediate_size,
                   rope_theta=float(getattr(cfg, "rope_theta", None) or
                                    (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
                   rms_eps=float(getattr(cfg, "rms_norm_eps", 1e-5)), **kw)

    def as_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dtype == torch.float32:  # drafting: one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(pos: torch.Tensor, hd: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(.., T) positions -> cos, sin (.., T, hd) of Llama's rotate-half rotary embedding."""
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=pos.device, dtype=torch.float32) / hd))
    ang = pos.to(torch.float32)[..., None] * inv  # (.., T, hd/2)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    hd = x.shape[-1]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half form). x: (B, H, T, hd); pos: (B, T) or (T,)."""
    cos, sin = rope_cos_sin(pos, x.shape[-1], theta)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


def drafting_rope_table(module: nn.Module, n: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (>= n, hd) of a drafter (its cfg.head_dim, cfg.rope_theta) for positions 0..,
    cached on the module; drafting reads rows of it. signed: sin with its first half negated
    (rotate_half folded in, as clp::rope_store takes it)."""
    table = module.__dict__.get("_rope")
    if table is None or table[0].shape[0] < n:
        size = max(n, 2 * table[0].shape[0] if table is not None else 1024)
        cos, sin = rope_cos_sin(torch.arange(size), module.cfg.head_dim, module.cfg.rope_theta)
        signed_sin = sin.clone()
        signed_sin[:, : module.cfg.head_dim // 2].neg_()
        table = (cos, sin, signed_sin)
        module.__dict__["_rope"] = table
    return (table[0], table[2]) if signed else table[:2]


class ChainState:
    """Per-generation state of a chain with attention: its KV cache over earlier positions."""

    def __init__(self, cfg: ChainConfig, capacity: int = 256):
        self.cfg = cfg
        self.k = torch.zeros(cfg.num_kv_heads, capacity, cfg.head_dim)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # entries 0..length-1 are the true context (f_j, x_{j+1})

    def ensure(self, n: int) -> None:
        if n > self.k.shape[1]:
            cap = max(n, 2 * self.k.shape[1])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.zeros(old.shape[0], cap, old.shape[2])
                new[:, : old.shape[1]] = old
                setattr(self, name, new)


class ChainedHeads(nn.Module):
    """The chained drafter. ``cfg.k`` steps; projects through frozen LM-head draft rows."""

    def __init__(self, cfg: ChainConfig):
        super().__init__()
        self.cfg = cfg
        d, eps = cfg.hidden_size, cfg.rms_eps
        self.norm_feature = RMSNorm(d, eps)
        self.norm_token = RMSNorm(d, eps)
        self.fc = nn.Linear(2 * d, d, bias=False)
        if cfg.attention:
            self.norm_attn = RMSNorm(d, eps)
            self.q_proj = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
            self.k_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
            self.v_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
            self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=False)
        self.norm_mlp = RMSNorm(d, eps)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.norm_out = RMSNorm(d, eps)
        self.register_buffer("draft_ids", torch.zeros(0, dtype=torch.long))
        self.proj: torch.Tensor | None = None  # (Vd, d) LM-head rows, bound by attach()
        self._embed = None  # (V, d) input embedding table, bound by attach()

    # ---- set-up (the same interface as MTPHeads) -------------------------------------
    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        self.draft_ids = draft_ids.to(torch.long).clone()

    def attach(self, lm_head_weight: torch.Tensor, embed_weight: torch.Tensor | None = None) -> "ChainedHeads":
        """Bind the frozen LM-head rows of the draft vocabulary and the embedding table."""
        if self.draft_ids.numel() == 0:
            self.draft_ids = torch.arange(lm_head_weight.shape[0])
        self.proj = lm_head_weight.detach()[self.draft_ids.to(lm_head_weight.device)].float().contiguous()
        self._embed = (embed_weight if embed_weight is not None else lm_head_weight).detach()
        return self

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- the block ----------------------------------------------------------------------
    def _input(self, feature: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.norm_feature(feature), self.norm_token(token_emb)], -1))

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        """(B, T, d) residual stream, (B, T) positions -> q (B,H,T,hd), k, v (B,KV,T,hd)."""
        c = self.cfg
        h = self.norm_attn(x)
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta), v

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        return grouped_attention(q, k, v, mask, self.cfg.num_kv_heads)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_mlp(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.norm_out(x)

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """(.., d) chain features -> (.., Vd) logits over the draft vocabulary."""
        if self.proj is None:
            raise RuntimeError("the chain is not attached to a backbone: call attach()")
        return g.float() @ self.proj.to(g.device).T

    # ---- training: teacher-forced, unrolled ---------------------------------------------
    def forward_train(self, features: torch.Tensor, next_tokens_emb: list[torch.Tensor],
                      steps: int | None = None, own_tokens: bool = False) -> list[torch.Tensor]:
        """Unrolled chain over whole sequences.

        Args:
            features: (B, L, d) backbone post-norm states f_0..f_{L-1}.
            next_tokens_emb: for step s (1-based), (B, L, d) embeddings of x_{j+s} at chain
                start j (the text's tokens; rows past the end are padding). With
                ``own_tokens``, only step 1's is used and later steps embed the chain's
                own top-1 drafts (evaluation of what inference would propose).
            steps: number of unrolled steps (default cfg.k).
        Returns:
            A list of `steps` tensors (B, L, d): step s's output feature at chain start j,
            which predicts token x_{j+s+1} (its target: the backbone's distribution at
            position j+s, and the feature f_{j+s}).
        """
        c = self.cfg
        steps = steps or c.k
        B, L, _ = features.shape
        dev = features.device
        pos = torch.arange(L, device=dev)
        outs: list[torch.Tensor] = []
        feat = features
        memory = UnrolledAttention(L, dev, c.num_kv_heads)
        emb = next_tokens_emb[0]
        for s in range(steps):
            x = self._input(feat, emb)
            if c.attention:
                q, k, v = self._qkv(x, (pos + s).expand(B, L))
                x = x + self.o_proj(memory(q, k, v))
            g = self._finish(x)
            outs.append(g)
            feat = g
            if s + 1 < steps:
                if own_tokens:
                    emb = self._embed[self.draft_ids[self.logits(g).argmax(-1)]].to(g.dtype)
                else:
                    emb = next_tokens_emb[s + 1]
        return outs

    # ---- inference (batch 1) -------------------------------------------------------------
    # Drafting runs the block on 1..n rows at a time, where per-call overhead and weight
    # reads dominate: it uses fused copies of the linears (q/k/v in one, gate/up in one, the
    # draft LM-head rows as a Linear), optionally dynamically quantised (fbgemm, fp32
    # activations; Drafter.attach picks int8 under reduced numerics). Training never
    # touches these copies.
    def prepare_inference(self, dtype: torch.dtype | str | None = None) -> dict:
        """Build the fused drafting linears, dynamically quantised to `dtype` (torch.float16
        or torch.qint8; None keeps fp32), or "q8": 8-bit groups of 32 on the C++ kernels
        (backbone/kernels.py) with the RMSNorms, SiLU * up and residuals fused into the
        products and the kernels' attention; returns them."""
        if self.proj is None:
            raise RuntimeError("the chain is not attached to a backbone: call attach()")
        if dtype == "q8":
            from ..backbone import kernels

            if kernels.load() is not None:
                return self._prepare_kernels()
            dtype = torch.qint8

        def lin(*weights):
            w = torch.cat([x.detach().float() for x in weights], 0)
            m = nn.Linear(w.shape[1], w.shape[0], bias=False)
            m.weight = nn.Parameter(w.clone(), requires_grad=False)
            return m

        mods = nn.ModuleDict({"fc": lin(self.fc.weight), "mlp_in": lin(self.gate_proj.weight, self.up_proj.weight),
                              "down": lin(self.down_proj.weight), "head": lin(self.proj)})
        if self.cfg.attention:
            mods["qkv"] = lin(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            mods["o"] = lin(self.o_proj.weight)
        if dtype is not None:
            import warnings

            from torch.ao.quantization import quantize_dynamic

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.quantized.engine = "fbgemm"
                quantize_dynamic(mods, {nn.Linear}, dtype=dtype, inplace=True)
        self.__dict__["_fast"] = mods  # not a submodule: never saved, never trained
        return mods

    def _prepare_kernels(self) -> dict:
        from ..backbone.quant import Int8Linear, Int8Weight

        def lin(*weights):
            return Int8Linear(Int8Weight.from_float(torch.cat([w.detach().float() for w in weights], 0)))

        d = self.cfg.hidden_size
        # fc([a; b]) = fc_a(a) + fc_b(b): two products, each with its input's RMSNorm fused.
        mods = {"kernels": True, "fc_feature": lin(self.fc.weight[:, :d]), "fc_token": lin(self.fc.weight[:, d:]),
                "mlp_in": lin(self.gate_proj.weight, self.up_proj.weight),
                "down": lin(self.down_proj.weight), "head": lin(self.proj)}
        if self.cfg.attention:
            mods["qkv"] = lin(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            mods["o"] = lin(self.o_proj.weight)
        self.__dict__["_fast"] = mods
        return mods

    def train(self, mode: bool = True):
        self.__dict__.pop("_fast", None)  # weights may change: rebuild the copies when drafting
        return super().train(mode)

    def _rope_table(self, n: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return drafting_rope_table(self, n, signed)

    def _fast_mods(self) -> dict:
        return self.__dict__.get("_fast") or self.prepare_inference()

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # fbgemm's dynamic Linear (and the kernels) want a 2-D input.
        return self._fast_mods()[name](x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    def _step_kernels(self, mods: dict, feature: torch.Tensor, token_emb: torch.Tensor, start: int,
                      state: "ChainState | None") -> torch.Tensor:
        """_step on the C++ kernels: nine kernel calls per block."""
        c = self.cfg
        nf, nt = self.norm_feature, self.norm_token
        x = mods["fc_feature"](feature.contiguous(), norm=nf.weight, eps=nf.eps)  # (n, d)
        x = mods["fc_token"](token_emb.contiguous(), norm=nt.weight, eps=nt.eps, residual=x)
        if c.attention:
            n = x.shape[0]
            cos, sin = self._rope_table(start + n, signed=True)
            state.ensure(start + n)
            h = mods["qkv"](x, norm=self.norm_attn.weight, eps=self.norm_attn.eps)
            q = torch.ops.clp.rope_store(h, cos[start : start + n], sin[start : start + n], state.k, state.v, start,
                                         c.num_heads)
            a = torch.ops.clp.decode_attention(q, state.k, state.v, start, None, c.head_dim ** -0.5)
            x = mods["o"](a.view(n, -1), residual=x)
        h = mods["mlp_in"](x, norm=self.norm_mlp.weight, eps=self.norm_mlp.eps)
        x = mods["down"](h, act="silu", residual=x)
        return torch.ops.clp.rms_norm(x, self.norm_out.weight, self.norm_out.eps)

    def _step(self, feature: torch.Tensor, token_emb: torch.Tensor, start: int,
              state: "ChainState | None") -> torch.Tensor:
        """One block on n rows at positions start..start+n-1: (n, d) inputs -> (n, d) features.

        With attention, the rows' K/V are written into `state` at those positions (past its
        length for the chain's own entries) and row i attends to state[:start + i + 1]
        (causal). Nothing is concatenated: the cache is preallocated.
        """
        mods = self._fast_mods()
        if "kernels" in mods:
            return self._step_kernels(mods, feature, token_emb, start, state)
        c = self.cfg
        x = self._run("fc", torch.cat([self.norm_feature(feature), self.norm_token(token_emb)], -1))  # (n, d)
        if c.attention:
            n = x.shape[0]
            cos, sin = self._rope_table(start + n)
            cos, sin = cos[start : start + n], sin[start : start + n]
            qkv = self._run("qkv", self.norm_attn(x))
            q, k, v = qkv.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                 c.num_kv_heads * c.head_dim], -1)
            q = apply_rope(q.view(1, n, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
            state.ensure(start + n)
            state.k[:, start : start + n] = apply_rope(k.view(n, c.num_kv_heads, c.head_dim).transpose(0, 1),
                                                       cos, sin)
            state.v[:, start : start + n] = v.view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)
            keys, vals = state.k[None, :, : start + n], state.v[None, :, : start + n]
            mask = torch.ones(n, start + n, dtype=torch.bool).tril(start) if n > 1 else None
            x = x + self._run("o", self._attend(q, keys, vals, mask)[0])
        h = self.norm_mlp(x)
        gate, up = self._run("mlp_in", h).chunk(2, -1)
        x = x + self._run("down", F.silu(gate) * up)
        return self.norm_out(x)

    def session(self) -> "ChainSession":
        """Per-generation drafting state (see ChainSession)."""
        return ChainSession(self)

    def new_state(self) -> ChainState | None:
        return ChainState(self.cfg) if self.cfg.attention else None

    @torch.inference_mode()
    def extend(self, state: ChainState | None, features: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Add true context entries (f_j, x_{j+1}) for the next len(tokens) positions.

        Args:
            features: (n, d) backbone states of positions state.length .. +n-1.
            tokens: the n tokens that followed them.
        Returns:
            (d,) the chain's step-1 feature at the last entry (it predicts the token after
            the last of `tokens`).
        """
        emb = self._embed[torch.tensor(tokens)].float()
        if not self.cfg.attention:
            return self._step(features[-1:].float(), emb[-1:], 0, None)[0]
        n, L0 = len(tokens), state.length
        g = self._step(features.float(), emb, L0, state)
        state.length = L0 + n
        return g[-1]

    @torch.inference_mode()
    def draft(self, state: ChainState | None, g: torch.Tensor, steps: int) -> list[int]:
        """Greedy chain from step-1 feature g (from extend): `steps` draft token ids."""
        return [c[0][0] for c in self.draft_candidates(state, g, steps)]

    @torch.inference_mode()
    def draft_candidates(self, state: ChainState | None, g: torch.Tensor, steps: int,
                         width: int = 1) -> list[list[tuple[int, float]]]:
        """Greedy chain from step-1 feature g, with the runners-up at every depth.

        The chain's own entries go past the true context's length, which does not move:
        the next extend overwrites them.

        Args:
            g: (d,) step-1 feature from extend().
            steps: chain length (depths 1..steps); the chain follows each depth's top-1.
            width: candidates kept per depth (1 = the top-1 alone, no softmax computed).
        Returns:
            Per depth, [(token id, probability under the chain), ...] best first; the
            probability is nan when width is 1.
        """
        out: list[list[tuple[int, float]]] = []
        L0 = state.length if state is not None else 0
        for s in range(steps):
            top = top_candidates(self._run("head", g[None]), self.draft_ids, width)[0]
            out.append(top)
            if s + 1 == steps:
                break
            token = top[0][0]
            g = self._step(g[None], self._embed[token][None].float(), L0 + s, state)[0]
        return out


class ChainSession:
    """One generation's drafting with a chain (or an EAGLE-3 drafter, whose rows are the
    backbone's aux-layer inputs): feed it the backbone's states as they come.

    ``observe(rows, tokens)``: new backbone states, and the tokens that followed every row
    but the last (the last row's token is chosen at the next ``propose``).
    ``propose(hidden, token, m)``: the backbone chose `token` after the last observed row;
    return m drafts for the tokens after it.

    A step that drafts nothing (m = 0: CLP expects no draft to be kept, lookup drafts instead,
    or a scheduler gives the rows to other requests) costs the drafter nothing: its rows and
    tokens wait, and the next step that drafts runs the chain over all of them at once.
    """

    def __init__(self, chain: ChainedHeads):
        self.chain = chain
        self.state = chain.new_state()
        self.rows: list[torch.Tensor] = []  # context entries not yet run through the chain
        self.tokens: list[int] = []  # the tokens after them (one fewer while a proposal is due)

    def observe(self, rows: torch.Tensor, tokens: list[int]) -> None:
        if len(self.rows) != len(self.tokens):  # the previous last row's token comes with propose()
            raise RuntimeError("observe() twice without propose()")
        if len(tokens) != len(rows) - 1:
            raise ValueError(f"{len(rows)} rows need {len(rows) - 1} following tokens, got {len(tokens)}")
        if self.state is None:  # without attention only the last entry matters (no cache to fill)
            self.rows, self.tokens = [rows[-1]], []
        else:
            self.rows += list(rows)
            self.tokens += list(tokens)

    def propose(self, hidden: torch.Tensor, token: int, m: int) -> list[int]:
        return [c[0][0] for c in self.candidates(hidden, token, m)]

    def candidates(self, hidden: torch.Tensor, token: int, m: int, width: int = 1) -> list[list[tuple[int, float]]]:
        """As propose, with up to `width` (token, probability) candidates per depth (a draft
        tree's siblings); candidate 0 of each depth is what propose returns."""
        if not self.rows:
            self.rows = [hidden]
        self.tokens.append(token)
        if m <= 0:
            return []  # nothing drafted: the chain catches up at the next step that drafts
        g = self.chain.extend(self.state, torch.stack(self.rows), self.tokens)
        self.rows, self.tokens = [], []
        return self.chain.draft_candidates(self.state, g, m, width)


__all__ = ["ChainConfig", "ChainedHeads", "ChainState", "ChainSession", "rope"]
