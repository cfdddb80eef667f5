"""The one decoding loop. Every method (AR, naive, gate, CLP, verified, competing) is a
policy plugged into it (see policies.py).

A step, after the prefill:

1. ``propose``: the policy picks token t+1 (the backbone's, drawn from its logits) and
   0..k head tokens after it.
2. ``emit``: t+1 is emitted; unverified policies emit their head tokens too.
3. ``forward``: ONE backbone forward over [t+1, drafts...] extends the KV cache.
4. ``verify`` (verified policy only): the drafts form a tree (a chain is a tree with one
   branch; see tree.py); the logits at each node say whether the backbone would have
   produced its children; keep the longest agreeing path, emit it, and keep only its
   positions in the cache.
5. the hidden state at the last kept position feeds the next step.

Batch size 1; the steps take (B, T) tensors so that batches can come later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ClpError, check_context, check_positive_int, check_prompt_ids, check_text
from .policies import Policy
from .sampling import Sampler, SamplingConfig
from .tree import DraftTree, verify_tree


@dataclass(frozen=True)
class GenerationConfig:
    """One generation's budget, stop strings and sampling (the policy's settings are
    PolicyConfig's); checked here once, for the CLI, the server and the API alike."""

    max_new_tokens: int = 128  # hard cap on emitted tokens
    stop: tuple[str, ...] = ()  # stop strings: output ends after the token completing one
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        check_positive_int("max_new_tokens", self.max_new_tokens)
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ClpError(f"stop must be a list of strings, got {self.stop!r}", param="stop")
        for s in self.stop:
            if not s:
                raise ClpError("stop must not be empty (an empty string would end the output at once)",
                               param="stop")
            check_text("stop", s)
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class GenerationResult:
    method: str
    prompt_ids: list[int]
    token_ids: list[int]  # new tokens, EOS included when reached (as transformers does)
    text: str
    forward_passes: int  # backbone forwards, the prefill included
    accepted_per_step: list[int]  # head tokens kept after each forward's backbone token
    from_heads: list[bool]  # per new token: emitted by an MTP head rather than the LM head
    seconds: float  # end to end, prefill included
    prefill_seconds: float
    decode_tokens: int  # tokens emitted after the prefill forward's own

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(1, self.forward_passes)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": self.new_tokens,
            "forward_passes": self.forward_passes,
            "seconds": round(self.seconds, 4),
            "accepted_per_step": self.accepted_per_step,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
        }


class _Output:
    """Collects emitted tokens; knows when generation must end (budget, EOS, stop string)."""

    def __init__(self, backbone, cfg: GenerationConfig, on_tokens):
        self.backbone, self.cfg, self.on_tokens = backbone, cfg, on_tokens
        self.ids: list[int] = []
        self.from_heads: list[bool] = []
        self.done = False

    @property
    def remaining(self) -> int:
        return self.cfg.max_new_tokens - len(self.ids)

    def emit(self, tokens: list[int], from_heads: bool) -> None:
        """Append tokens one by one, ending exactly where AR decoding would end."""
        start = len(self.ids)
        for t in tokens:
            if self.done:
                break
            self.ids.append(t)
            self.from_heads.append(from_heads)
            if t in self.backbone.eos_ids or self.remaining <= 0 or self._hit_stop():
                self.done = True
        if self.on_tokens and len(self.ids) > start:
            self.on_tokens(self.ids[start:], from_heads)

    def _hit_stop(self) -> bool:
        if not self.cfg.stop:
            return False
        # Only the tail can complete a stop string that was absent a token ago.
        tail = self.backbone.decode(self.ids[-16:])
        return any(s in tail for s in self.cfg.stop)


