"""Our 4- and 8-bit weights, read exactly from a GGUF file's blocks or quantised here, and the
linear layer that computes on them.

SmolLM2's GGUF stores every trunk projection as ggml Q4_1 blocks: 32 weights along the
input dimension share an fp16 scale d and an fp16 min m, and w = d * q + m with q in
0..15. That is exactly a group-32 scale/min layout. Gemma 3's Q4_K blocks are
the same thing one level down (a 256-weight super-block of eight 32-weight sub-blocks,
each with a 6-bit scale and min times the super-block's fp16 d and dmin), so they map one
to one as well (scale d * sc and min -dmin * mn, exact in fp32). Q5_0, Q8_0 and Q6_K map
onto 8-bit codes with a scale per group. The file format itself (header, names, block
layouts, q/k row order) is gguf.py's; this module turns its decoded blocks into weights.

The product runs on the project's own C++ kernels (csrc/kernels.cpp, built once per
machine): the GGUF's codes, scales and mins as they are, and each row of activations
quantised to int16 in groups of 32 (llama.cpp's q4_1 x q8 arithmetic with 16-bit instead of
8-bit activations: see kernels.cpp), so the 4-bit weights are decoded once per group for all
rows of a step. Rows are computed independently (a 5-row product equals five 1-row products
bit for bit), which keeps verified decoding exact. The residual stream, norms, rotary and
attention stay fp32. `clp bench` reports q4's agreement with fp32 AR. Without a C++
compiler, torch's own int4 kernel runs instead (`aten._weight_int4pack_mm_for_cpu`: the same
layout with its convention w = (q - 8) * scale + zero, bf16 activations, scales and zeros).

A model that did not come from a GGUF (a hub id, a local folder, a test's tiny model) is
quantised here the way ggml's reference Q4_1 quantiser does it (per group of 32: the
min, and d = (max - min) / 15, codes rounded to nearest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# GROUP: weights per scale/min group (ggml's Q4_1 block, Q4_K's sub-block), the kernels' too.
from .gguf import DECODERS, GROUP, PROJECTIONS, Blocks, GGUFFile, layer_tensor


def _check_groups(k: int, what: str) -> None:
    """Every quantised layout here groups inputs by GROUP; the one check of that."""
    if k % GROUP:
        raise ValueError(f"{what} needs the input size to be a multiple of {GROUP}, got {k}")


def _groups(w: torch.Tensor, what: str) -> torch.Tensor:
    """An fp32 (N, K) weight as (N, K/GROUP, GROUP) groups."""
    n, k = w.shape
    _check_groups(k, what)
    return w.detach().float().reshape(n, k // GROUP, GROUP)


@dataclass
class Int4Weight:
    """An (N, K) weight as 4-bit codes with one scale and one min per group of 32 inputs:
    w[n, g*32 + j] = scales[n, g] * codes[n, g*32 + j] + mins[n, g]."""

    codes: torch.Tensor  # (N, K) uint8, values 0..15
    scales: torch.Tensor  # (N, K / 32) fp32
    mins: torch.Tensor  # (N, K / 32) fp32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        q = self.codes.view(n, k // GROUP, GROUP).float()
        return (q * self.scales[..., None] + self.mins[..., None]).reshape(n, k)

    @staticmethod
    def cat(parts: list["Int4Weight"]) -> "Int4Weight":
        """Stack the rows of several weights that read the same input (fused QKV, gate/up)."""
        return Int4Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                          torch.cat([p.mins for p in parts]))

    @staticmethod
    def from_float(w: torch.Tensor) -> "Int4Weight":
        """Round-to-nearest Q4_1 of an fp32 (N, K) weight (ggml's quantize_row_q4_1_ref)."""
        n, k = w.shape
        g = _groups(w, "q4")
        lo, hi = g.amin(-1), g.amax(-1)
        d = (hi - lo) / 15
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        # As ggml: codes from the fp32 min and step (round half up), both then stored as fp16.
        codes = torch.floor((g - lo[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
        d, lo = d.half().float(), lo.half().float()
        return Int4Weight(codes.reshape(n, k), d, lo)


@dataclass
class Int8Weight:
    """An (N, K) weight as int8 codes with one scale per group of `group` inputs (ggml's Q8_0
    and Q5_0: 32; Q6_K: 16): w[n, g*group + j] = scales[n, g] * codes[n, g*group + j]."""

    codes: torch.Tensor  # (N, K) int8
    scales: torch.Tensor  # (N, K / group) fp32
    group: int = GROUP

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        return (self.codes.view(n, k // self.group, self.group).float() * self.scales[..., None]).reshape(n, k)

    @staticmethod
    def cat(parts: list["Int8Weight"]) -> "Int8Weight":
        if len({p.group for p in parts}) != 1:
            raise ValueError("cannot stack 8-bit weights with different group sizes")
        return Int8Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), parts[0].group)

    @staticmethod
    def from_float(w: torch.Tensor) -> "Int8Weight":
        """Round-to-nearest Q8_0 of an fp32 (N, K) weight (ggml's quantize_row_q8_0_ref)."""
        n, k = w.shape
        g = _groups(w, "q8")
        d = g.abs().amax(-1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = g * inv[..., None]
        codes = (torch.sign(q) * torch.floor(q.abs() + 0.5)).to(torch.int8)  # roundf: half away from zero
        return Int8Weight(codes.reshape(n, k), d.half().float())


# ---- GGUF blocks ---------------------------------------------------------------------------
def from_blocks(blocks: Blocks) -> Int4Weight | Int8Weight:
    """A GGUF tensor's decoded blocks (gguf.py) as our 4-bit (with mins) or 8-bit weight, exactly."""
    codes, scales = torch.from_numpy(blocks.codes), torch.from_numpy(blocks.scales)
    if blocks.mins is None:
        return Int8Weight(codes, scales, blocks.group)
    return Int4Weight(codes, scales, torch.from_numpy(blocks.mins))


class GGUFWeights:
    """The projections of a GGUF file as 4- or 8-bit groups, by Hugging Face module name:
    Q4_1/Q4_K as 4-bit groups of 32, Q5_0/Q8_0 as 8-bit groups of 32 and Q6_K as 8-bit groups
    of 16, all exactly."""

    def __init__(self, path: Path, config):
        self.file = GGUFFile(path, config.num_attention_heads, getattr(config, "num_key_value_heads", None))

    def _weight(self, name: str) -> Int4Weight | Int8Weight | None:
        if self.file.kind(name) not in DECODERS:
            return None
        kind, shape, raw = self.file.read(name)
        return from_blocks(DECODERS[kind](raw, shape[1]))

    def get(self, layer: int, hf_name: str) -> Int4Weight | Int8Weight | None:
        """The projection `hf_name` (e.g. "self_attn.q_proj") of a layer, or None when the file
        stores it in a type we do not read (then it is quantised from the fp32 model)."""
        return self._weight(layer_tensor(layer, hf_name))

    def lm_head(self) -> Int8Weight | None:
        """The output projection (the token embedding when they are tied) when the file stores
        it as Q8_0, else None."""
        name = "output.weight" if self.file.kind("output.weight") else "token_embd.weight"
        return self._weight(name) if self.file.kind(name) == "Q8_0" else None


# ---- the kernels ---------------------------------------------------------------------------
def pack_tiles(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout clp::q4_linear reads: output features in tiles of 4, group by group.

    Returns qs (N/4, K/32, 64) uint8 (per feature of the tile, 16 bytes: element j in the low
    nibble of byte j, element j + 16 in its high nibble, as ggml stores Q4_1) and the scales
    and mins as (N/4, K/32, 4) fp32. N must be a multiple of 4 (Int4Linear pads).
    """
    n, k = w.shape
    ng = k // GROUP
    c = w.codes.view(n, ng, GROUP)
    nib = c[..., :16] | (c[..., 16:] << 4)  # (N, ng, 16)
    qs = nib.view(n // 4, 4, ng, 16).transpose(1, 2).reshape(n // 4, ng, 64).contiguous()
    d = w.scales.float().view(n // 4, 4, ng).transpose(1, 2).contiguous()
    m = w.mins.float().view(n // 4, 4, ng).transpose(1, 2).contiguous()
    return qs, d, m


def pack_tiles16(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The wide layout clp::q4_linear reads on AVX512_VNNI machines (kernels.wide_q4): output
    features in tiles of 16, group by group, each group 8 blocks of 32 bytes; block b holds
    inputs 4b..4b+3 of the 16 features as byte 8L + j = feature 4L + j's inputs (4b, 4b + 1)
    and byte 8L + 4 + j = its inputs (4b + 2, 4b + 3), the even input in the low nibble (the
    order the kernel's int16 unpacking puts in lane order; kernels.cpp, q4x16_rows).

    Returns qs (N/16, K/32, 256) uint8 and the scales and mins as (N/16, K/32, 16) fp32.
    """
    n, k = w.shape
    ng, tiles = k // GROUP, n // 16
    c = w.codes.view(tiles, 16, ng, GROUP)  # (tile, feature, group, input)
    pairs = (c[..., 0::2] | (c[..., 1::2] << 4)).permute(0, 2, 3, 1)  # (tile, group, pair, feature)
    qs = pairs.reshape(tiles, ng, 8, 2, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(tiles, ng, 256).contiguous()
    d = w.scales.float().view(tiles, 16, ng).transpose(1, 2).contiguous()
    m = w.mins.float().view(tiles, 16, ng).transpose(1, 2).contiguous()
    return qs, d, m


def pack_dense(w: torch.Tensor) -> torch.Tensor:
    """The layout clp::dense_linear reads (prompt rows on AMX-BF16 tiles): fp32 weights (N, K)
    rounded to bf16, as (N/16, K/32, 16, 32): per tile of 16 output features and block of 32
    inputs, row p holds inputs (2p, 2p + 1) of features 0..15 side by side (AMX's B layout).
    N must be a multiple of 16 and K of 32."""
    n, k = w.shape
    if n % 16 or k % 32:
        raise ValueError(f"dense weights need N % 16 == 0 and K % 32 == 0, got {n} x {k}")
    b = w.to(torch.bfloat16).view(n // 16, 16, k // 32, 16, 2)  # (tile, feature, block, pair, 2)
    return b.permute(0, 2, 3, 1, 4).reshape(n // 16, k // 32, 16, 32).contiguous()


ACTS = {None: 0, "silu": 1, "gelu_tanh": 2}  # an activation between the halves of [gate | up]


class KernelLinear:
    """y = op(x) W^T + b (+ residual) on the C++ kernels, fp32 (M, K) in, fp32 (M, N) out.

    op(x) is x, RMSNorm(x) * norm, or act(gate) * up for x = [gate | up]: what each kernel
    call fuses in front of its product. Without the kernels the same is computed in torch
    (the `_fallback` product of the subclass).
    """

    out_features: int
    bias: torch.Tensor | None
    native: bool
    _pad: int = 0

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, act: str | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.native:
            fused = residual if not self._pad else None
            y = self._op(x, *self._weights, self.bias, norm, eps, ACTS[act], fused)
            if self._pad:
                y = y[:, : self.out_features]
                return y if residual is None else y + residual
            return y
        if norm is not None:
            x = F.rms_norm(x, (x.shape[-1],), norm, eps)
        elif act is not None:
            k = x.shape[-1] // 2
            gate = F.silu(x[:, :k]) if act == "silu" else F.gelu(x[:, :k], approximate="tanh")
            x = gate * x[:, k:]
        y = self._fallback(x)
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None else y + residual


class Int4Linear(KernelLinear):
    """4-bit groups of 32 (Int4Weight).

    With the project's C++ kernels (kernels.py): clp::q4_linear, fp32 scales and mins and
    activations rounded to int16 per row and group of 32, row-invariant. Without them:
    torch's own int4 kernel with bf16 activations, scales and zeros (slower; rows of a step
    may then differ from one-row steps by float noise through the attention).
    """

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None):
        from . import kernels

        n, k = weight.shape
        _check_groups(k, "q4")
        self.out_features, self.in_features = n, k
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.native = kernels.load() is not None
        if self.native and n % 16 == 0 and kernels.wide_q4():
            self._weights = pack_tiles16(weight)
            self._op = torch.ops.clp.q4_linear.default
        elif self.native:
            self._pad = -n % 4
            if self._pad:  # whole tiles of 4 features; the padding rows are zero and cut off
                zero = Int4Weight(torch.zeros(self._pad, k, dtype=torch.uint8), torch.zeros(self._pad, k // GROUP),
                                  torch.zeros(self._pad, k // GROUP))
                weight = Int4Weight.cat([weight, zero])
            self._weights = pack_tiles(weight)
            self._op = torch.ops.clp.q4_linear.default
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 1)
            zeros = weight.mins + 8 * weight.scales  # the kernel computes (q - 8) * scale + zero
            self.scales_zeros = torch.stack([weight.scales.t(), zeros.t()], -1).to(torch.bfloat16).contiguous()

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP,
                                                          self.scales_zeros).float()


def pack_tiles8(w: Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """clp::q8_linear's layout: qs (N/4, K/32, 128) int8 (32 codes per feature of a tile of 4)
    and the scales as (N/4, K/32, 4) fp32, or (N/4, K/32, 8) for groups of 16 (the 4 features'
    first halves, then their second halves)."""
    n, k = w.shape
    ng = k // GROUP
    qs = w.codes.view(n // 4, 4, ng, GROUP).transpose(1, 2).reshape(n // 4, ng, 4 * GROUP).contiguous()
    per = GROUP // w.group  # scales per group of 32: 1, or 2 (Q6_K's halves)
    d = w.scales.float().view(n // 4, 4, ng, per).permute(0, 2, 3, 1).reshape(n // 4, ng, 4 * per).contiguous()
    return qs, d


def pack_tiles8x16(w: Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The wide layout clp::q8_linear reads on AVX512_VNNI machines (kernels.wide_q4): tiles of
    16 output features; per group, for each input pair (2k, 2k + 1) 32 bytes, byte 2f + s
    holding feature f's code of input 2k + s. Returns qs (N/16, K/32, 512) int8 and the scales
    as (N/16, K/32, 16), or (N/16, K/32, 32) for groups of 16 (first halves, then second)."""
    n, k = w.shape
    ng, tiles = k // GROUP, n // 16
    c = w.codes.view(tiles, 16, ng, GROUP // 2, 2)  # (tile, feature, group, pair, input of the pair)
    qs = c.permute(0, 2, 3, 1, 4).reshape(tiles, ng, 512).contiguous()
    per = GROUP // w.group
    d = w.scales.float().view(tiles, 16, ng, per).permute(0, 2, 3, 1).reshape(tiles, ng, 16 * per).contiguous()
    return qs, d


class Int8Linear(KernelLinear):
    """8-bit groups of 32 (Int8Weight, ggml's Q8_0) on clp::q8_linear; without the C++
    kernels, the dequantised weight as an fbgemm fp16 linear."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None):
        from . import kernels

        n, k = weight.shape
        self.out_features, self.in_features = n, k
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.native = kernels.load() is not None
        if self.native and n % 16 == 0 and kernels.wide_q4():
            self._weights = pack_tiles8x16(weight)
            self._op = torch.ops.clp.q8_linear.default
        elif self.native:
            self._pad = -n % 4
            if self._pad:
                weight = Int8Weight.cat([weight, Int8Weight(torch.zeros(self._pad, k, dtype=torch.int8),
                                                            torch.zeros(self._pad, k // weight.group), weight.group)])
            self._weights = pack_tiles8(weight)
            self._op = torch.ops.clp.q8_linear.default
        else:
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.dequantize(), None)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def kernel_linear(weight: Int4Weight | Int8Weight, bias: torch.Tensor | None = None) -> KernelLinear:
    return (Int4Linear if isinstance(weight, Int4Weight) else Int8Linear)(weight, bias)


class QuantLinear(torch.nn.Module):
    """An nn.Linear replacement on 4- or 8-bit groups of 32 (put in place of the transformers
    model's projections and LM head, so its own forward and generate() run our numbers)."""

    def __init__(self, weight: Int4Weight | Int8Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight_q = weight  # kept for fusing (LeanForward concatenates QKV and gate/up)
        self.bias_q = None if bias is None else bias.detach().float()
        self.kind = "q4" if isinstance(weight, Int4Weight) else "q8"
        self.op = kernel_linear(weight, self.bias_q)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.reshape(-1, x.shape[-1]).float()).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} group {GROUP}"


def quantize_q4(trunk: torch.nn.Module, gguf: GGUFWeights | None = None) -> dict:
    """Replace every decoder projection of `trunk` by a QuantLinear, in place.

    Weights come from the GGUF's own blocks where the file has them in a type we read
    (exactly: see GGUFWeights), and are quantised to 4 bits here (round-to-nearest Q4_1)
    otherwise. Returns how many projections came from where ("gguf_rounded" stays 0: every
    type read today is exact).
    """
    counts = {"gguf": 0, "gguf_rounded": 0, "quantised": 0}
    for i, layer in enumerate(trunk.layers):
        for hf_name in PROJECTIONS:
            parent_name, attr = hf_name.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, attr)
            stored = gguf.get(i, hf_name) if gguf is not None else None
            if stored is not None and stored.shape != tuple(lin.weight.shape):
                raise ValueError(f"GGUF tensor for layer {i} {hf_name} has shape {stored.shape}, "
                                 f"the model {tuple(lin.weight.shape)}")
            if stored is None:
                weight, source = Int4Weight.from_float(lin.weight), "quantised"
            else:
                weight, source = stored, "gguf"
            counts[source] += 1
            setattr(parent, attr, QuantLinear(weight, lin.bias))
    return counts
