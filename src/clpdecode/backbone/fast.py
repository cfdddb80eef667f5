"""A lean decode forward for the Llama family (SmolLM2), Qwen2 and Gemma 3, in the manner of
gpt-fast's model.py.

The transformers module stack costs ~20 ms per 1-token step on this CPU even without a
cache (fp16 numerics, of which the linears are ~8-10 ms), and its DynamicCache and
`repeat_kv` copy the cache on every step. This forward reads the weights of the loaded
transformers model (nothing is retrained or converted on disk) and runs:

- fused projections: one QKV linear and one gate/up linear per layer (fewer, larger
  GEMMs), quantised the way the backbone's numerics say (fp32, fbgemm fp16 weights with
  fp32 activations, fbgemm dynamic int8), the output and down projections as loaded;
- RMSNorm as one op, rotary tables precomputed by the model's own rotary module (one per
  layer type for Gemma 3, whose sliding-window and global layers rotate differently);
- Gemma 3's extras: (1 + w) norms, norms after attention and MLP, per-head q/k norms,
  tanh-GELU, sliding-window layers (masks from positions, so rollback needs nothing);
- our static KV cache (cache.py) and copy-free grouped-query attention (attention.py).

It returns the post-norm hidden states, as the transformers trunk does; the transformers
model stays the reference (tests compare the two) and the path for other architectures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import causal_offset_mask, gqa_attention_folded, prefill_attention, prepare_mask
from .cache import SlotKVCache, StaticKVCache
from .quant import QuantLinear, kernel_linear, pack_dense

LEAN_MODEL_TYPES = ("llama", "qwen2", "gemma3_text")
# Rotary variants whose tables depend only on the position (not on the sequence length).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _rope_types(cfg) -> list[str]:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return ["default"]
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type (Gemma 3)
        return [v.get("rope_type", "default") for v in rope.values()]
    return [rope.get("rope_type", rope.get("type", "default"))]


def lean_unsupported_reason(model: nn.Module) -> str | None:
    """None when the lean forward can run `model`, else why not (it then uses transformers)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
        return f"architecture {getattr(cfg, 'model_type', '?')!r} (lean forward: {', '.join(LEAN_MODEL_TYPES)})"
    bad = [t for t in _rope_types(cfg) if t not in _STATIC_ROPE]
    if bad:
        return f"rope type {bad[0]!r}"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t not in _LAYER_TYPES for t in layer_types):
        return f"layer types {sorted(set(layer_types) - set(_LAYER_TYPES))}"
    if "sliding_attention" in layer_types and not getattr(cfg, "sliding_window", None):
        return "sliding-window layers without a window size"
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish", "gelu_pytorch_tanh"):
        return f"activation {act!r}"
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "use_bidirectional_attention", False):
        return "attention logit soft-capping or bidirectional attention"
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

    def __init__(self, mods: list[nn.Module]):
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
        self.bias = bias  # (N,) or None: the sources' biases side by side
        self._mods = mods if self.kind in ("q4", "q8", "mixed") else []  # for dense_weights()
        if self.kind == "fp32":
            w = torch.cat([m.weight.detach() for m in mods]) if len(mods) > 1 else mods[0].weight.detach()
            self.weight = w.contiguous()
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
        if self.kind == "fp32":
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

    def dense_weights(self) -> torch.Tensor | None:
        """The sources' dequantised weights side by side, packed for clp::dense_linear (prompt
        rows on AMX-BF16), or None where the shape does not fit its tiles."""
        if not self._mods:
            return None
        w = torch.cat([m.weight_q.dequantize().float() for m in self._mods])
        return pack_dense(w) if w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0 else None


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
    """One decoder layer's weights and settings, whatever the family.

    Norms are stored as the weight they multiply by (Gemma 3's (1 + w) precomputed, in fp32
    as Gemma computes it). attn_out_norm / mlp_out_norm: Gemma 3's norms of the attention and
    MLP outputs before their residual adds (None for Llama/Qwen2).
    """

    def __init__(self, layer: nn.Module, cfg, layer_type: str):
        a, mlp = layer.self_attn, layer.mlp
        gemma = cfg.model_type == "gemma3_text"

        def norm(m):
            w = m.weight.detach().float()
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
            return (w + 1.0 if gemma else w).contiguous(), float(eps)

        self.in_norm, self.in_eps = norm(layer.input_layernorm)
        if gemma:
            self.attn_out_norm, self.attn_out_eps = norm(layer.post_attention_layernorm)
            self.mlp_norm, self.mlp_eps = norm(layer.pre_feedforward_layernorm)
            self.mlp_out_norm, self.mlp_out_eps = norm(layer.post_feedforward_layernorm)
            (self.q_norm, self.qk_eps), (self.k_norm, _) = norm(a.q_norm), norm(a.k_norm)
        else:
            self.mlp_norm, self.mlp_eps = norm(layer.post_attention_layernorm)
            self.attn_out_norm = self.mlp_out_norm = self.q_norm = self.k_norm = None
            self.attn_out_eps = self.mlp_out_eps = self.qk_eps = 0.0
        self.act = "gelu_tanh" if gemma else "silu"
        self.window = int(cfg.sliding_window) if layer_type == "sliding_attention" else 0
        self.rope = layer_type if gemma else "default"  # which rotary table
        self.qkv = LinearOp([a.q_proj, a.k_proj, a.v_proj])
        self.o = LinearOp([a.o_proj])
        self.gate_up = LinearOp([mlp.gate_proj, mlp.up_proj])
        self.down = LinearOp([mlp.down_proj])
        self.scale = getattr(a, "scaling", None)


