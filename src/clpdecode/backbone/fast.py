"""A lean decode forward for the Llama family (SmolLM2) and Qwen2, in the manner of
gpt-fast's model.py.

The transformers module stack costs ~20 ms per 1-token step on this CPU even without a
cache (fp16 numerics, of which the linears are ~8-10 ms), and its DynamicCache and
`repeat_kv` copy the cache on every step. This forward reads the weights of the loaded
transformers model (nothing is retrained or converted on disk) and runs:

- fused projections: one QKV linear and one gate/up linear per layer (fewer, larger
  GEMMs), quantised the way the backbone's numerics say (fp32, fbgemm fp16 weights with
  fp32 activations, fbgemm dynamic int8), the output and down projections as loaded;
- RMSNorm as one op, rotary tables precomputed by the model's own rotary module;
- our static KV cache (cache.py) and copy-free grouped-query attention (attention.py).

It returns the post-norm hidden states, as the transformers trunk does; the transformers
model stays the reference (tests compare the two) and the path for other architectures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import gqa_attention_folded, prefill_attention, prepare_mask
from .cache import StaticKVCache
from .quant import QuantLinear, kernel_linear

LEAN_MODEL_TYPES = ("llama", "qwen2")
# Rotary variants whose tables depend only on the position (not on the sequence length).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def lean_unsupported_reason(model: nn.Module) -> str | None:
    """None when the lean forward can run `model`, else why not (it then uses transformers)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
        return f"architecture {getattr(cfg, 'model_type', '?')!r} (lean forward: {', '.join(LEAN_MODEL_TYPES)})"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _STATIC_ROPE:
        return f"rope type {rope_type!r}"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window layers"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {cfg.hidden_act!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    return None


# ---- linears -----------------------------------------------------------------------------
def _numerics_of(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return "fp32"
    if isinstance(mod, QuantLinear):
        return mod.kind
    packed = getattr(mod, "_packed_params", None)
    if packed is not None:
        return {torch.float16: "fp16", torch.qint8: "int8"}[packed.dtype]
    raise TypeError(f"not a linear layer: {type(mod).__name__}")


class LinearOp:
    """y = x W^T + b on 2-D fp32 activations, with the numerics of the modules it came from.

    Built from one or several linears that read the same input (QKV, gate/up): their
    output rows are concatenated into one weight, so one GEMM replaces several.
    - fp32: plain weights (F.linear);
    - fp16: fbgemm fp16 weights, fp32 activations (rows stay independent);
    - int8: fbgemm dynamic int8. Each source keeps its own per-tensor weight scale (the
      fused weight is per-channel with those scales), and activations are quantised per
      tensor exactly as in each source module, so results equal the separate linears'.
    """

    def __init__(self, mods: list[nn.Module], bf16: bool = False):
        kinds = {_numerics_of(m) for m in mods}
        if kinds == {"q4", "q8"}:  # a GGUF may store q/k in 4 bits and v in more: no fusing
            kinds = {"mixed"}
        if len(kinds) != 1:
            raise ValueError(f"mixed numerics in one fused linear: {kinds}")
        self.kind = kinds.pop()
        biases = [_bias(m) for m in mods]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(_out_features(m))
                              for b, m in zip(biases, mods)]).float().contiguous()
        self.out_features = sum(_out_features(m) for m in mods)
        if self.kind == "fp32":
            w = torch.cat([m.weight.detach() for m in mods]) if len(mods) > 1 else mods[0].weight.detach()
            self.bf16 = bf16
            if bf16:
                self.weight = w.to(torch.bfloat16).contiguous()
                self.bias = bias.to(torch.bfloat16) if bias is not None else None
            else:
                self.weight, self.bias = w.contiguous(), bias
        elif self.kind == "fp16":
            w = torch.cat([m.weight() for m in mods]).float().contiguous()
            self.packed = torch.ops.quantized.linear_prepack_fp16(w, bias)
        elif self.kind in ("q4", "q8"):  # the sources' groups stacked row-wise: the same numbers
            self.kernel = kernel_linear(type(mods[0].weight_q).cat([m.weight_q for m in mods]), bias)
        elif self.kind == "mixed":
            self.kernel = _Concat([kernel_linear(m.weight_q, m.bias_q) for m in mods])
        else:  # int8
            qws = [m.weight() for m in mods]
            if len(qws) == 1:
                qw = qws[0]
            else:
                if any(q.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric) for q in qws):
                    raise ValueError("int8 fusion expects per-tensor weight scales")
                ints = torch.cat([q.int_repr() for q in qws])
                scales = torch.cat([torch.full((q.shape[0],), q.q_scale(), dtype=torch.double) for q in qws])
                zps = torch.cat([torch.full((q.shape[0],), q.q_zero_point(), dtype=torch.long) for q in qws])
                qw = torch._make_per_channel_quantized_tensor(ints, scales, zps, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
            self.reduce_range = getattr(mods[0], "version", 4) is None or mods[0].version >= 4

        # One plain callable per linear (no dispatch on the kind at every call).
        if self.kind == "fp32" and self.bf16:
            self.fn = lambda x, w=self.weight, b=self.bias: F.linear(x.to(torch.bfloat16), w, b).float()
        elif self.kind == "fp32":
            self.fn = lambda x, w=self.weight, b=self.bias: F.linear(x, w, b)
        elif self.kind == "fp16":
            self.fn = lambda x, op=torch.ops.quantized.linear_dynamic_fp16.default, p=self.packed: op(x, p)
        elif self.kind in ("q4", "q8", "mixed"):
            self.fn = self.kernel
        else:
            self.fn = (lambda x, op=torch.ops.quantized.linear_dynamic.default, p=self.packed, r=self.reduce_range:
                       op(x, p, r))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _Concat:
    """Kernel linears that read the same input but cannot be fused (4- and 8-bit sources):
    called one after the other, outputs concatenated. The same interface as KernelLinear."""

    def __init__(self, parts: list):
        self.parts = parts
        self.native = all(p.native for p in parts)

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, act=None,
                 residual=None) -> torch.Tensor:
        if residual is not None:
            raise ValueError("a residual needs a single product")
        return torch.cat([p(x, norm=norm, eps=eps, act=act) for p in self.parts], -1)


