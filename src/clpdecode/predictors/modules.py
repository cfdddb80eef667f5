"""Span predictors: how many head tokens to accept after the backbone's token.

- ``CLP`` (the paper's method): ONE linear layer, hidden state -> k+1 classes, class m
  meaning "accept head tokens t+2 .. t+1+m". d x (k+1) weights plus k+1 biases.
- ``Gates`` (the prior-work baseline): one MLP per head giving P(head token correct),
  accepted while each clears a threshold. Their width is chosen so that at d = 1536
  (Qwen2.5-1.5B) they total about 1M parameters, as the gate networks the paper compares
  against; at our d the same width gives the count `clp info` reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

GATE_REFERENCE_D = 1536  # Qwen2.5-1.5B, where the baseline gates total ~1M parameters
GATE_REFERENCE_PARAMS = 1_000_000


@dataclass
class PredictorConfig:
    k: int = 2
    hidden_size: int = 576

    def as_dict(self) -> dict:
        return asdict(self)


class CLP(nn.Module):
    """Collocation-Length Predictor: nn.Linear(d, k + 1) on the backbone's last hidden state."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.hidden_size, cfg.k + 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, k+1) logits over accepted lengths 0..k."""
        return self.linear(hidden)

    @torch.inference_mode()
    def at_least(self, hidden: torch.Tensor) -> torch.Tensor:
        """(d,) -> (k+1,) the predicted P(length >= m) for m = 0..k (at_least[0] = 1)."""
        p = torch.softmax(self.forward(hidden.float().unsqueeze(0))[0], -1)  # (k+1,)
        return p.flip(0).cumsum(0).flip(0)

    @torch.inference_mode()
    def decide(self, hidden: torch.Tensor, threshold: float) -> int:
        """The largest m whose predicted P(length >= m) clears `threshold` (m = 0 always does).

        threshold near 1: conservative (few head tokens); near 0: greedy (all k).
        """
        return self.span(self.at_least(hidden), threshold)

    @staticmethod
    def span(at_least: torch.Tensor, threshold: float) -> int:
        """decide() from at_least()'s probabilities (computed once where both are needed)."""
        ok = (at_least >= threshold).nonzero()
        return int(ok.max()) if ok.numel() else 0

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gate_width(k: int) -> int:
    """Hidden width per gate MLP so that k gates total ~1M parameters at d = 1536."""
    # Each gate: d*w + w (first layer) + w + 1 (second layer).
    return max(1, round((GATE_REFERENCE_PARAMS / k - 1) / (GATE_REFERENCE_D + 2)))


class Gates(nn.Module):
    """One MLP per head (d -> w -> 1) predicting whether that head's token is right."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        w = gate_width(cfg.k)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(cfg.hidden_size, w), nn.SiLU(), nn.Linear(w, 1)) for _ in range(cfg.k)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, k) logits of P(head i's token equals the greedy continuation)."""
        return torch.cat([g(hidden) for g in self.layers], dim=-1)

    @torch.inference_mode()
    def decide(self, hidden: torch.Tensor, threshold: float) -> int:
        """Accept head tokens while each gate's probability clears `threshold`."""
        p = torch.sigmoid(self.forward(hidden.float().unsqueeze(0))[0])  # (k,)
        m = 0
        while m < len(p) and p[m] >= threshold:
            m += 1
        return m

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def params_at(d: int, k: int) -> int:
        w = gate_width(k)
        return k * (d * w + w + w + 1)