def _act(gu: torch.Tensor, act: str) -> torch.Tensor:
    inter = gu.shape[-1] // 2
    gate = F.silu(gu[:, :inter]) if act == "silu" else F.gelu(gu[:, :inter], approximate="tanh")
    return gate * gu[:, inter:]


class LeanForward:
    """The trunk of a Llama/Qwen2/Gemma 3 transformers model as a handful of fused ops per layer.

    Build it after the model's numerics are set (quantised in place or not): it copies the
    projections it fuses and reads the others as they are.
    """

    def __init__(self, model: nn.Module, native: bool = False, kv_dtype: torch.dtype = torch.float32):
        """native: run batch-1 steps of a q4 model on the fused C++ kernels (kernels.py;
        row-invariant, attention chunked over keys). kv_dtype: the cache's dtype (float16
        halves what attention reads)."""
        reason = lean_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not support this model: {reason}")
        cfg = model.config
        inner = model.model
        self.embed_tokens = inner.embed_tokens  # Gemma's scales by sqrt(d) itself
        self.rotary = inner.rotary_emb
        gemma = cfg.model_type == "gemma3_text"
        self.norm = (inner.norm.weight.detach().float() + (1.0 if gemma else 0.0)).contiguous()
        self.norm_eps = float(getattr(inner.norm, "variance_epsilon", getattr(inner.norm, "eps", 1e-6)))
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden_size = cfg.hidden_size
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(inner.layers)
        self.layers = [_Layer(layer, cfg, t) for layer, t in zip(inner.layers, types)]
        self._per_type_rope = gemma
        self.kv_dtype = kv_dtype
        # The fused C++ path: every projection on the kernels.
        self.native = native and all(
            op.kind in ("q4", "q8", "mixed") and op.kernel.native
            for layer in self.layers for op in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._table_len = 0
        self._plan = self._layer_plan() if self.native else None
        self._dense: list[torch.Tensor] | None = None  # prompt_weights(), built on its first call

    def _layer_plan(self) -> dict | None:
        """The model flattened for clp::layers_forward (the whole step's layers in one C++
        call), or None where a projection is padded to whole tiles (the Python loop runs)."""
        empty = torch.empty(0)
        parts, kinds, op_parts, norms, eps, windows = [], [], [], [], [], []
        for layer in self.layers:
            for op in (layer.qkv, layer.o, layer.gate_up, layer.down):
                kls = op.kernel.parts if isinstance(op.kernel, _Concat) else [op.kernel]
                for kl in kls:
                    if kl._pad:
                        return None
                    w = list(kl._weights) + [empty] * (3 - len(kl._weights))
                    parts += w + [kl.bias if kl.bias is not None else empty]
                    kinds.append(0 if len(kl._weights) == 3 else 1)
                op_parts.append(len(kls))
            for n in (layer.in_norm, layer.mlp_norm, layer.attn_out_norm, layer.mlp_out_norm, layer.q_norm,
                      layer.k_norm):
                norms.append(n if n is not None else empty)
            eps += [layer.in_eps, layer.mlp_eps, layer.attn_out_eps, layer.mlp_out_eps, layer.qk_eps]
            windows.append(layer.window)
        keys = sorted({layer.rope for layer in self.layers})
        scales = {layer.scale or self.head_dim ** -0.5 for layer in self.layers}
        if len(scales) != 1 or len({layer.act for layer in self.layers}) != 1:
            return None
        return {"parts": parts, "kinds": kinds, "op_parts": op_parts, "norms": norms, "eps": [float(e) for e in eps],
                "windows": windows, "keys": keys, "rope": [keys.index(layer.rope) for layer in self.layers],
                "scale": float(scales.pop()), "act": 1 if self.layers[0].act == "silu" else 2}

    def prompt_weights(self) -> list[torch.Tensor]:
        """Per op of every layer (qkv, o, gate_up, down) its packed bf16 weights and bias, for
        the prompt rows of a step on AMX-BF16 tiles (clp::dense_linear; kernels.amx_prompts),
        or [] where prompts take the q4 kernels like every other row. Built once, on the first
        call (Backbone makes it at load; ~2 bytes a trunk weight: ~210 MB for SmolLM2-135M)."""
        if self._dense is None:
            from .kernels import amx_prompts

            dense: list[torch.Tensor] = []
            if self._plan is not None and amx_prompts():
                empty = torch.empty(0)
                ops = [op for layer in self.layers for op in (layer.qkv, layer.o, layer.gate_up, layer.down)]
                weights = [op.dense_weights() for op in ops]
                if all(w is not None for w in weights):
                    for op, w in zip(ops, weights):
                        dense += [w, op.bias if op.bias is not None else empty]
            self._dense = dense
        return self._dense

    # ---- cache and rotary tables ----------------------------------------------------------
    def new_cache(self, batch: int = 1, capacity: int = 0, chunk: int = 256) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, self.n_kv, self.head_dim, capacity=capacity, chunk=chunk,
                             dtype=self.kv_dtype)

    def _rope_tables(self, upto: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{rope key: (cos, signed sin)} of shape (>= upto, head_dim), from the model's own
        rotary module (per layer type for Gemma 3)."""
        if upto > self._table_len:
            n = -(-upto // 1024) * 1024
            pos = torch.arange(n)[None, :]
            keys = sorted({layer.rope for layer in self.layers})
            for key in keys:
                args = (key,) if self._per_type_rope else ()
                cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), pos, *args)
                sin = sin[0].float().clone()
                sin[:, : self.head_dim // 2].neg_()  # rotate_half's sign folded into the table
                self._tables[key] = (cos[0].float().contiguous(), sin.contiguous())
            self._table_len = n
        return self._tables

    # ---- forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: StaticKVCache, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, aux_layers: tuple[int, ...] = (), prompt: bool = False):
        """Run the new tokens through every layer, writing their K/V at [cache.length, +T).

        Args:
            input_ids: (B, T) token ids.
            cache: a StaticKVCache; its length grows by T.
            mask: optional bool (T, L + T) or (B, T, L + T) attention mask (True = attend);
                default: causal (token i at position L + i sees keys 0 .. L + i).
            positions: optional (T,) rotary positions of the new tokens (default L .. L+T-1),
                for draft trees whose nodes share depths.
            aux_layers: layer indices whose inputs (the residual stream before the layer, as
                EAGLE-3 drafters read them; vLLM and llama.cpp take the same) are returned too.
            prompt: the tokens are a prompt's: on the C++ path of an AMX-BF16 machine they run
                on prompt_weights() (prompts always do there, so results stay deterministic).
        Returns:
            (B, T, d) post-norm hidden states; with aux_layers, also (B, T, len(aux_layers) * d),
            those inputs concatenated in the order given.
        """
        b, t = input_ids.shape
        start = cache.length
        bad = [i for i in aux_layers if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"aux layers {bad} are not layers of this model")
        cache.ensure_batch(b)
        cache.reserve(t)
        tables = self._rope_tables(start + t if positions is None else int(positions.max()) + 1)
        rows = slice(start, start + t) if positions is None else positions
        rope = {key: (cos[rows], sin[rows]) for key, (cos, sin) in tables.items()}  # (T, hd) each
        if self.native and b == 1:
            step_mask = _step_mask(mask, start, t)
            if step_mask is not False:
                return self._forward_native(input_ids, cache, rope, step_mask, aux_layers, prompt)
        rope = {key: (cos[None, :, None, :], sin[None, :, None, :]) for key, (cos, sin) in rope.items()}  # (1,T,1,hd)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        end = start + t
        # A prompt from position 0 with the causal mask takes SDPA's is_causal path; any
        # other step gets its folded mask built once here, shared by the layers (one per
        # sliding window size: its keys also end `window` positions back).
        prefill = start == 0 and t > 1 and mask is None and positions is None
        folded = {}
        for window in {layer.window for layer in self.layers}:
            if prefill and (not window or t <= window):
                folded[window] = None
            else:
                folded[window] = prepare_mask(_window_mask(mask, t, end, window, positions), t, end, nh // nkv)
        x = self.embed_tokens(input_ids).reshape(b * t, -1).float()  # (N, d), N = B*T
        d, half, nq = x.shape[-1], hd // 2, nh + nkv
        pos = torch.arange(start, end)  # cache slots of the new tokens
        rms_norm, roll, addcmul, attend = F.rms_norm, torch.roll, torch.addcmul, gqa_attention_folded
        aux = {}
        for i, (layer, kb, vb) in enumerate(zip(self.layers, cache.keys, cache.values)):
            if i in aux_layers:
                aux[i] = x
            h = rms_norm(x, (d,), layer.in_norm, layer.in_eps)
            qkv = layer.qkv.fn(h).view(b, t, nq + nkv, hd)
            qk = qkv[:, :, :nq]
            if layer.q_norm is not None:  # Gemma 3: every query and key head normed first
                qk = torch.cat([rms_norm(qk[:, :, :nh], (hd,), layer.q_norm, layer.qk_eps),
                                rms_norm(qk[:, :, nh:], (hd,), layer.k_norm, layer.qk_eps)], 2)
            cos, sin = rope[layer.rope]
            # Rotary on queries and keys at once: x * cos + rotate_half(x) * sin, where
            # rotate_half(x) * sin = roll(x, hd/2) * [-sin_1, sin_2] (sin is signed so).
            qk = addcmul(qk * cos, roll(qk, half, -1), sin)  # (B, T, nh + nkv, hd)
            k_new, v_new = qk[:, :, nh:].transpose(1, 2), qkv[:, :, nq:].transpose(1, 2)  # (B, nkv, T, hd)
            kb.index_copy_(2, pos, k_new.to(kb.dtype))  # in place, at the step's slots
            vb.index_copy_(2, pos, v_new.to(vb.dtype))
            q = qk[:, :, :nh].transpose(1, 2)
            # A prefill attends from the new keys themselves (exact whatever the cache's dtype).
            if prefill and folded[layer.window] is None:
                att = prefill_attention(q, k_new, v_new, layer.scale)
            else:  # SDPA reads fp32 (a reduced-precision cache is widened: batched steps only)
                att = attend(q, kb[:, :, :end].float(), vb[:, :, :end].float(), folded[layer.window], layer.scale)
            y = layer.o.fn(att.reshape(b * t, nh * hd))
            if layer.attn_out_norm is not None:
                y = rms_norm(y, (d,), layer.attn_out_norm, layer.attn_out_eps)
            x = x + y
            h = rms_norm(x, (d,), layer.mlp_norm, layer.mlp_eps)
            y = layer.down.fn(_act(layer.gate_up.fn(h), layer.act))
            if layer.mlp_out_norm is not None:
                y = rms_norm(y, (d,), layer.mlp_out_norm, layer.mlp_out_eps)
            x = x + y
        cache.advance(t)
        out = F.rms_norm(x, (d,), self.norm, self.norm_eps).view(b, t, -1)
        return (out, _aux(aux, aux_layers, x).view(b, t, -1)) if aux_layers else out

    # ---- rows of many sequences in one step (continuous batching) -----------------------------
    @property
    def batches_rows(self) -> bool:
        """Whether forward_rows runs: the whole step in one C++ call (the q4 kernels)."""
        return self._plan is not None

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKVCache:
        return SlotKVCache(len(self.layers), slots, self.n_kv, self.head_dim, capacity, dtype=self.kv_dtype)

    @torch.inference_mode()
    def forward_rows(self, cache: SlotKVCache, steps: list, aux_layers: tuple[int, ...] = (),
                     prompts_from: int | None = None) -> list:
        """One forward over the new tokens of many sequences, each in its own slot of `cache`.

        Args:
            steps: per sequence (slot, token ids, mask, offsets): its n new tokens go to its
                slot's next n positions; mask, a bool (n, n) over them (True = may attend; a
                draft tree's ancestors) or None (causal); offsets, (n,) rotary positions after
                the slot's length (a tree node's depth) or None (0 .. n-1).
            aux_layers: as forward().
            prompts_from: steps[prompts_from:] are prompt chunks (forward()'s prompt); None: none.
        Returns:
            Per sequence, its (n, d) post-norm hidden states, or with aux_layers the pair
            (hidden, (n, len(aux_layers) * d)). Each row equals the same row of a one-stream
            forward() bit for bit (same kernels, same keys in the same order).
        """
        plan = self._plan
        if plan is None:
            raise ValueError("forward_rows needs the q4 kernels' whole-step plan")
        ids, slots, writes, prefixes, positions, masks = [], [], [], [], [], []
        for slot, tokens, mask, offsets in steps:
            n, length = len(tokens), cache.lengths[slot]
            if length + n > cache.capacity:
                raise ValueError(f"slot {slot} holds {length} positions: {n} more pass its capacity {cache.capacity}")
            ids += tokens
            slots += [slot] * n
            writes += range(length, length + n)
            prefixes += [length] * n
            positions.append(length + (torch.arange(n) if offsets is None else offsets))
            masks.append(mask)
        step_mask = None
        if any(m is not None for m in masks):  # block-diagonal: a row sees its own sequence's rows only
            step_mask = torch.block_diag(*[m if m is not None else torch.ones(len(s[1]), len(s[1]), dtype=torch.bool)
                                           .tril() for m, s in zip(masks, steps)])
        pos = torch.cat(positions)
        tables = self._rope_tables(int(pos.max()) + 1)
        x = self.embed_tokens(torch.tensor(ids)).float()  # (T, d)
        longs = [torch.tensor(v, dtype=torch.long) for v in (slots, writes, prefixes)]
        outs = torch.ops.clp.layers_forward_rows(
            x, plan["parts"], plan["kinds"], plan["op_parts"], plan["norms"], plan["eps"], cache.keys, cache.values,
            [tables[k][0].index_select(0, pos) for k in plan["keys"]],
            [tables[k][1].index_select(0, pos) for k in plan["keys"]],
            plan["rope"], plan["windows"], *longs, step_mask, self.n_heads, plan["scale"], plan["act"], self.norm,
            self.norm_eps, list(aux_layers), self.prompt_weights() if prompts_from is not None else [],
            sum(len(s[1]) for s in steps[:prompts_from]) if prompts_from is not None else len(ids))
        results, at = [], 0
        for slot, tokens, _, _ in steps:
            n = len(tokens)
            cache.lengths[slot] += n
            hidden = outs[0][at:at + n]
            results.append((hidden, torch.cat([o[at:at + n] for o in outs[1:]], -1)) if aux_layers else hidden)
            at += n
        return results

    def _forward_native(self, input_ids: torch.Tensor, cache: StaticKVCache, rope: dict,
                        step_mask: torch.Tensor | None, aux_layers: tuple[int, ...] = (), prompt: bool = False):
        """Batch 1 on the C++ kernels: six fused ops per layer (RMSNorm into the QKV product,
        rotary (and Gemma's q/k norms) with the cache write, attention, the output product
        with its residual, RMSNorm into gate/up, the activation into the down product with
        its residual; Gemma's output norms as one more op each). Every op is row-invariant,
        so a T-token step equals T one-token steps bit for bit."""
        t, start = input_ids.shape[1], cache.length
        x = self.embed_tokens(input_ids[0]).float()  # (T, d)
        plan = self._plan
        if plan is not None:  # every layer in one C++ call: the same kernels, no interpreter between them
            kc, vc = cache.views0()
            outs = torch.ops.clp.layers_forward(
                x, plan["parts"], plan["kinds"], plan["op_parts"], plan["norms"], plan["eps"], kc, vc,
                [rope[k][0].contiguous() for k in plan["keys"]], [rope[k][1].contiguous() for k in plan["keys"]],
                plan["rope"], plan["windows"], start, step_mask, self.n_heads, plan["scale"], plan["act"], self.norm,
                self.norm_eps, list(aux_layers), self.prompt_weights() if prompt else [], 0 if prompt else t)
            cache.advance(t)
            out = outs[0].view(1, t, -1)
            return (out, torch.cat(outs[1:], -1).view(1, t, -1)) if aux_layers else out
        return self._forward_native_py(x, cache, rope, step_mask, aux_layers)

    def _forward_native_py(self, x: torch.Tensor, cache: StaticKVCache, rope: dict, step_mask, aux_layers=()):
        """_forward_native with the layer loop in Python (projections padded to whole tiles;
        tests compare it with the C++ loop bit for bit)."""
        t, start = x.shape[0], cache.length
        rope_store = torch.ops.clp.rope_store.default
        attention = torch.ops.clp.decode_attention.default
        norm_add = torch.ops.clp.rms_norm.default
        nh, scale = self.n_heads, self.head_dim ** -0.5
        aux = {}
        for i, (layer, kb, vb) in enumerate(zip(self.layers, cache.keys, cache.values)):
            if i in aux_layers:
                aux[i] = x  # every op returns a new tensor: keeping it costs nothing
            cos, sin = rope[layer.rope]
            h = layer.qkv.kernel(x, norm=layer.in_norm, eps=layer.in_eps)
            q = rope_store(h, cos, sin, kb[0], vb[0], start, nh, layer.q_norm, layer.k_norm, layer.qk_eps)
            a = attention(q, kb[0], vb[0], start, step_mask, layer.scale or scale, layer.window).view(t, -1)
            if layer.attn_out_norm is None:
                x = layer.o.kernel(a, residual=x)
            else:
                x = norm_add(layer.o.kernel(a), layer.attn_out_norm, layer.attn_out_eps, x)
            h = layer.gate_up.kernel(x, norm=layer.mlp_norm, eps=layer.mlp_eps)
            if layer.mlp_out_norm is None:
                x = layer.down.kernel(h, act=layer.act, residual=x)
            else:
                x = norm_add(layer.down.kernel(h, act=layer.act), layer.mlp_out_norm, layer.mlp_out_eps, x)
        cache.advance(t)
        out = norm_add(x, self.norm, self.norm_eps, None).view(1, t, -1)
        return (out, _aux(aux, aux_layers, x).view(1, t, -1)) if aux_layers else out


def _aux(found: dict, layers: tuple[int, ...], last: torch.Tensor) -> torch.Tensor:
    """The inputs of `layers` (checked by forward: each a layer) concatenated along features."""
    return torch.cat([found[i] for i in layers], -1)


def _window_mask(mask: torch.Tensor | None, t: int, end: int, window: int,
                 positions: torch.Tensor | None) -> torch.Tensor | None:
    """The step's boolean (T, end) or (B, T, end) mask with a sliding window applied: a key
    further than `window` - 1 positions back from the query is dropped (transformers' rule;
    positions are the rotary ones, so a draft tree's nodes count their depth)."""
    if not window:
        return mask
    if mask is None:
        mask = causal_offset_mask(t, end)
    qpos = positions if positions is not None else torch.arange(end - t, end)
    kpos = torch.arange(end)
    # The step's keys sit at their tokens' positions.
    kpos = torch.where(kpos >= end - t, qpos[(kpos - (end - t)).clamp(min=0)], kpos)
    near = kpos[None, :] > qpos[:, None] - window  # (T, end)
    return mask & near


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
