"""Metric definitions, written once (the README's "Results" section states them too). The report repeats them.

- speedup: decode tokens/s of a method / AR's decode tokens/s, same backbone, numerics,
  prompts and max_new_tokens, interleaved in one run (prefill excluded);
  speedup_e2e: the same with end-to-end time (prefill included).
- tokens per forward: new tokens / backbone forwards (prefill counted as one).
- repetition ratio rep-n: 1 - unique n-grams / total n-grams over one sample's generated
  token ids, averaged over samples (samples with no n-gram are skipped).
- agreement with AR: share of outputs identical to AR's; mean common-prefix length.
- backbone NLL: mean negative log-likelihood per generated token under the fp32 backbone.
"""

from __future__ import annotations

import torch

DEFINITIONS = {
    "speedup": "decode tokens/s of the method divided by AR's (prefill excluded), same backbone, numerics, "
               "prompts and max_new_tokens, methods interleaved prompt by prompt in one run",
    "speedup_e2e": "as speedup, with end-to-end time (prefill included)",
    "tokens_per_forward": "new tokens emitted per backbone forward (prefill counted as a forward)",
    "rep_n": "1 - unique n-grams / total n-grams over one sample's generated token ids, averaged over samples",
    "distinct_n": "unique n-grams / total n-grams over all samples' generated token ids pooled",
    "agreement_exact": "share of outputs token-identical to fp32-or-same-numerics AR's",
    "common_prefix_mean": "mean length (tokens) of the common prefix with AR's output",
    "nll": "mean negative log-likelihood per generated token under the fp32 backbone (nats)",
}


def repetition_ratio(ids: list[int], n: int) -> float | None:
    """1 - unique n-grams / total n-grams of one sample; None when it has no n-gram."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return None
    return 1 - len(set(grams)) / len(grams)


def mean_repetition(samples: list[list[int]], n: int) -> float:
    vals = [r for r in (repetition_ratio(s, n) for s in samples) if r is not None]
    return sum(vals) / len(vals) if vals else 0.0


def distinct_n(samples: list[list[int]], n: int) -> float:
    """Unique n-grams / total n-grams over every sample's generated token ids pooled (the
    corpus-level diversity measure; rep-n is the per-sample repetition)."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def backbone_nll(backbone, prompt_ids: list[int], new_ids: list[int]) -> float:
    """Mean NLL per generated token under `backbone` (one prefill over prompt + output)."""
    if not new_ids:
        return 0.0
    ids = torch.tensor([prompt_ids + new_ids])
    hidden = backbone.forward(ids, backbone.new_cache())[0, len(prompt_ids) - 1 : -1]  # (N, d)
    logp = torch.log_softmax(backbone.logits(hidden), -1)
    return float(-logp.gather(1, torch.tensor(new_ids)[:, None]).mean())
