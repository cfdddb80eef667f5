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

from ..backbone import threads
from ..errors import ClpError, check_context, check_positive_int, check_prompt_ids, check_text
from .policies import Policy
from .sampling import Sampler, SamplingConfig
from .tree import DraftTree, verify_tree

MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass(frozen=True)
class TokenLogprob:
    """An emitted token's log-probability under the backbone (log-softmax of its logits, before
    temperature and top-p), and the `top` likeliest tokens at its position as (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationConfig:
    """One generation's budget, stop strings and sampling (the policy's settings are
    PolicyConfig's); checked here once, for the CLI, the server and the API alike."""

    max_new_tokens: int = 128  # hard cap on emitted tokens
    stop: tuple[str, ...] = ()  # stop strings: output ends after the token completing one
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # None: no log-probabilities; n: each emitted token's under the backbone, with the n likeliest
    # tokens at its position (GenerationResult.logprobs; at most MAX_TOP_LOGPROBS)
    logprobs: int | None = None

    def __post_init__(self):
        check_positive_int("max_new_tokens", self.max_new_tokens)
        n = self.logprobs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS):
            raise ClpError(f"top_logprobs must be a whole number in [0, {MAX_TOP_LOGPROBS}], got {n!r}",
                           param="top_logprobs")
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
    # With GenerationConfig.logprobs: one per token (None for an unverified head token emitted
    # last, whose position the backbone never read)
    logprobs: list[TokenLogprob | None] | None = None

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
    return decode_forward(backbone, list(prompt_ids), cache, None, aux_layers, prompt=True)


def decode_forward(backbone, pending: list[int], cache, tree: DraftTree | None = None,
                   aux_layers: tuple[int, ...] = (), prompt: bool = False):
    """One forward over a step's tokens (a prompt, or a decode step's).

    Args:
        pending: [t+1, draft_1 .. draft_m] (or a prompt's tokens), not yet in the cache.
        cache: grows by len(pending) positions.
        tree: when the drafts branch, their tree (pending = tree.tokens): each node sees
            only its ancestors, at its depth's position.
        aux_layers: as for prefill().
        prompt: pending is (a chunk of) the prompt (Backbone.forward's prompt).
    Returns:
        (len(pending), d) hidden states, and the drafter's features of those positions.
    """
    ids = torch.tensor([pending])
    if tree is None or tree.is_chain:
        return _rows(backbone.forward(ids, cache, aux_layers=aux_layers, prompt=prompt), aux_layers)
    past = cache.get_seq_length()
    out = backbone.forward(ids, cache, mask=tree.mask(past), positions=tree.positions(past), aux_layers=aux_layers)
    return _rows(out, aux_layers)


@dataclass
class Offer:
    """A request's draft rows for the coming step and what each is worth: values[j - 1] is the
    chance that drafts 1..j are all kept. lookup: they come from n-gram lookup (no drafter)."""

    values: list[float]
    lookup: bool = False


