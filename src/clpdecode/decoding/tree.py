"""Draft trees: several candidate continuations, verified by ONE backbone forward.

A chain of drafts is lost at its first wrong token. A tree also offers the drafter's
runners-up (siblings) and, where the text repeats, the n-gram lookup's continuation as a
branch of its own, so that one forward can keep whichever path the backbone agrees with.

Layout (as Medusa's tree buffers, built once per step from a handful of lists)::

    node 0        token t+1, chosen by the backbone (the root; always kept)
    node i > 0    a draft token; parents[i] < i, depth[i] = depth[parents[i]] + 1

The step feeds the nodes in index order. Node i attends to the whole cache and to its
ancestors (itself included), and sits at rotary position L + depth[i]: exactly what the
tokens of its path would see if fed as a chain. The longest path the backbone accepts is
kept; its keys and values are compacted into place (Backbone.keep) and the rest dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ClpError

TREE_CHAIN = "chain"
# The default of --tree everywhere (CLI, API, bench, server): chosen from measured step costs
# (docs/design.md, "Draft trees").
DEFAULT_TREE = TREE_CHAIN


@dataclass
class TreeConfig:
    size: int = 8  # most draft nodes after t+1: the step feeds at most 1 + size tokens
    width: int = 4  # candidates read from the drafter per depth (the top-1 continues the chain)
    # A sibling joins when its path probability under the drafter reaches this: each extra
    # node costs ~1.25 ms here (~8% of a 1-token step), which a less likely sibling does not
    # earn back (0.05 and 0.25 measured worse or no better than 0.3; docs/design.md).
    min_prob: float = 0.3

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ClpError(f"tree must be 'chain' or a number of draft nodes >= 1, got {self.size!r}", param="tree")
        if self.width < 1:
            raise ClpError(f"tree width must be >= 1, got {self.width}")


def parse_tree(value: str | int | None) -> TreeConfig | None:
    """--tree's value: 'chain' (None: a chain of drafts, lookup's or the drafter's) or a size."""
    if value is None or value == TREE_CHAIN:
        return None
    if isinstance(value, TreeConfig):
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ClpError(f"tree must be 'chain' or a number of draft nodes >= 1, got {value!r}", param="tree") from None
    return TreeConfig(size=size)


class DraftTree:
    """Token t+1 and the draft tokens after it, as a tree (see the module docstring)."""

    def __init__(self, root: int):
        self.tokens: list[int] = [root]
        self.parents: list[int] = [-1]
        self.depth: list[int] = [0]
        self._children: list[dict[int, int]] = [{}]  # token -> node, per node

    @classmethod
    def chain(cls, root: int, drafts: list[int]) -> "DraftTree":
        tree = cls(root)
        tree.add_path(0, drafts)
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        """The child of `parent` holding `token`: the existing one, or a new node."""
        node = self._children[parent].get(token)
        if node is None:
            node = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depth.append(self.depth[parent] + 1)
            self._children.append({})
            self._children[parent][token] = node
        return node

    def add_path(self, parent: int, tokens: list[int]) -> list[int]:
        """Add tokens as a path below `parent`, sharing any prefix already there."""
        nodes = []
        for t in tokens:
            parent = self.add(parent, t)
            nodes.append(parent)
        return nodes

    def children(self, node: int) -> list[int]:
        return list(self._children[node].values())

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def pruned(self, max_depth: int) -> "DraftTree":
        """The tree without nodes deeper than max_depth (drafts past the token budget)."""
        if max(self.depth) <= max_depth:
            return self
        out, new_id = DraftTree(self.tokens[0]), {0: 0}
        for i in range(1, len(self)):
            if self.depth[i] <= max_depth:
                new_id[i] = out.add(new_id[self.parents[i]], self.tokens[i])
        return out

    def mask(self, past: int) -> torch.Tensor:
        """(T, past + T) bool: every node sees the cache and its own ancestors (itself too)."""
        t = len(self)
        anc = torch.zeros(t, t, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                anc[i] = anc[p]
            anc[i, i] = True
        return torch.cat([torch.ones(t, past, dtype=torch.bool), anc], 1)

    def positions(self, past: int) -> torch.Tensor:
        """(T,) rotary positions: a node sits where its token would in a chain."""
        return past + torch.tensor(self.depth)

    def path_tokens(self, path: list[int]) -> list[int]:
        return [self.tokens[i] for i in path]


def build_tree(token: int, candidates: list[list[tuple[int, float]]], span: int, lookup: list[int],
               cfg: TreeConfig) -> DraftTree:
    """One step's draft tree.

    Args:
        token: t+1, the root.
        candidates: per depth, the drafter's (token, probability) candidates, best first,
            along its own top-1 chain (ChainSession.candidates).
        span: how many of the chain's top-1 drafts the span rule (CLP, or all k) keeps.
        lookup: the n-gram lookup's continuation ([] when the tail never occurred before).
        cfg: size and sibling threshold.
    Returns:
        The tree: the span rule's chain, then the lookup branch, then siblings in order of
        their path probability (the product of the chain's probabilities above them and
        their own), while they reach cfg.min_prob, all within cfg.size nodes.
    """
    tree = DraftTree(token)
    main = [0]  # the chain's node at each depth (root = depth 0)
    for depth_cands in candidates[:span]:
        if len(tree) > cfg.size:
            break
        main.append(tree.add(main[-1], depth_cands[0][0]))
    # Sharing the chain's prefix costs nothing: a new node only where lookup differs.
    _add_within(tree, 0, lookup, cfg.size)
    siblings = []
    prob_above = 1.0
    for depth, depth_cands in enumerate(candidates, start=1):
        if depth - 1 >= len(main):
            break
        first = 1 if depth <= span else 0  # below the span, the top-1 competes as a sibling
        for tok, prob in depth_cands[first:]:
            pp = prob_above * prob
            if not math.isnan(pp) and pp >= cfg.min_prob:
                siblings.append((pp, main[depth - 1], tok))
        prob_above *= depth_cands[0][1]
    for _, parent, tok in sorted(siblings, key=lambda s: -s[0]):
        if len(tree) > cfg.size:
            break
        tree.add(parent, tok)
    return tree


def _add_within(tree: DraftTree, parent: int, tokens: list[int], size: int) -> None:
    """add_path, stopping once the tree holds `size` draft nodes."""
    for t in tokens:
        if t not in tree._children[parent] and len(tree) > size:
            return
        parent = tree.add(parent, t)


def verify_tree(tree: DraftTree, logits: torch.Tensor, sampler) -> tuple[list[int], torch.Tensor]:
    """Walk the tree from the root, keeping the children the backbone accepts.

    At a node, its children are tried in turn with the speculative acceptance rule
    (greedy: the child equal to the argmax). A rejected child's token is removed from the
    distribution before the next is tried, so with sampling the kept token is still drawn
    from the backbone's distribution (the rule of SpecInfer / EAGLE for several
    deterministic drafts).

    Args:
        tree: the step's tree (node 0 = t+1, already emitted).
        logits: (T, V) the backbone's logits at the tree's nodes (one LM-head product for all).
    Returns:
        (path, p): the kept nodes from the root (path[0] = 0), and the (V,) distribution of
        the token after the last kept node (a residual where children were rejected).
    """
    path = [0]
    while True:
        p = sampler.probs(logits[path[-1]])
        for child in tree.children(path[-1]):
            ok, p = sampler.accept(p, tree.tokens[child])
            if ok:
                path.append(child)
                break
        else:
            return path, p