def _bias(m: nn.Module) -> torch.Tensor | None:
    if isinstance(m, QuantLinear):
        return m.bias_q
    b = m.bias() if callable(getattr(m, "bias", None)) else getattr(m, "bias", None)
    return None if b is None else b.detach()


def _out_features(m: nn.Module) -> int:
    return m.out_features


# ---- the forward -------------------------------------------------------------------------
class _Layer:
    def __init__(self, layer: nn.Module, bf16: bool):
        a, mlp = layer.self_attn, layer.mlp
        self.in_norm = layer.input_layernorm.weight.detach()
        self.post_norm = layer.post_attention_layernorm.weight.detach()
        self.in_eps = layer.input_layernorm.variance_epsilon
        self.post_eps = layer.post_attention_layernorm.variance_epsilon
        self.qkv = LinearOp([a.q_proj, a.k_proj, a.v_proj], bf16)
        self.o = LinearOp([a.o_proj], bf16)
        self.gate_up = LinearOp([mlp.gate_proj, mlp.up_proj], bf16)
        self.down = LinearOp([mlp.down_proj], bf16)
        self.scale = getattr(a, "scaling", None)


class LeanForward:
    """The trunk of a Llama/Qwen2 transformers model as a handful of fused ops per layer.

    Build it after the model's numerics are set (quantised in place or not): it copies the
    projections it fuses and reads the others as they are.
    """

    def __init__(self, model: nn.Module, bf16: bool = False, native: bool = False,
                 kv_dtype: torch.dtype = torch.float32):
        """native: run batch-1 steps of a q4 model on the fused C++ kernels (kernels.py;
        row-invariant, attention chunked over keys). kv_dtype: the cache's dtype (float16
        halves what attention reads)."""
        reason = lean_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not support this model: {reason}")
        cfg = model.config
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight.detach()
        self.norm_eps = inner.norm.variance_epsilon
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden_size = cfg.hidden_size
        self.layers = [_Layer(layer, bf16) for layer in inner.layers]
        self.bf16 = bf16
        self.kv_dtype = kv_dtype
        # The fused C++ path: every projection on the q4 kernel, whole tiles of 4 outputs.
        self.native = native and all(
            op.kind in ("q4", "q8", "mixed") and op.kernel.native
            for layer in self.layers for op in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self._cos = self._sin = None
        self._table_len = 0

    # ---- cache and rotary tables ----------------------------------------------------------
    def new_cache(self, batch: int = 1, capacity: int = 0, chunk: int = 256) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, self.n_kv, self.head_dim, capacity=capacity, chunk=chunk,
                             dtype=self.kv_dtype)

    def _rope_tables(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape (>= upto, head_dim), from the model's own rotary module."""
        if upto > self._table_len:
            n = -(-upto // 1024) * 1024
            pos = torch.arange(n)[None, :]
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), pos)
            sin = sin[0].float().clone()
            sin[:, : self.head_dim // 2].neg_()  # rotate_half's sign folded into the table
            self._cos, self._sin, self._table_len = cos[0].float(), sin, n
        return self._cos, self._sin

    # ---- forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: StaticKVCache, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run the new tokens through every layer, writing their K/V at [cache.length, +T).

        Args:
            input_ids: (B, T) token ids.
            cache: a StaticKVCache; its length grows by T.
            mask: optional bool (T, L + T) or (B, T, L + T) attention mask (True = attend);
                default: causal (token i at position L + i sees keys 0 .. L + i).
            positions: optional (T,) rotary positions of the new tokens (default L .. L+T-1),
                for draft trees whose nodes share depths.
        Returns:
            (B, T, d) post-norm hidden states.
        """
        b, t = input_ids.shape
        start = cache.length
        cache.ensure_batch(b)
        cache.reserve(t)
        if positions is None:
            cos, sin = self._rope_tables(start + t)
            cos, sin = cos[start : start + t], sin[start : start + t]
        else:
            cos, sin = self._rope_tables(int(positions.max()) + 1)
            cos, sin = cos[positions], sin[positions]
        if self.native and b == 1:
            step_mask = _step_mask(mask, start, t)
            if step_mask is not False:
                return self._forward_native(input_ids, cache, cos, sin, step_mask)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, hd)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        # A prompt from position 0 with the causal mask takes SDPA's is_causal path; any
        # other step gets its folded mask built once here, shared by the layers.
        prefill = start == 0 and t > 1 and mask is None and positions is None
        folded = None if prefill else prepare_mask(mask, t, start + t, nh // nkv)
        x = self.embed_tokens(input_ids).reshape(b * t, -1).float()  # (N, d), N = B*T
        d, end, half, nq = x.shape[-1], start + t, hd // 2, nh + nkv
        pos = torch.arange(start, end)  # cache slots of the new tokens
        rms_norm, roll, addcmul, attend = F.rms_norm, torch.roll, torch.addcmul, gqa_attention_folded
        for layer, kb, vb in zip(self.layers, cache.keys, cache.values):
            h = rms_norm(x, (d,), layer.in_norm, layer.in_eps)
            qkv = layer.qkv.fn(h).view(b, t, nq + nkv, hd)
            qk = qkv[:, :, :nq]
            # Rotary on queries and keys at once: x * cos + rotate_half(x) * sin, where
            # rotate_half(x) * sin = roll(x, hd/2) * [-sin_1, sin_2] (sin is signed so).
            qk = addcmul(qk * cos, roll(qk, half, -1), sin)  # (B, T, nh + nkv, hd)
            k_new, v_new = qk[:, :, nh:].transpose(1, 2), qkv[:, :, nq:].transpose(1, 2)  # (B, nkv, T, hd)
            kb.index_copy_(2, pos, k_new.to(kb.dtype))  # in place, at the step's slots
            vb.index_copy_(2, pos, v_new.to(vb.dtype))
            q = qk[:, :, :nh].transpose(1, 2)
            if prefill:  # from the new keys themselves (exact whatever the cache's dtype)
                att = prefill_attention(q, k_new, v_new, layer.scale)
            else:  # SDPA reads fp32 (a reduced-precision cache is widened: batched steps only)
                att = attend(q, kb[:, :, :end].float(), vb[:, :, :end].float(), folded, layer.scale)
            x = x + layer.o.fn(att.reshape(b * t, nh * hd))
            h = rms_norm(x, (d,), layer.post_norm, layer.post_eps)
            gu = layer.gate_up.fn(h)
            inter = gu.shape[-1] // 2
            x = x + layer.down.fn(F.silu(gu[:, :inter]) * gu[:, inter:])
        cache.advance(t)
        return F.rms_norm(x, (d,), self.norm, self.norm_eps).view(b, t, -1)

    def _forward_native(self, input_ids: torch.Tensor, cache: StaticKVCache, cos: torch.Tensor, sin: torch.Tensor,
                        step_mask: torch.Tensor | None) -> torch.Tensor:
        """Batch 1 on the C++ kernels: six fused ops per layer (RMSNorm into the QKV product,
        rotary with the cache write, attention, the output product with its residual, RMSNorm
        into gate/up, SiLU * up into the down product with its residual). Every op is
        row-invariant, so a T-token step equals T one-token steps bit for bit."""
        t, start = input_ids.shape[1], cache.length
        x = self.embed_tokens(input_ids[0]).float()  # (T, d)
        rope_store = torch.ops.clp.rope_store.default
        attention = torch.ops.clp.decode_attention.default
        nh, scale = self.n_heads, self.head_dim ** -0.5
        cos, sin = cos.contiguous(), sin.contiguous()
        for layer, kb, vb in zip(self.layers, cache.keys, cache.values):
            h = layer.qkv.kernel(x, norm=layer.in_norm, eps=layer.in_eps)
            q = rope_store(h, cos, sin, kb[0], vb[0], start, nh)
            a = attention(q, kb[0], vb[0], start, step_mask, layer.scale or scale)
            x = layer.o.kernel(a.view(t, -1), residual=x)
            h = layer.gate_up.kernel(x, norm=layer.post_norm, eps=layer.post_eps)
            x = layer.down.kernel(h, act="silu", residual=x)
        cache.advance(t)
        return torch.ops.clp.rms_norm(x, self.norm, self.norm_eps).view(1, t, -1)


def _step_mask(mask: torch.Tensor | None, start: int, t: int):
    """The (T, T) mask over a step's own tokens that clp::decode_attention takes (None: causal),
    or False when `mask` does not see the whole cache (then SDPA runs the step)."""
    if mask is None:
        return None
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            return False
        mask = mask[0]
    if not bool(mask[:, :start].all()):
        return False
    return mask[:, start:].contiguous()
