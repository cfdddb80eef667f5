"""Drafting policies: what to emit after each backbone forward.

Every method is a policy plugged into the ONE loop in ``loop.py``:

| policy      | token t+1 from | head tokens emitted                  | checked by backbone |
| ----------- | -------------- | ------------------------------------ | ------------------- |
| ``ar``      | backbone       | none                                 | -                   |
| ``naive``   | backbone       | all k                                | no                  |
| ``gate``    | backbone       | while each gate clears its threshold | no                  |
| ``clp``     | backbone       | m from CLP's decision rule           | no                  |
| ``verified``| backbone       | m from CLP (or all k), kept only if the next forward agrees | yes |
| ``competing``| heads         | all heads' tokens (the prior design) | no                  |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ClpError
from .config import PolicyConfig
from .lookup import NgramIndex
from .session import DraftSession
from .tree import DraftTree, build_tree


@dataclass
class Proposal:
    token: int  # token t+1
    drafts: list[int]  # head tokens t+2 .. t+1+m (or t+2.. for competing)
    token_from_heads: bool = False
    tree: DraftTree | None = None  # verified with --tree N: the drafts as a tree (drafts: its chain)
    lookup: bool = False  # the drafts come from n-gram lookup, not the drafter


class Policy:
    """Base policy: the backbone picks t+1; subclasses add drafts after it.

    Drafts come from the drafter's per-generation session (a DraftSession: independent
    heads or a chain), which sees every backbone state through ``observe``; ``span`` says
    how many to take.
    """

    name = "ar"
    verifies = False  # drafts wait for the backbone's check in the next forward

    def __init__(self, backbone=None, drafter=None, config: PolicyConfig | None = None):
        self.backbone = backbone
        self.drafter = drafter
        self.config = config or PolicyConfig(method=self.name)
        self.session: DraftSession | None = None

    def start(self) -> None:
        """Called by the loop before each generation: fresh drafting state."""
        self.session = self.drafter.session(self.backbone) if self.drafter is not None else None

    @property
    def aux_layers(self) -> tuple[int, ...]:
        """The backbone layers whose inputs the loop hands to observe() (an EAGLE-3 drafter's
        features), or () for the hidden states themselves."""
        return self.drafter.aux_layers if self.session is not None else ()

    def observe(self, rows: torch.Tensor, tokens: list[int]) -> None:
        """New backbone rows (n, d) (or (n, 3d): aux_layers) and the n-1 tokens that followed
        all but the last."""
        if self.session is not None:
            self.session.observe(rows, tokens)

    def propose(self, hidden: torch.Tensor, p: torch.Tensor, sampler, limit: int | None = None) -> Proposal:
        """Pick token t+1 and the draft tokens after it.

        Args:
            hidden: (d,) the backbone's last hidden state at t.
            p: (V,) the distribution of token t+1 (the backbone's, after sampling rules).
            sampler: the Sampler that draws from p.
            limit: at most this many drafts (a scheduler's row budget; None: the policy's own).
        Returns:
            A Proposal: token t+1 and 0..k draft tokens.
        """
        token = sampler.select(p)
        if self.session is None:
            return Proposal(token, [])
        return Proposal(token, self.session.propose(hidden, token, _capped(self.span(hidden), limit)))

    def span(self, hidden: torch.Tensor) -> int:
        """How many draft tokens to take this step (before any verification)."""
        return 0


class Naive(Policy):
    name = "naive"

    def span(self, hidden):
        return self.drafter.k


class Gate(Policy):
    name = "gate"

    def __init__(self, backbone, drafter, config: PolicyConfig):
        super().__init__(backbone, drafter, config)
        if drafter.gates is None:
            raise ClpError("these heads have no gate networks: train them with `clp train`")

    def span(self, hidden):
        return self.drafter.gates.decide(hidden, self.config.gate_threshold)


class CLPPolicy(Policy):
    name = "clp"

    def __init__(self, backbone, drafter, config: PolicyConfig):
        super().__init__(backbone, drafter, config)
        if drafter.clp is None:
            raise ClpError("these heads have no CLP layer: train it with `clp train`")

    def span(self, hidden):
        return self.drafter.clp.decide(hidden, self.config.clp_threshold)


class Verified(Policy):
    """Lossless: drafts are emitted only once the next forward's logits agree.

    Drafts come as a chain (``tree`` "chain": the n-gram lookup's continuation where the
    text's tail occurred before, the drafter's CLP-sized span otherwise) or as a tree of
    up to ``tree`` nodes (the span, the lookup branch and the drafter's likeliest
    runners-up, verified together; tree.py). Trees need the lean engine's attention masks:
    on other engines the policy drafts chains.
    """

    name = "verified"
    verifies = True

    def __init__(self, backbone, drafter, config: PolicyConfig):
        super().__init__(backbone, drafter, config)
        if config.draft == "clp" and drafter.clp is None:
            raise ClpError("draft clp needs a CLP layer in the heads folder; use draft all", param="draft")
        # Lookup drafts cost only their rows (no drafter step), so they may run past k.
        self.lookup_tokens = config.lookup_tokens or drafter.k
        self.tree = config.tree_config if getattr(backbone, "supports_trees", False) else None
        self.ngrams: NgramIndex | None = None  # the text so far, where lookup is on
        self.lookup_steps = 0  # steps of this generation whose chain came from lookup
        self._choice: tuple | None = None  # offer()'s (token, span, lookup draft), for propose()

    def start(self) -> None:
        super().start()
        self.ngrams = NgramIndex(self.lookup_tokens) if self.config.lookup else None
        self.lookup_steps = 0
        self.lookup_kept = self.lookup_missed = 0  # this generation's lookup drafts: kept, and steps cut short
        self._lookup_fed = 0  # the last step's lookup draft length (0: not a lookup step)
        self._choice = None

    def observe(self, rows: torch.Tensor, tokens: list[int]) -> None:
        super().observe(rows, tokens)
        if self.ngrams is not None:
            self.ngrams.extend(tokens)
        if self._lookup_fed:  # tokens: the drafts the backbone kept
            self.lookup_kept += len(tokens)
            self.lookup_missed += len(tokens) < self._lookup_fed
            self._lookup_fed = 0

    def offer(self, hidden, p, sampler) -> tuple[list[float], bool]:
        """Choose this step's token t+1 now, and say what each draft row would be worth: the
        probability that drafts 1..j are all kept, for every j the policy would draft (CLP's
        P(length >= j) for the drafter's span; for a lookup draft, its per-token rate so far in
        this generation, a Laplace estimate, to the j-th power), and whether they are lookup's.
        A scheduler weighs these against other requests' rows and passes the rows it grants
        to propose() as `limit`."""
        at_least = self.drafter.clp.at_least(hidden) if self.drafter.clp is not None else None
        token, span, found = self._choice = self._choose(hidden, p, sampler, at_least)
        if found:
            rate = (self.lookup_kept + 1) / (self.lookup_kept + self.lookup_missed + 2)
            return [rate ** j for j in range(1, len(found) + 1)], True
        if at_least is not None:
            return at_least[1:span + 1].tolist(), False
        return [1.0] * span, False  # no estimate: every draft is worth its row

    def _choose(self, hidden, p, sampler, at_least=None) -> tuple[int, int, list[int]]:
        token = sampler.select(p)
        return token, self.span(hidden, at_least), self._lookup(token)

    def _lookup(self, token: int) -> list[int]:
        """The lookup's draft after `token` ([] where lookup is off or the tail is new)."""
        if self.ngrams is None:
            return []
        self.ngrams.extend([token])
        return self.ngrams.lookup()

    def propose(self, hidden, p, sampler, limit=None):
        if self._choice is None and limit == 0 and self.tree is None:  # no drafts: no span to size
            token = sampler.select(p)
            if self.ngrams is not None:  # the index still learns the token; no draft to look up
                self.ngrams.extend([token])
            self._choice = token, 0, []
        token, span, found = self._choice or self._choose(hidden, p, sampler)
        self._choice = None
        span, found = _capped(span, limit), found[:limit]
        if self.tree is None:
            if not found:
                return Proposal(token, self.session.propose(hidden, token, span))
            self.lookup_steps += 1
            self._lookup_fed = len(found)
            self.session.propose(hidden, token, 0)  # the drafter still sees the step: its cache stays whole
            return Proposal(token, found, lookup=True)
        cands = self.session.candidates(hidden, token, max(span, 1), self.tree.width)
        tree = build_tree(token, cands, span, found, self.tree)
        if limit is not None:
            tree = tree.pruned(limit)
        return Proposal(token, [c[0][0] for c in cands[:span]], tree=tree)

    def span(self, hidden, at_least: torch.Tensor | None = None):
        if self.config.draft == "all":
            return self.drafter.k
        if at_least is not None:  # CLP's probabilities, already computed for this state
            return self.drafter.clp.span(at_least, self.config.clp_threshold)
        return self.drafter.clp.decide(hidden, self.config.clp_threshold)


class Competing(Policy):
    """The head-competition ablation: heads predict t+1 too and the span is theirs."""

    name = "competing"

    def __init__(self, backbone, drafter, config: PolicyConfig):
        super().__init__(backbone, drafter, config)
        if drafter.competing is None:
            raise ClpError("these heads have no competing-ablation heads: train them with `clp train`")

    def start(self) -> None:
        self.session = None  # its heads read only the last state

    def propose(self, hidden, p, sampler, limit=None):
        heads = self.drafter.competing
        with torch.inference_mode():
            logits = heads(hidden.float().unsqueeze(0))[0]  # (k+1, Vd): t+1 .. t+1+k
        # The heads' tokens are drawn with the same sampling rules as the backbone's would be.
        tokens = [int(heads.draft_ids[sampler.select(sampler.probs(row))]) for row in logits]
        return Proposal(tokens[0], tokens[1:][:limit], token_from_heads=True)


def _capped(span: int, limit: int | None) -> int:
    return span if limit is None else min(span, limit)


_POLICIES = {"naive": Naive, "gate": Gate, "clp": CLPPolicy, "verified": Verified, "competing": Competing}


def make_policy(config: PolicyConfig | str = "ar", backbone=None, drafter=None, **settings) -> Policy:
    """The policy of a PolicyConfig, or of a method name with PolicyConfig's fields as
    keywords (``make_policy("verified", bb, drafter, draft="all")``)."""
    if isinstance(config, str):
        config = PolicyConfig(method=config, **settings)
    elif settings:
        config = replace(config, **settings)
    if config.method == "ar":
        return Policy(backbone, config=config)
    if drafter is None:
        raise ClpError(f"method {config.method!r} needs MTP heads", param="method")
    return _POLICIES[config.method](backbone, drafter, config)
