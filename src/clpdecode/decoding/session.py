"""The drafting-session interface: what every drafter gives one generation.

A drafter (heads.artifacts.Drafter) opens one session per generation; the policies read
drafts from it and feed it the backbone's states. Implementations: independent heads
(heads.modules.HeadsSession, which keep no state) and a chain or EAGLE-3 drafter
(heads.chained.ChainSession, which keeps its own KV cache of the text so far).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DraftSession(Protocol):
    def observe(self, rows: torch.Tensor, tokens: list[int]) -> None:
        """New backbone rows (n, d) (or (n, 3d): an EAGLE-3 drafter's aux-layer inputs) and the
        n - 1 tokens that followed all but the last (the last one's comes with propose)."""

    def propose(self, hidden: torch.Tensor, token: int, m: int) -> list[int]:
        """The backbone chose `token` after the last observed row (its state `hidden`, (d,)):
        m draft tokens for the positions after it (m = 0: none, but the step is seen)."""

    def candidates(self, hidden: torch.Tensor, token: int, m: int, width: int = 1) -> list[list[tuple[int, float]]]:
        """As propose, with up to `width` (token, probability) candidates per depth, best
        first (a draft tree's siblings); candidate 0 of each depth is what propose returns."""
