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

from dataclasses import dataclass

import torch

from ..errors import ClpError, check_unit_interval
from .lookup import LookupSession, NgramIndex
from .tree import DraftTree, TreeConfig, build_tree, parse_tree

METHODS = ("ar", "naive", "gate", "clp", "verified", "competing")


@dataclass
class Proposal:
    token: int  # token t+1
    drafts: list[int]  # head tokens t+2 .. t+1+m (or t+2.. for competing)
    token_from_heads: bool = False
    tree: DraftTree | None = None  # verified with --tree N: the drafts as a tree (drafts: its chain)


class Policy:
    """Base policy: the backbone picks t+1; subclasses add drafts after it.

    Drafts come from the drafter's per-generation session (independent heads or a chain),
    which sees every backbone state through ``observe``; ``span`` says how many to take.
    """

    name = "ar"
    verifies = False  # drafts wait for the backbone's check in the next forward

    def __init__(self, backbone=None, drafter=None):
        self.backbone = backbone
        self.drafter = drafter
        self.session = None

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

    def propose(self, hidden: torch.Tensor, p: torch.Tensor, sampler) -> Proposal:
        """Pick token t+1 and the draft tokens after it.

        Args:
            hidden: (d,) the backbone's last hidden state at t.
            p: (V,) the distribution of token t+1 (the backbone's, after sampling rules).
            sampler: the Sampler that draws from p.
        Returns:
            A Proposal: token t+1 and 0..k draft tokens.
        """
        token = sampler.select(p)
        if self.session is None:
            return Proposal(token, [])
        return Proposal(token, self.session.propose(hidden, token, self.span(hidden)))

    def span(self, hidden: torch.Tensor) -> int:
        """How many draft tokens to take this step (before any verification)."""
        return 0


class Naive(Policy):
    name = "naive"

    def span(self, hidden):
        return self.drafter.k


class Gate(Policy):
    name = "gate"

    def __init__(self, backbone, drafter, threshold: float = 0.5):
        super().__init__(backbone, drafter)
        if drafter.gates is None:
            raise ClpError("these heads have no gate networks: train them with `clp train`")
        self.threshold = threshold

    def span(self, hidden):
        return self.drafter.gates.decide(hidden, self.threshold)


class CLPPolicy(Policy):
    name = "clp"

    def __init__(self, backbone, drafter, threshold: float = 0.5):
        super().__init__(backbone, drafter)
        if drafter.clp is None:
            raise ClpError("these heads have no CLP layer: train it with `clp train`")
        self.threshold = threshold

    def span(self, hidden):
        return self.drafter.clp.decide(hidden, self.threshold)


