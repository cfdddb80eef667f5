"""A static KV cache: preallocated per layer, written in place, rolled back by moving a length.

transformers' DynamicCache concatenates every layer's whole cache on every step, so a
step's cost grows with the context (~10 ms of a 24 ms step at 1,000 cached tokens here).
This cache keeps one (B, n_kv_heads, capacity, head_dim) buffer per layer for keys and
one for values; a step writes its T new positions into [length, length + T) and the
attention reads the view [:length + T] (no copy). Rolling back rejected drafts only moves
`length` back: the stale entries are overwritten by the next step.

Callers need not know the final length: when a step does not fit, every buffer grows by
whole chunks (one copy, amortised over `chunk` positions). A capacity hint (prompt +
max_new_tokens + draft room) avoids even that.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Per-layer key/value buffers of shape (B, n_kv_heads, capacity, head_dim)."""

    def __init__(self, num_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int = 0,
                 chunk: int = 256, dtype: torch.dtype = torch.float32, device=None):
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self.num_layers, self.batch, self.n_kv_heads, self.head_dim = num_layers, batch, n_kv_heads, head_dim
        self.chunk, self.dtype, self.device = chunk, dtype, device
        self.length = 0  # positions held (the next step writes at [length, length + T))
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(self._round(capacity))

    # ---- size ---------------------------------------------------------------------------
    def _round(self, n: int) -> int:
        return -(-max(0, n) // self.chunk) * self.chunk

    def _alloc(self, capacity: int) -> None:
        shape = (self.batch, self.n_kv_heads, capacity, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for old, new in zip(self.keys + self.values, new_k + new_v):
            new[:, :, : self.length].copy_(old[:, :, : self.length])
        self.keys, self.values, self.capacity = new_k, new_v, capacity
        self._views0 = None

    def ensure_batch(self, batch: int) -> None:
        """An empty cache takes the batch size of its first step; a filled one must match."""
        if batch == self.batch:
            return
        if self.length:
            raise ValueError(f"the cache holds batch {self.batch}, the step has batch {batch}")
        self.batch, self.keys, self.values, cap = batch, [], [], self.capacity
        self._alloc(cap)

    def reserve(self, n: int) -> None:
        """Make room for n more positions after `length` (grows by whole chunks)."""
        need = self.length + n
        if need > self.capacity:
            self._alloc(self._round(need))

    def views0(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Batch row 0 of every layer's buffers, (n_kv, capacity, hd) views (the C++ kernels'
        layout), made once per allocation."""
        if self._views0 is None:
            self._views0 = ([k[0] for k in self.keys], [v[0] for v in self.values])
        return self._views0

    # ---- steps --------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's (B, n_kv, T, hd) keys and values at [length, length + T).

        Call reserve(T) first, and advance(T) after the last layer. Returns views of the
        layer's keys and values over [0, length + T): what the step's queries attend to.
        """
        t = k.shape[2]
        end = self.length + t
        kb, vb = self.keys[layer], self.values[layer]
        kb[:, :, self.length : end].copy_(k)
        vb[:, :, self.length : end].copy_(v)
        return kb[:, :, :end], vb[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def rollback(self, n: int) -> None:
        """Forget the last n positions (no copy: the next step overwrites them)."""
        if n < 0 or n > self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} positions")
        self.length -= n

    @torch.inference_mode()
    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep, of the positions from `start` on, only those at `offsets` (ascending), moved
        to start, start + 1, ...; the rest is forgotten. This compacts the accepted path of
        a draft tree into place: one gather per layer over the step's few slots.
        """
        if any(b <= a for a, b in zip(offsets, offsets[1:])) or (offsets and offsets[0] < 0):
            raise ValueError(f"offsets must be ascending and non-negative, got {offsets}")
        if offsets and start + offsets[-1] >= self.length:
            raise ValueError(f"offset {offsets[-1]} from {start} is past the {self.length} positions held")
        if offsets != list(range(len(offsets))):  # a prefix stays where it is
            src = torch.tensor(offsets, device=self.device) + start
            dst = torch.arange(start, start + len(offsets), device=self.device)
            for buf in self.keys + self.values:
                buf.index_copy_(2, dst, buf.index_select(2, src))
        self.length = start + len(offsets)

    # ---- the parts of transformers' Cache API that our code uses -------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """As DynamicCache.crop: keep max_length positions, or drop -max_length if negative."""
        keep = self.length + max_length if max_length < 0 else min(max_length, self.length)
        self.rollback(self.length - keep)


class SlotKVCache:
    """The caches of many sequences at once (continuous batching): per layer one buffer of
    shape (slots, n_kv_heads, capacity, head_dim), allocated once, and a length per slot.

    A step's rows each name their slot (LeanForward.forward_rows writes a row's key and value
    at its slot's next position); rolling back or keeping a draft tree's path touches one slot
    only. A slot is taken by a request for its whole life and reset when it leaves.
    """

    def __init__(self, num_layers: int, slots: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float16, device=None):
        if slots < 1 or capacity < 1:
            raise ValueError("a slot cache needs at least one slot and one position")
        shape = (slots, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.capacity, self.device = slots, capacity, device
        self.lengths = [0] * slots  # positions each slot holds

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0  # stale entries are overwritten by the slot's next request

    def room(self, slot: int) -> int:
        return self.capacity - self.lengths[slot]

    def rollback(self, slot: int, n: int) -> None:
        if n < 0 or n > self.lengths[slot]:
            raise ValueError(f"cannot roll back {n} of slot {slot}'s {self.lengths[slot]} positions")
        self.lengths[slot] -= n

    @torch.inference_mode()
    def keep(self, slot: int, fed: int, offsets: list[int]) -> None:
        """After a step that fed `fed` tokens into `slot`, keep only those at `offsets`
        (ascending; a draft tree's accepted path), compacted into place (StaticKVCache.keep)."""
        start = self.lengths[slot] - fed
        if offsets != list(range(len(offsets))):
            src = torch.tensor(offsets, device=self.device) + start
            dst = torch.arange(start, start + len(offsets), device=self.device)
            for buf in self.keys + self.values:
                view = buf[slot]
                view.index_copy_(1, dst, view.index_select(1, src))
        self.lengths[slot] = start + len(offsets)