class Decoder:
    """One request's decoding, one forward at a time: the body of the one decoding loop.

    A driver runs the forwards: generate() below (one request, its own cache), or the
    scheduler (many requests, one batched forward a step). Between forwards the driver asks
    ``next_tokens()`` what to feed (a chunk of the prompt, then each step's [t+1, drafts...]
    as a chain or a DraftTree), runs the forward, computes the logits of ``logit_rows()``,
    and hands everything to ``advance()``, which verifies, emits, keeps the cache's accepted
    positions (the driver's ``keep``) and feeds the drafter. Then ``propose()`` picks the
    next step's token and drafts; ``limit`` caps the drafts (the scheduler's row budget).

    A step, after the prefill:

    1. ``propose``: the policy picks token t+1 (the backbone's, drawn from its logits) and
       0..k head tokens after it; t+1 is emitted, and unverified policies emit their head
       tokens too.
    2. the driver's forward: ONE backbone forward over [t+1, drafts...] extends the cache.
    3. ``advance``: for the verified policy, the drafts form a tree (a chain is a tree with
       one branch; tree.py); the logits at each node say whether the backbone would have
       produced its children; keep the longest agreeing path, emit it, and keep only its
       positions in the cache. The hidden state at the last kept position feeds the next
       step.
    """

    def __init__(self, backbone, prompt_ids: list[int], policy: Policy, cfg: GenerationConfig | None = None,
                 on_tokens: Callable[[list[int], bool], None] | None = None):
        cfg = cfg or GenerationConfig()
        check_prompt_ids(prompt_ids, backbone.info.vocab_size)
        check_context(len(prompt_ids), cfg.max_new_tokens, getattr(backbone, "max_positions", None))
        self.backbone, self.policy, self.cfg = backbone, policy, cfg
        self.prompt_ids = list(prompt_ids)
        self.sampler = Sampler(cfg.sampling)
        self.out = _Output(backbone, cfg, on_tokens)
        self.accepted: list[int] = []
        self.forwards = 0  # backbone forwards; a prompt fed in chunks counts once
        policy.start()
        self.aux_layers = policy.aux_layers
        self.prefilled = 0  # prompt tokens in the cache so far
        self._prompt_feats: list[torch.Tensor] = []  # the drafter's features of them, until the last chunk
        self.fed: list[int] = []  # the next decode step's tokens: [t+1, drafts...] (the tree's, for a tree)
        self.tree: DraftTree | None = None  # verified: the drafts as a tree
        self.drafts: list[int] = []  # unverified: the head tokens already emitted after t+1
        self.from_lookup = False  # the last proposal's drafts came from n-gram lookup
        self.logprobs: list[TokenLogprob | None] | None = [] if cfg.logprobs is not None else None
        self._row: torch.Tensor | None = None  # (V,) the backbone's logits for the next t+1 (logprobs)
        self._pending_drafts = 0  # unverified head tokens emitted before the forward that reads them
        self.hidden: torch.Tensor | None = None  # (d,) the state the next proposal reads
        self.p: torch.Tensor | None = None  # (V,) the distribution of the next token t+1
        self.t0 = time.perf_counter()
        self.prefill_seconds: float | None = None
        self.prefill_tokens = 0
        self.seconds: float | None = None

    @property
    def done(self) -> bool:
        return self.out.done

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def proposing(self) -> bool:
        """Whether the next call is propose() (a forward's output has been taken in)."""
        return self.p is not None and not self.done

    def next_tokens(self, max_rows: int | None = None) -> tuple[list[int], DraftTree | None]:
        """The tokens of the next forward: the prompt's next chunk (at most `max_rows`), or the
        proposed step's [t+1, drafts...] with their tree (verified) or None (a chain)."""
        if self.prefilling:
            end = len(self.prompt_ids) if max_rows is None else self.prefilled + max_rows
            return self.prompt_ids[self.prefilled:end], None
        return self.fed, self.tree

    def logit_rows(self, n: int) -> list[int]:
        """Which of the next forward's n rows advance() needs logits for."""
        if self.prefilling:
            return [n - 1] if self.prefilled + n >= len(self.prompt_ids) else []
        # Every row for a tree, and for unverified head tokens whose log-probabilities are asked.
        return list(range(n)) if self.tree is not None or self.logprobs is not None else [n - 1]

    def advance(self, states: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor | None,
                keep: Callable[[int, list[int]], None]) -> None:
        """Take in a forward's output over next_tokens()'s n tokens.

        Args:
            states: (n, d) hidden states; feats: (n, d or 3d) the drafter's features.
            logits: (len(logit_rows(n)), V) the backbone's logits of those rows (None: none).
            keep: keep(fed, offsets) keeps only `offsets` of the step's `fed` positions in
                this request's cache (Backbone.keep on its cache, or its slot's).
        """
        n = states.shape[0]
        if self.prefilling:
            self.prefilled += n
            self._prompt_feats.append(feats)
            if self.prefilling:
                return
            self.forwards += 1
            feats = self._prompt_feats[0] if len(self._prompt_feats) == 1 else torch.cat(self._prompt_feats)
            self._prompt_feats = []
            self.policy.observe(feats, self.prompt_ids[1:])
            self.hidden, self.p, self._row = states[-1], self.sampler.probs(logits[-1]), logits[-1]  # (d,), (V,)
            return
        self.forwards += 1
        if self.tree is not None and len(self.tree) == 1:
            # No drafts (a budgeted request granted none, or a span of 0): t+1 alone, nothing to
            # verify or compact; what verify_tree would give (the root's distribution), without
            # its Python (~0.1 ms a request and step at 8 requests: scheduler_probe.py --profile).
            self.p, self._row = self.sampler.probs(logits[0]), logits[0]
            self.accepted.append(0)
            self.policy.observe(feats, [])
            self.hidden = states[0]
        elif self.tree is not None:
            path, self.p = verify_tree(self.tree, logits, self.sampler)
            kept = self.tree.path_tokens(path[1:])
            self._emit(kept, True, [logits[i] for i in path[:-1]])
            self._row = logits[path[-1]]
            self.accepted.append(len(kept))
            if self.out.done:
                return self._finish()
            keep(len(self.fed), path)
            self.policy.observe(feats[path], kept)
            self.hidden = states[path[-1]]
        else:
            self.policy.observe(feats, self.drafts)
            if self.logprobs is not None:  # the head tokens emitted before this forward, now read
                first = len(self.logprobs) - self._pending_drafts
                for j in range(self._pending_drafts):
                    self.logprobs[first + j] = self._logprob(logits[j], self.drafts[j])
            self.hidden, self.p, self._row = states[-1], self.sampler.probs(logits[-1]), logits[-1]

    def _logprob(self, row: torch.Tensor, token: int) -> TokenLogprob:
        lp = torch.log_softmax(row.float(), -1)
        top = lp.topk(self.cfg.logprobs) if self.cfg.logprobs else None
        return TokenLogprob(token, float(lp[token]),
                            tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ())

    def _emit(self, tokens: list[int], from_heads: bool, rows: list | None) -> int:
        """Emit tokens (stopping where AR would); with logprobs, each token's from its row of
        logits (None: not read yet). Returns how many were emitted."""
        before = len(self.out.ids)
        self.out.emit(tokens, from_heads=from_heads)
        n = len(self.out.ids) - before
        if self.logprobs is not None:
            self.logprobs += [self._logprob(rows[j], tokens[j]) if rows is not None else None for j in range(n)]
        return n

    @property
    def budgeted(self) -> bool:
        """Whether a scheduler may cap this request's drafts: greedy verified decoding, whose
        output does not depend on its drafts. Not elsewhere: unverified drafts are output, and
        a sampled request's drafts decide how its random numbers are drawn (its text must not
        depend on the load)."""
        return self.policy.verifies and self.sampler.greedy and hasattr(self.policy, "offer")

    def offer(self) -> "Offer | None":
        """What each draft row of the coming step is worth to this request (the chance that
        drafts 1..j are all kept, policies.Verified.offer), where a scheduler may cap its
        drafts (`budgeted`); None elsewhere."""
        if not self.budgeted:
            return None
        values, lookup = self.policy.offer(self.hidden, self.p, self.sampler)
        cap = self.policy.config.max_drafts or len(values)
        return Offer(values[:min(cap, max(0, self.out.remaining - 1))], lookup)

    def propose(self, limit: int | None = None) -> None:
        """Pick token t+1 and the drafts after it (at most `limit` drafts, if given), emitting
        what is emitted before the forward; sets next_tokens() (or ends the generation)."""
        cap = self.policy.config.max_drafts or None  # the method's own cap (e.g. naive at k' < k)
        if cap is not None:
            limit = cap if limit is None else min(limit, cap)
        prop = self.policy.propose(self.hidden, self.p, self.sampler, limit)
        self.p = None
        self.from_lookup = prop.lookup
        out = self.out
        self._emit([prop.token], prop.token_from_heads, [self._row])
        budget = max(0, out.remaining)  # drafts past the token budget are never emitted
        if self.policy.verifies:
            self.tree = (prop.tree or DraftTree.chain(prop.token, prop.drafts)).pruned(budget)
            self.fed = self.tree.tokens
        else:
            self.drafts = prop.drafts[:budget]
            self._pending_drafts = self._emit(self.drafts, True, None)
            self.accepted.append(self._pending_drafts)
            self.fed = [prop.token] + self.drafts
        if self.prefill_seconds is None:
            self.prefill_seconds, self.prefill_tokens = time.perf_counter() - self.t0, len(out.ids)
        if out.done:
            self._finish()

    def _finish(self) -> None:
        self.seconds = time.perf_counter() - self.t0

    def result(self) -> GenerationResult:
        seconds = self.seconds if self.seconds is not None else time.perf_counter() - self.t0
        return GenerationResult(
            method=self.policy.name,
            prompt_ids=self.prompt_ids,
            token_ids=self.out.ids,
            text=self.backbone.decode(self.out.ids),
            forward_passes=self.forwards,
            accepted_per_step=self.accepted,
            from_heads=self.out.from_heads,
            seconds=seconds,
            prefill_seconds=self.prefill_seconds or seconds,
            decode_tokens=len(self.out.ids) - self.prefill_tokens,
            logprobs=self.logprobs,
        )


