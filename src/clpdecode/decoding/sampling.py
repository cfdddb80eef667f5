"""Token selection: greedy, or temperature / top-p sampling with a seed, and the
speculative-sampling acceptance test used by verified decoding.

Everything works on a distribution over the vocabulary. Greedy decoding is the point-mass
distribution on the argmax, so one acceptance rule serves both: a draft token d is
accepted with probability p(d) (exactly "d is the argmax" when greedy), and after a
rejection the next token is drawn from p with d removed, renormalised. When greedy, the
"distribution" passed around is the logits themselves: only their argmax is ever read,
and building a 49k-entry one-hot vector per step would be pure overhead. With a draft that
is a deterministic choice (a point mass q on d) that residual is norm(max(0, p - q)),
the standard rule, so sampled output keeps the backbone's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ClpError, check_finite

# Temperatures below float32's smallest normal number sample as greedy: dividing float32
# logits by one underflows to 0 (or a subnormal) and the softmax turns to nan.
GREEDY_BELOW = float(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (so is anything below GREEDY_BELOW)
    top_p: float = 1.0  # nucleus mass kept when sampling
    seed: int = 0

    def __post_init__(self):
        # The one check of sampling settings, for the CLI, the server and the API alike.
        if check_finite("temperature", self.temperature) < 0:
            raise ClpError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}", param="temperature")
        if not (isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1):
            raise ClpError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ClpError(f"seed must be an integer, got {self.seed!r}", param="seed")
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ClpError(f"seed must be in [-2**63, 2**64), got {self.seed}", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def top1(x: torch.Tensor) -> int:
    """The index of x's largest entry, the first of ties (as torch.argmax): through numpy where
    x is a contiguous float32 CPU vector. torch's own argmax over a 49k vocabulary took
    ~0.1 ms on the 2-core Xeon against numpy's ~7 us, and greedy decoding reads one or more
    per request and step (~4% of an 8-request batched run in a profile:
    scripts/scheduler_probe.py --profile)."""
    if (x.dtype == torch.float32 and x.dim() == 1 and x.device.type == "cpu" and x.is_contiguous()
            and not x.requires_grad):
        return int(x.numpy().argmax())
    return int(x.argmax())


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.greedy = cfg.greedy
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) logits -> (V,) the distribution the next token is drawn from (greedy: the
        logits, standing for the point mass on their argmax)."""
        if self.greedy:
            return logits
        z = logits.float() / self.cfg.temperature
        if not bool(torch.isfinite(z).all()):  # a tiny temperature overflows: shift first
            z = (logits.float() - logits.float().amax(-1, keepdim=True)) / self.cfg.temperature
        p = torch.softmax(z, -1)
        if self.cfg.top_p < 1:
            sorted_p, idx = p.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always).
            drop = sorted_p.cumsum(0) - sorted_p >= self.cfg.top_p
            drop[0] = False  # a top_p below float32's smallest number would drop it too
            sorted_p[drop] = 0
            p = torch.zeros_like(p).scatter_(0, idx, sorted_p)
            p = p / p.sum()
        return p

    def select(self, p: torch.Tensor) -> int:
        if self.greedy:
            return top1(p)
        return int(torch.multinomial(p, 1, generator=self.gen))

    def accept(self, p: torch.Tensor, draft: int) -> tuple[bool, torch.Tensor]:
        """Speculative acceptance of a draft token under p.

        Returns (accepted, p_next): p_next is the residual distribution to draw the
        replacement token from when the draft is rejected.
        """
        if self.greedy:
            return top1(p) == draft, p
        if torch.rand((), generator=self.gen) < p[draft]:
            return True, p
        residual = p.clone()
        residual[draft] = 0
        total = residual.sum()
        return False, residual / total if total > 0 else p
