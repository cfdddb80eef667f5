"""`clp profile`: what one decode step costs, piece by piece, for each numerics.

The numbers that decide whether multi-token decoding pays on a machine: the trunk forward
over T = 1, 2, 3, 5 and 8 new tokens on a KV cache of `context` positions (with the lean
engine and with transformers' forward, same weights and numerics), the LM head per
position, the MTP heads, and whether the rows of a multi-token step are computed
independently (required for verified decoding to reproduce AR exactly).

Timings are medians over rounds that interleave the step sizes (and engines), so a burst
of load from other processes on a shared machine spreads over all of them instead of
landing on one.
"""

from __future__ import annotations

import statistics
import time

import torch

from .cpu import cpu_info

STEP_TOKENS = (1, 2, 3, 5, 8)
ROW_CHECK_TOKENS = 3  # the row-independence check: one 3-token step against three 1-token steps


def largest_step(tokens=STEP_TOKENS, tree_sizes=(8,)) -> int:
    """Positions past the cached context that profile_step uses: its largest step (a tree
    of N drafts is N + 1 tokens)."""
    return max([*tokens, *(s + 1 for s in tree_sizes), ROW_CHECK_TOKENS])


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)


def _step_costs(backbone, caches: dict, new: dict, repeats: int, trees: dict | None = None) -> dict:
    """Median ms of a forward over new[t] on each cache (then rolled back), interleaved.

    trees: {key: DraftTree} timed as tree steps (mask and positions) on the lean cache, keyed
    "tree<size>" in the result; a tree step is rolled back as a whole as well.
    """
    from ..decoding.loop import decode_forward

    items = {t: (lambda c, ids=ids: backbone.forward(ids, c)) for t, ids in new.items()}
    for key, tree in (trees or {}).items():
        items[key] = lambda c, tree=tree: decode_forward(backbone, tree.tokens, c, tree)[0]
    sizes = {t: t for t in new} | {key: len(tree) for key, tree in (trees or {}).items()}
    times = {(e, t): [] for e in caches for t in items}
    for r in range(repeats + 1):
        for e, cache in caches.items():
            for t, step in items.items():
                if isinstance(t, str) and e != "lean":
                    continue
                a = time.perf_counter()
                step(cache)
                dt = time.perf_counter() - a
                backbone.rollback(cache, sizes[t])
                if r:  # round 0 warms up
                    times[(e, t)].append(dt)
    return {e: {t: round(statistics.median(times[(e, t)]) * 1000, 2) for t in items if times[(e, t)]}
            for e in caches}


def example_tree(size: int, lo: int, hi: int, g: torch.Generator):
    """A draft tree of `size` nodes shaped as the verified policy's are: a chain of up to 4
    drafts, then runners-up, the likeliest (shallowest) first."""
    from ..decoding.tree import DraftTree

    def tok():
        return int(torch.randint(lo, hi, (), generator=g))

    tree = DraftTree(tok())
    chain = [0]
    for _ in range(min(4, size)):
        chain.append(tree.add(chain[-1], tok()))
    parents = chain[:-1]  # runners-up hang below the chain's nodes, shallowest first
    while len(tree) <= size:
        tree.add(parents[(len(tree) - len(chain)) % len(parents)], tok())
    return tree


@torch.inference_mode()
def profile_step(backbone, drafter=None, context: int = 256, repeats: int = 9, engines=("lean", "hf"),
                 tokens=STEP_TOKENS, tree_sizes=(8,)) -> dict:
    """Median milliseconds of each part of a decode step at `context` cached tokens.

    engines: which forwards to time: "lean" (skipped where the backbone runs transformers'
    forward) and "hf" (transformers' module stack and DynamicCache, the reference).
    `forward_ms` is the backbone's own engine (lean where supported); every timed engine is
    in `forward_ms_by_engine`. tree_sizes: draft trees of these many draft nodes, timed
    as tree steps (one forward with the tree mask) on the lean engine, keyed "tree<N>"
    (their T is N + 1: compare with forward_ms at T = N + 1).
    """
    g = torch.Generator().manual_seed(0)
    lo, hi = min(100, backbone.info.vocab_size // 2), min(10_000, backbone.info.vocab_size)
    prompt = torch.randint(lo, hi, (1, context), generator=g)
    own = backbone.info.engine
    caches = {}
    for e in engines:
        if e == "lean" and own != "lean":
            continue
        cache = backbone.new_cache(capacity=context + largest_step(tokens, tree_sizes), engine=e)
        backbone.forward(prompt, cache)
        caches[e] = cache
    new = {t: torch.randint(lo, hi, (1, t), generator=g) for t in tokens}
    trees = {f"tree{s}": example_tree(s, lo, hi, g) for s in tree_sizes} if "lean" in caches else {}
    by_engine = _step_costs(backbone, caches, new, repeats, trees)
    out = {"numerics": backbone.info.numerics, "engine": own, "threads": torch.get_num_threads(), "cpu": cpu_info(),
           "context": context, "repeats": repeats}
    if own in by_engine:
        out["forward_ms"] = by_engine[own]
        if 1 in tokens and 5 in tokens:
            out["ratio_5_to_1"] = round(by_engine[own][5] / by_engine[own][1], 3)
    out["forward_ms_by_engine"] = by_engine
    del caches
    h = torch.randn(3, backbone.info.hidden_size, generator=g)
    out["lm_head_ms_1_row"] = _median_ms(lambda: backbone.logits(h[:1]), repeats)
    out["lm_head_ms_3_rows"] = _median_ms(lambda: backbone.logits(h), repeats)
    if drafter is not None:
        # One decode step of drafting at `context` cached positions, through the session the
        # policies use (independent heads or a chained drafter alike): observe the 2 states a
        # verified step returns after accepting one draft, then propose k drafts.
        d = backbone.info.hidden_size
        session = drafter.session(backbone)
        session.observe(torch.randn(context, d, generator=g), [5] * (context - 1))
        session.propose(h[0], 5, 0)
        state = getattr(session, "state", None)

        def draft_step():
            session.observe(h[:2], [5])
            session.propose(h[1], 5, drafter.k)
            if state is not None:
                state.length -= 2  # stay at `context` positions

        out["heads_ms"] = _median_ms(draft_step, repeats)
        if drafter.clp is not None:
            out["clp_ms"] = _median_ms(lambda: drafter.clp.decide(h[0], 0.5), repeats)
    # Row independence (the backbone's own engine): a 3-token step against three 1-token steps.
    x = torch.randint(lo, hi, (1, ROW_CHECK_TOKENS), generator=g)
    c1, c2 = backbone.new_cache(), backbone.new_cache()
    backbone.forward(prompt, c1)
    backbone.forward(prompt, c2)
    joint = backbone.forward(x, c1)[0]
    single = torch.cat([backbone.forward(x[:, i : i + 1], c2)[0] for i in range(ROW_CHECK_TOKENS)])
    out["row_max_abs_diff"] = float((joint - single).abs().max())
    return out