def _rows(out, aux_layers) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, drafter features) of batch row 0: the aux layers' inputs where the drafter
    reads them (EAGLE-3), else the hidden states themselves."""
    if aux_layers:
        return out[0][0], out[1][0]
    return out[0], out[0]


def prefill(backbone, prompt_ids: list[int], cache, aux_layers: tuple[int, ...] = ()):
    """Run the prompt through the backbone.

    Args:
        prompt_ids: the prompt's token ids.
        cache: an empty cache; holds the prompt afterwards.
        aux_layers: the drafter's feature layers (Drafter.aux_layers), if any.
    Returns:
        (T, d) hidden states of the prompt positions, and the drafter's features of them
        ((T, 3d) aux-layer inputs, or the hidden states again).
    """
    return _rows(backbone.forward(torch.tensor([prompt_ids]), cache, aux_layers=aux_layers), aux_layers)


def decode_forward(backbone, pending: list[int], cache, tree: DraftTree | None = None,
                   aux_layers: tuple[int, ...] = ()):
    """One decode forward over the tokens of the last step.

    Args:
        pending: [t+1, draft_1 .. draft_m], not yet in the cache.
        cache: grows by len(pending) positions.
        tree: when the drafts branch, their tree (pending = tree.tokens): each node sees
            only its ancestors, at its depth's position.
        aux_layers: as for prefill().
    Returns:
        (len(pending), d) hidden states, and the drafter's features of those positions.
    """
    ids = torch.tensor([pending])
    if tree is None or tree.is_chain:
        return _rows(backbone.forward(ids, cache, aux_layers=aux_layers), aux_layers)
    past = cache.get_seq_length()
    out = backbone.forward(ids, cache, mask=tree.mask(past), positions=tree.positions(past), aux_layers=aux_layers)
    return _rows(out, aux_layers)


def generate(
    backbone,
    prompt_ids: list[int],
    policy: Policy,
    cfg: GenerationConfig | None = None,
    on_tokens: Callable[[list[int], bool], None] | None = None,
) -> GenerationResult:
    """Decode a continuation of `prompt_ids` with `policy`.

    Args:
        backbone: a Backbone.
        prompt_ids: prompt token ids (chat template already applied).
        policy: from make_policy(); decides t+1 and the head tokens of each step.
        cfg: budget, stop strings, sampling.
        on_tokens: called with (new token ids, emitted_by_heads) as tokens are emitted.
    Returns:
        A GenerationResult with the tokens, text and acceptance statistics.
    """
    cfg = cfg or GenerationConfig()
    check_prompt_ids(prompt_ids, backbone.info.vocab_size)
    check_context(len(prompt_ids), cfg.max_new_tokens, getattr(backbone, "max_positions", None))
    sampler = Sampler(cfg.sampling)
    out = _Output(backbone, cfg, on_tokens)
    accepted: list[int] = []
    cache = backbone.new_cache()

    policy.start()
    aux_layers = policy.aux_layers
    t0 = time.perf_counter()
    states, feats = prefill(backbone, prompt_ids, cache, aux_layers)  # (T, d), (T, d or 3d)
    policy.observe(feats, list(prompt_ids[1:]))
    hidden = states[-1]  # (d,)
    p = sampler.probs(backbone.logits(hidden))  # (V,)
    forwards, prefill_seconds, prefill_tokens = 1, None, 0
    while True:
        prop = policy.propose(hidden, p, sampler)
        out.emit([prop.token], from_heads=prop.token_from_heads)
        budget = max(0, out.remaining)  # drafts past the token budget are never emitted
        if policy.verifies:
            tree = (prop.tree or DraftTree.chain(prop.token, prop.drafts)).pruned(budget)
            fed = tree.tokens
        else:
            tree, drafts = None, prop.drafts[:budget]
            before = len(out.ids)
            out.emit(drafts, from_heads=True)
            accepted.append(len(out.ids) - before)
            fed = [prop.token] + drafts
        if prefill_seconds is None:
            prefill_seconds, prefill_tokens = time.perf_counter() - t0, len(out.ids)
        if out.done:
            break
        states, feats = decode_forward(backbone, fed, cache, tree, aux_layers)  # (len(fed), d)
        forwards += 1
        if tree is not None:
            path, p = verify_tree(backbone, tree, states, sampler)
            kept = tree.path_tokens(path[1:])
            out.emit(kept, from_heads=True)
            accepted.append(len(kept))
            if out.done:
                break
            backbone.keep(cache, len(fed), path)
            policy.observe(feats[path], kept)
            hidden = states[path[-1]]
        else:
            policy.observe(feats, drafts)
            hidden = states[-1]
            p = sampler.probs(backbone.logits(hidden))
    seconds = time.perf_counter() - t0
    return GenerationResult(
        method=policy.name,
        prompt_ids=list(prompt_ids),
        token_ids=out.ids,
        text=backbone.decode(out.ids),
        forward_passes=forwards,
        accepted_per_step=accepted,
        from_heads=out.from_heads,
        seconds=seconds,
        prefill_seconds=prefill_seconds or seconds,
        decode_tokens=len(out.ids) - prefill_tokens,
    )