def check_lookup_tokens(n) -> int:
    """--lookup-tokens: the most tokens a lookup draft copies, 0 meaning the drafter's k."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ClpError(f"--lookup-tokens must be a whole number >= 0 (0: k), got {n!r}")
    return n


class Verified(Policy):
    """Lossless: drafts are emitted only once the next forward's logits agree.

    Drafts come as a chain (``tree=None``: the n-gram lookup's continuation where the
    text's tail occurred before, the drafter's CLP-sized span otherwise) or as a tree of
    up to ``tree.size`` nodes (the span, the lookup branch and the drafter's likeliest
    runners-up, verified together; tree.py). Trees need the lean engine's attention masks:
    on other engines the policy drafts chains.
    """

    name = "verified"
    verifies = True

    def __init__(self, backbone, drafter, draft: str = "clp", threshold: float = 0.5, lookup: bool = True,
                 tree: TreeConfig | None = None, lookup_tokens: int = 0):
        super().__init__(backbone, drafter)
        if draft not in ("clp", "all"):
            raise ClpError(f"--draft must be clp or all, got {draft!r}")
        if draft == "clp" and drafter.clp is None:
            raise ClpError("--draft clp needs a CLP layer in the heads folder; use --draft all")
        check_lookup_tokens(lookup_tokens)
        self.draft, self.threshold, self.lookup = draft, threshold, lookup
        # Lookup drafts cost only their rows (no drafter step), so they may run past k.
        self.lookup_tokens = lookup_tokens or drafter.k
        self.tree = tree if getattr(backbone, "supports_trees", False) else None
        self.ngrams: NgramIndex | None = None

    def start(self) -> None:
        super().start()
        if self.lookup and self.tree is None:  # lookup's drafts first, the drafter's otherwise
            self.session = LookupSession(self.session, self.lookup_tokens)
        self.ngrams = NgramIndex(self.lookup_tokens) if self.lookup and self.tree is not None else None

    def observe(self, rows: torch.Tensor, tokens: list[int]) -> None:
        super().observe(rows, tokens)
        if self.ngrams is not None:
            self.ngrams.extend(tokens)

    def propose(self, hidden, p, sampler):
        if self.tree is None:
            return super().propose(hidden, p, sampler)
        token = sampler.select(p)
        span = self.span(hidden)
        found = []
        if self.ngrams is not None:
            self.ngrams.extend([token])
            found = self.ngrams.lookup()
        if hasattr(self.session, "candidates"):
            cands = self.session.candidates(hidden, token, max(span, 1), self.tree.width)
        else:  # a session that only proposes (no probabilities): its chain, no siblings
            cands = [[(t, float("nan"))] for t in self.session.propose(hidden, token, span)]
        tree = build_tree(token, cands, span, found, self.tree)
        return Proposal(token, [c[0][0] for c in cands[:span]], tree=tree)

    def span(self, hidden):
        if self.draft == "all":
            return self.drafter.k
        return self.drafter.clp.decide(hidden, self.threshold)


class Competing(Policy):
    """The head-competition ablation: heads predict t+1 too and the span is theirs."""

    name = "competing"

    def __init__(self, backbone, drafter):
        super().__init__(backbone, drafter)
        if drafter.competing is None:
            raise ClpError("these heads have no competing-ablation heads: train them with `clp train`")

    def start(self) -> None:
        self.session = None  # its heads read only the last state

    def propose(self, hidden, p, sampler):
        heads = self.drafter.competing
        with torch.inference_mode():
            logits = heads(hidden.float().unsqueeze(0))[0]  # (k+1, Vd): t+1 .. t+1+k
        # The heads' tokens are drawn with the same sampling rules as the backbone's would be.
        tokens = [int(heads.draft_ids[sampler.select(sampler.probs(row))]) for row in logits]
        return Proposal(tokens[0], tokens[1:], token_from_heads=True)


# The CLP threshold of verified and clp decoding by default: the best of 0.3 / 0.5 for both
# shipped drafters on MT-Bench (scripts/sweep_drafts.py; docs/design.md, "Verified settings").
DEFAULT_CLP_THRESHOLD = 0.3


def make_policy(method: str, backbone=None, drafter=None, *, clp_threshold: float = DEFAULT_CLP_THRESHOLD,
                gate_threshold: float = 0.5, draft: str = "clp", lookup: bool = True,
                tree: TreeConfig | str | int | None = None, lookup_tokens: int = 0) -> Policy:
    """Build the policy for a method name (see METHODS). tree: verified only; 'chain'/None or
    a TreeConfig / size (see tree.py)."""
    if method not in METHODS:
        raise ClpError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_unit_interval("--clp-threshold", clp_threshold)
    check_unit_interval("--gate-threshold", gate_threshold)
    if method == "ar":
        return Policy(backbone)
    if drafter is None:
        raise ClpError(f"method {method!r} needs MTP heads")
    if method == "naive":
        return Naive(backbone, drafter)
    if method == "gate":
        return Gate(backbone, drafter, gate_threshold)
    if method == "clp":
        return CLPPolicy(backbone, drafter, clp_threshold)
    if method == "verified":
        return Verified(backbone, drafter, draft, clp_threshold, lookup, parse_tree(tree), lookup_tokens)
    return Competing(backbone, drafter)
