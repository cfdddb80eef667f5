"""GGUF files: the one reader of their header, tensor names, quantised blocks and q/k row order.

- Header: `gguf_context_length` reads one key of the key-value section without the gguf
  package (which parses the whole vocabulary first: seconds).
- Names: `PROJECTIONS` and `hf_name` map GGUF tensor names to Hugging Face ones (Llama,
  Qwen2 and Gemma 3 name their projections alike).
- Blocks: `DECODERS` turn ggml's Q4_1, Q4_K, Q5_0, Q8_0 and Q6_K blocks into integer codes
  with a scale (and, for the 4-bit types, a min) per group, exactly: each product of an fp16
  and a small integer is exact in fp32 (tests/test_q4.py compares them with gguf-py's own
  dequantisation). quant.py turns them into its 4- and 8-bit weights.
- Row order: llama.cpp's converter interleaves the two rotary halves of every q/k head of a
  "llama" file; `GGUFFile.read` undoes it (`unpermute_rows`), as transformers' GGUF loader
  does, so rows come out in transformers' order.

Only numpy is needed here (the gguf package only to open a file's tensors), so that
scripts/device_pack.py can decode its packed blocks where the gguf package is not installed.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---- names -------------------------------------------------------------------------------------
# Hugging Face module name -> GGUF name of a decoder layer's projections (blk.<i>.<name>.weight).
PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
# A layer's norms, as Llama and Qwen2 name them (Gemma 3 has four more, not mapped).
_LAYER_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_LAYER_TO_HF = {g: h for h, g in (PROJECTIONS | _LAYER_NORMS).items()}
_GLOBAL_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def layer_tensor(layer: int, module: str) -> str:
    """The GGUF name of the projection `module` (e.g. "self_attn.q_proj") of decoder layer `layer`."""
    return f"blk.{layer}.{PROJECTIONS[module]}.weight"


def hf_name(gguf_name: str) -> str:
    """The Hugging Face parameter name of a GGUF tensor: "blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight", "token_embd.weight" -> "model.embed_tokens.weight"."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TO_HF:
        return f"{_GLOBAL_TO_HF[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _LAYER_TO_HF:
        raise ValueError(f"no Hugging Face name is known for the GGUF tensor {gguf_name!r}")
    return f"model.layers.{parts[1]}.{_LAYER_TO_HF[parts[2]]}.{suffix}"


