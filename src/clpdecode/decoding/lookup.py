"""n-gram lookup drafts: copy what followed the latest earlier occurrence of the text's tail.

Prompt-lookup decoding (as transformers' `prompt_lookup_num_tokens`) needs no training and
is free where the text repeats itself or its prompt. Here it is one more draft source for
verified decoding, in front of the learned drafter: when the last `min_ngram`..`max_ngram`
tokens occurred before, their continuation is drafted; otherwise the drafter's drafts are
used. Verification keeps the output identical to AR either way.
"""

from __future__ import annotations

import torch


class LookupSession:
    """Wraps a drafting session (same observe / propose interface) with n-gram lookup.

    Args:
        inner: the learned drafter's session (it still sees every state, so its cache
            stays complete when lookup drafts are used instead of its own).
        k: most tokens to draft from a match.
        min_ngram / max_ngram: match lengths tried, longest first; a 1-token match is too
            weak a signal on chatty text, so the default needs 2.
    """

    def __init__(self, inner, k: int, min_ngram: int = 2, max_ngram: int = 4):
        self.inner, self.k = inner, k
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> end position of its latest occurrence
        self.indexed = 0  # n-grams ending before this position are in the index
        self.used = 0  # steps whose drafts came from lookup (for reports and tests)

    def _index_until(self, end: int) -> None:
        for p in range(self.indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if p + 1 >= n:
                    self.index[tuple(self.tokens[p + 1 - n : p + 1])] = p
        self.indexed = max(self.indexed, end)

    def observe(self, rows: torch.Tensor, tokens: list[int]) -> None:
        self.inner.observe(rows, tokens)
        self.tokens.extend(tokens)

    def lookup(self) -> list[int]:
        """The continuation of the latest earlier occurrence of the text's tail."""
        last = len(self.tokens) - 1
        self._index_until(last)  # the tail itself is not a match for itself
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if last + 1 < n:
                continue
            end = self.index.get(tuple(self.tokens[last + 1 - n :]))
            if end is not None:
                return self.tokens[end + 1 : end + 1 + self.k]
        return []

    def propose(self, hidden: torch.Tensor, token: int, m: int) -> list[int]:
        self.tokens.append(token)
        found = self.lookup()
        if found:
            self.used += 1
            self.inner.propose(hidden, token, 0)  # keep the drafter's cache up to date
            return found
        return self.inner.propose(hidden, token, m)
