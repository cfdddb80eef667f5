"""Grouped-query attention that never copies the KV cache.

transformers' SDPA path expands grouped K/V (`repeat_kv`) whenever a step needs a mask,
i.e. for every multi-token step: a full copy of each layer's cache per step. Here the
query heads that share a K/V head are folded into the query-length dimension instead:

    q (B, n_heads, T, hd) -> (B, n_kv, group * T, hd)   against   k, v (B, n_kv, S, hd)

Row r = g * T + i of a folded query is query head (kv * group + g) at new token i, the
same head order transformers' `repeat_kv` produces. K and V are read in place (views of
the static cache), only the queries (a few rows) are reshaped.

Masks: a 1-token step attends to every cached key (no mask). A multi-token step whose new
token i sits at position L + i sees keys 0 .. L + i (the causal offset mask). Any other
(T, S) boolean mask (True = may attend; e.g. a draft tree) can be passed instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_offset_mask(t: int, s: int, device=None) -> torch.Tensor:
    """(t, s) bool: new token i (at position s - t + i) sees keys 0 .. s - t + i."""
    offset = s - t
    return torch.arange(s, device=device)[None, :] <= (offset + torch.arange(t, device=device))[:, None]


def fold_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """(T, S) or (B, T, S) bool -> the folded queries' (group*T, S) or (B, 1, group*T, S)."""
    if mask.dim() == 2:
        return mask.repeat(group, 1)
    if mask.dim() == 3:
        return mask.repeat(1, group, 1).unsqueeze(1)
    raise ValueError(f"mask must be (T, S) or (B, T, S), got {tuple(mask.shape)}")


def prepare_mask(mask: torch.Tensor | None, t: int, s: int, group: int, dtype=torch.float32,
                 device=None) -> torch.Tensor | None:
    """The attention mask of a step, folded for gqa_attention_folded (build it once per step).

    mask: None for the causal offset mask (None is returned when t = 1: no mask needed), or
    a bool (T, S) or (B, T, S) mask, True where a query may attend. Returns an additive
    (group*T, S) or (B, 1, group*T, S) mask (0 or -inf), what SDPA's CPU kernel reads
    without converting it in every layer.
    """
    if mask is None:
        if t == 1:
            return None
        mask = causal_offset_mask(t, s, device)
    if mask.dtype != torch.bool:
        raise ValueError("mask must be boolean (True = may attend)")
    if mask.shape[-2:] != (t, s):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match (T={t}, S={s})")
    folded = fold_mask(mask, group)
    return torch.zeros(folded.shape, dtype=dtype, device=device).masked_fill_(~folded, float("-inf"))


def gqa_attention_folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, folded_mask: torch.Tensor | None,
                         scale: float | None = None) -> torch.Tensor:
    """gqa_attention with the mask already folded by prepare_mask (the per-layer hot path)."""
    b, n_heads, t, hd = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    # (B, n_kv * group, T, hd) -> (B, n_kv, group * T, hd): a view when T = 1.
    qf = q.reshape(b, n_kv, group * t, hd)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=folded_mask, scale=scale)  # (B, n_kv, g*T, hd)
    if t == 1:
        return out.view(b, 1, n_heads, hd)
    return out.view(b, n_kv, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, n_heads, hd)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of a step that starts at position 0 (S = T): (B, T, n_heads, hd).

    A prefill needs no offset, so SDPA's own is_causal path applies: it skips the masked
    blocks (about 2x faster than a folded (group*T, T) mask at T = 1,000, and no T^2 mask in
    memory). enable_gqa lets the kernel map query heads to K/V heads.
    """
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention over a KV cache, without expanding K/V.

    Args:
        q: (B, n_heads, T, hd) queries of the step's new tokens (rotary applied).
        k, v: (B, n_kv, S, hd) keys and values of every position the step may see, the
            new ones last (S = L + T); typically non-contiguous views of a static cache.
        mask: None for the causal offset mask (none at all when T = 1), or a bool (T, S)
            or (B, T, S) mask, True where a query may attend (every row needs a True).
        scale: softmax scale (default 1/sqrt(hd)).
    Returns:
        (B, T, n_heads, hd) attention outputs, ready for the output projection.
    """
    n_heads, t = q.shape[1], q.shape[2]
    n_kv, s = k.shape[1], k.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} K/V heads")
    folded = prepare_mask(mask, t, s, n_heads // n_kv, q.dtype, q.device)
    return gqa_attention_folded(q, k, v, folded, scale)