# ---- header ------------------------------------------------------------------------------------
# GGUF metadata value types (the GGUF spec's numbering) and their little-endian layouts.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_context_length(path: Path) -> int | None:
    """`<arch>.context_length` from a GGUF's header (what transformers converts to
    max_position_embeddings), read in a millisecond; None if the header does not hold it.

    Only the key-value section at the start of the file is read, up to that key (the
    gguf package's reader parses the whole vocabulary first: seconds).
    """
    try:
        with open(path, "rb") as f:
            def read(fmt: str):
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise EOFError
                return struct.unpack(fmt, data)[0]

            def string() -> str:
                n = read("<Q")
                data = f.read(n)
                if len(data) != n:
                    raise EOFError
                return data.decode("utf-8")

            def skip(vtype: int) -> None:
                if vtype == _GGUF_STRING:
                    f.seek(read("<Q"), os.SEEK_CUR)
                elif vtype == _GGUF_ARRAY:
                    itype, n = read("<I"), read("<Q")
                    if itype in _GGUF_SCALARS:
                        f.seek(n * struct.calcsize(_GGUF_SCALARS[itype]), os.SEEK_CUR)
                    else:
                        for _ in range(n):
                            skip(itype)
                else:
                    read(_GGUF_SCALARS[vtype])

            if f.read(4) != b"GGUF" or read("<I") not in (2, 3):
                return None
            read("<Q")  # tensor count
            arch = None
            for _ in range(read("<Q")):
                key, vtype = string(), read("<I")
                if key == "general.architecture" and vtype == _GGUF_STRING:
                    arch = string()
                elif arch is not None and key == f"{arch}.context_length" and vtype in (4, 5, 10, 11):
                    return int(read(_GGUF_SCALARS[vtype]))
                else:
                    skip(vtype)
    except (OSError, EOFError, KeyError, struct.error, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return None


# ---- blocks ------------------------------------------------------------------------------------
GROUP = 32  # weights per block of Q4_1, Q5_0 and Q8_0, and per sub-block of Q4_K
_QK_K = 256  # weights per super-block of the K types


@dataclass(frozen=True)
class Blocks:
    """An (N, K) tensor's blocks, decoded: w[n, g*group + j] = scales[n, g] * codes[n, g*group + j]
    + mins[n, g] (no min term for the 8-bit types)."""

    codes: np.ndarray  # (N, K): uint8 0..15 for the 4-bit types (mins set), else int8
    scales: np.ndarray  # (N, K / group) fp32
    mins: np.ndarray | None  # (N, K / group) fp32, or None
    group: int = GROUP


def _fp16(b: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) fp32: a block's fp16 field."""
    return b.copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: ggml puts element j in the low nibble of byte j and
    element j + 16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_q4_1(raw: np.ndarray, k: int) -> Blocks:
    """(N, K/32 * 20) bytes of Q4_1 blocks (fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m)."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, k // GROUP, 20)
    codes = _nibbles(blocks[..., 4:20]).reshape(n, k)
    return Blocks(codes.copy(), _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4]))


def decode_q8_0(raw: np.ndarray, k: int) -> Blocks:
    """(N, K/32 * 34) bytes of Q8_0 blocks (fp16 d, 32 int8 codes; w = d * q)."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, k // GROUP, 34)
    return Blocks(blocks[..., 2:].copy().view(np.int8).reshape(n, k), _fp16(blocks[..., 0:2]), None)


def decode_q5_0(raw: np.ndarray, k: int) -> Blocks:
    """(N, K/32 * 22) bytes of Q5_0 blocks (fp16 d, 32 fifth bits, 16 bytes of nibbles;
    w = d * (q - 16)) -> codes q - 16."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, k // GROUP, 22)
    qh = blocks[..., 2:6].copy().view(np.uint32)[..., 0]  # bit j: the fifth bit of element j
    high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    codes = (_nibbles(blocks[..., 6:22]) | high).astype(np.int16) - 16
    return Blocks(codes.astype(np.int8).reshape(n, k), _fp16(blocks[..., 0:2]), None)


def decode_q6_k(raw: np.ndarray, k: int) -> Blocks:
    """(N, K/256 * 210) bytes of Q6_K blocks -> codes with a scale per 16 weights.

    A block: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, fp16 d;
    w = d * sc[p // 16] * (q - 32) for weight p of the block (ggml's dequantize_row_q6_K).
    """
    n = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(n, k // _QK_K, 210)
    ql, qh = b[..., 0:128].reshape(n, -1, 2, 64), b[..., 128:192].reshape(n, -1, 2, 32)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # (N, K/256, 16)
    d = _fp16(b[..., 208:210])
    lo, hi = ql[..., :32], ql[..., 32:]
    q = np.stack([(lo & 0xF) | ((qh & 3) << 4), (hi & 0xF) | (((qh >> 2) & 3) << 4),
                  (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)], axis=3)  # (N,K/256,2,4,32)
    codes = q.reshape(n, k).astype(np.int16) - 32
    scales = (d[..., None] * sc).reshape(n, k // 16)  # fp16 x int8: exact in fp32
    return Blocks(codes.astype(np.int8), scales, None, group=16)


def _q4_k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) packed bytes -> (..., 8) 6-bit scales and mins (ggml's get_scale_min_k4)."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def decode_q4_k(raw: np.ndarray, k: int) -> Blocks:
    """(N, K/256 * 144) bytes of Q4_K blocks (fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
    mins, 128 bytes of nibbles): each 32-weight sub-block has scale d * sc and min -dmin * mn
    (products of an fp16 and a 6-bit integer: exact in fp32)."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, k // _QK_K, 144)
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])
    sc, mn = _q4_k_scale_min(blocks[..., 4:16])  # (N, K/256, 8)
    qs = blocks[..., 16:].reshape(n, k // _QK_K, 4, 32)
    # 64 weights per 32 bytes: the low nibbles are sub-block 2i, the high nibbles 2i + 1.
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)
    scales = (d[..., None] * sc).reshape(n, k // GROUP)
    mins = (-dmin[..., None] * mn).reshape(n, k // GROUP)
    return Blocks(codes.copy(), scales.astype(np.float32), mins.astype(np.float32))


# GGUF tensor type name -> decoder(raw rows of blocks, K) -> Blocks.
DECODERS = {"Q4_1": decode_q4_1, "Q4_K": decode_q4_k, "Q5_0": decode_q5_0, "Q8_0": decode_q8_0,
            "Q6_K": decode_q6_k}


# ---- row order and the file --------------------------------------------------------------------
def unpermute_rows(n: int, n_head: int) -> np.ndarray:
    """The row order that undoes llama.cpp's q/k permutation of an n-row projection with
    `n_head` heads (its converter interleaves the two rotary halves of every head;
    transformers' GGUF loader reverses it the same way)."""
    dim = n // n_head // 2
    return np.arange(n).reshape(n_head, dim, 2).transpose(0, 2, 1).reshape(n)


class GGUFFile:
    """A GGUF file's tensors by GGUF name, through the gguf package's memory map.

    n_head, n_kv: the model's attention heads and key/value heads (its config's), which the
    q/k row order of a "llama" file depends on.
    """

    def __init__(self, path: Path, n_head: int, n_kv: int | None = None):
        import gguf

        reader = gguf.GGUFReader(str(path))
        self.path = Path(path)
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
        self.n_head, self.n_kv = n_head, n_kv or n_head

    def kind(self, name: str) -> str | None:
        """The tensor's GGUF type name ("Q4_1", "F32", ...), None if the file has no such tensor."""
        t = self.tensors.get(name)
        return None if t is None else t.tensor_type.name

    def read(self, name: str) -> tuple[str, tuple[int, ...], np.ndarray]:
        """(type name, shape as torch sees it (out, in), raw data): a quantised tensor as one
        row of blocks per output row; q/k rows in transformers' order."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        raw = np.asarray(t.data)
        if kind != "F32":
            raw = raw.reshape(shape[0], -1)
        heads = {"attn_q": self.n_head, "attn_k": self.n_kv}.get(name.split(".")[-2]) if self.arch == "llama" else None
        if heads is not None:
            raw = raw[unpermute_rows(shape[0], heads)]
        return kind, shape, raw