def generate(
    backbone,
    prompt_ids: list[int],
    policy: Policy,
    cfg: GenerationConfig | None = None,
    on_tokens: Callable[[list[int], bool], None] | None = None,
) -> GenerationResult:
    """Decode a continuation of `prompt_ids` with `policy`, one request on its own cache.

    Args:
        backbone: a Backbone.
        prompt_ids: prompt token ids (chat template already applied).
        policy: from make_policy(); decides t+1 and the head tokens of each step.
        cfg: budget, stop strings, sampling.
        on_tokens: called with (new token ids, emitted_by_heads) as tokens are emitted.
    Returns:
        A GenerationResult with the tokens, text and acceptance statistics.
    """
    dec = Decoder(backbone, prompt_ids, policy, cfg, on_tokens)
    cache = backbone.new_cache()

    def keep(fed: int, offsets: list[int]) -> None:
        backbone.keep(cache, fed, offsets)

    while not dec.done:
        threads.tick()
        prompt = dec.prefilling
        tokens, tree = dec.next_tokens()
        states, feats = decode_forward(backbone, tokens, cache, tree, dec.aux_layers, prompt)  # (n, d), (n, d or 3d)
        rows = dec.logit_rows(len(tokens))
        dec.advance(states, feats, backbone.logits(states[rows]) if rows else None, keep)
        if dec.proposing:
            dec.propose()
    return dec.result()
