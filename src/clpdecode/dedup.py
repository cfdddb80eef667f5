"""Exact and near-duplicate texts: normalisation, word 5-gram shingles, MinHash LSH in numpy.

Below everything that reads prompt data (datasets.py applies it to ShareGPT). The rule:

- normalise: lowercase; keep only runs of letters/digits (punctuation, underscores and
  symbols become separators), each CJK character a token of its own; one space between
  tokens. Two texts are **exact duplicates** when their normalised texts are equal.
- shingles: the set of hashed 5-token windows of the normalised text (a text of fewer
  than 5 tokens is one shingle: itself). Two texts are **near duplicates** when the
  Jaccard similarity of their shingle sets is >= NEAR_JACCARD (0.8).
- candidates come from MinHash LSH (BANDS x ROWS hash functions, multiply-shift hashing
  of the 64-bit shingle hashes; 16 bands of 5 rows find a pair at Jaccard 0.8 with
  probability 0.998), and every candidate pair is confirmed with the exact Jaccard of the
  two shingle sets, so no pair below the threshold is ever joined.

Everything is deterministic (no Python `hash`, fixed seeds), so the same texts give the
same groups on every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SHINGLE = 5
NEAR_JACCARD = 0.8
BANDS, ROWS = 16, 5
MAX_TOKENS = 4000  # shingles come from a text's first MAX_TOKENS tokens (long pastes)
_SEED = 20240617

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")
_M64 = np.uint64(0x9E3779B97F4A7C15)


def tokens(text: str) -> list[str]:
    """The normalised tokens of a text (see the module docstring)."""
    return _TOKEN.findall(text.lower())


def normalise(text: str) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed: the key of exact duplicates."""
    return " ".join(tokens(text))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a well-spread 64-bit hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def shingle_sets(docs: list[list[str]], n: int = SHINGLE) -> list[np.ndarray]:
    """For each token list: the sorted unique uint64 hashes of its n-token windows (a list
    of fewer than n tokens is one window: itself; an empty list has no shingles).

    Vectorised over all documents at once. Token ids are assigned in order of first
    appearance, so hashes are only comparable within one call (all that is compared).
    """
    flat = [t for d in docs for t in d]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(flat))}
    ids = np.fromiter(map(vocab.__getitem__, flat), np.uint64, count=len(flat))
    lens = np.array([len(d) for d in docs], np.int64)
    ends = np.cumsum(lens)
    starts = ends - lens
    width = np.minimum(lens, n)  # window length of each document
    n_win = np.where(lens > 0, lens - width + 1, 0)
    doc = np.repeat(np.arange(len(docs)), n_win)
    # Window w of document d starts at starts[d] + w.
    first = np.repeat(starts, n_win) + (np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win))
    w = width[doc]
    with np.errstate(over="ignore"):
        h = w.astype(np.uint64)
        for j in range(n):
            take = j < w
            x = ids[np.minimum(first + j, max(len(ids) - 1, 0))] if len(ids) else np.zeros(0, np.uint64)
            h = np.where(take, _mix(h * _M64 + x), h)
    order = np.lexsort((h, doc))
    h, doc = h[order], doc[order]
    keep = np.ones(len(h), bool)
    keep[1:] = (h[1:] != h[:-1]) | (doc[1:] != doc[:-1])
    h, doc = h[keep], doc[keep]
    counts = np.bincount(doc, minlength=len(docs))
    return np.split(h, np.cumsum(counts)[:-1])


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def minhash(sets: list[np.ndarray], n_hashes: int = BANDS * ROWS) -> np.ndarray:
    """(len(sets), n_hashes) uint32 MinHash signatures; every set must be non-empty."""
    rng = np.random.default_rng(_SEED)
    a = rng.integers(1, 2**63, n_hashes, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, n_hashes, dtype=np.uint64)
    flat = np.concatenate(sets)
    starts = np.cumsum([0] + [len(s) for s in sets[:-1]])
    sig = np.empty((len(sets), n_hashes), np.uint32)
    with np.errstate(over="ignore"):
        for k in range(n_hashes):
            v = ((a[k] * flat + b[k]) >> np.uint64(32)).astype(np.uint32)
            sig[:, k] = np.minimum.reduceat(v, starts)
    return sig


def lsh_candidates(sig: np.ndarray, bands: int = BANDS, rows: int = ROWS,
                   max_bucket: int = 200) -> set[tuple[int, int]]:
    """Pairs (i < j) that share at least one band of their signatures.

    A bucket larger than max_bucket (a template many texts share) contributes only the
    pairs of each member with its bucket's first `max_bucket` members, so the pair count
    stays bounded; near duplicates inside it are then still found through the other bands
    and the confirmed pairs' transitive joins.
    """
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        block = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.full(len(sig), np.uint64(band), np.uint64)
        with np.errstate(over="ignore"):
            for c in range(rows):
                key = _mix(key * _M64 + block[:, c])
        order = np.argsort(key, kind="stable")  # members of a bucket in input order
        sk = key[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        sizes = np.diff(np.r_[starts, len(sk)])
        two = starts[sizes == 2]  # the common case, vectorised
        pairs.update(zip(order[two].tolist(), order[two + 1].tolist()))
        for st, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
            grp = order[st : st + size].tolist()
            for x in range(1, size):
                for y in grp[: min(x, max_bucket)]:
                    pairs.add((y, grp[x]))
    return pairs


@dataclass
class DupGroups:
    """Duplicate structure of a list of texts."""

    key: list[str]  # normalised text of each input
    exact_of: np.ndarray  # (n,) index of the first input with the same normalised text
    near_pairs: list[tuple[int, int]]  # confirmed near-duplicate pairs of distinct normalised texts (input indices)


def find_duplicates(texts: list[str], threshold: float = NEAR_JACCARD) -> DupGroups:
    """Exact duplicates (equal normalised text) and near duplicates (shingle Jaccard >=
    threshold, found by MinHash LSH and confirmed exactly) among `texts`.

    Texts that normalise to nothing (only punctuation or symbols) are nobody's duplicate.
    """
    keys, first, exact_of = [], {}, np.arange(len(texts))
    uniq: list[int] = []  # input index of each distinct normalised text
    docs: list[list[str]] = []
    for i, t in enumerate(texts):
        toks = tokens(t)
        key = " ".join(toks)
        keys.append(key)
        if not key:
            continue
        j = first.setdefault(key, i)
        exact_of[i] = j
        if j == i:
            uniq.append(i)
            docs.append(toks[:MAX_TOKENS])
    sets = shingle_sets(docs)
    near: list[tuple[int, int]] = []
    if len(sets) > 1:
        sig = minhash(sets)
        for a, b in sorted(lsh_candidates(sig)):
            if jaccard(sets[a], sets[b]) >= threshold:
                near.append((uniq[a], uniq[b]))
    return DupGroups(keys, exact_of, near)


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller index stays the root: a cluster is named by its earliest member.
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
