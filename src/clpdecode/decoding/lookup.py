"""n-gram lookup drafts: copy what followed the latest earlier occurrence of the text's tail.

Prompt-lookup decoding (as transformers' `prompt_lookup_num_tokens`) needs no training and
is free where the text repeats itself or its prompt. Here it is one more draft source for
verified decoding (policies.Verified), in front of the learned drafter: when the last
`min_ngram`..`max_ngram` tokens occurred before, their continuation is drafted (a chain) or
added as a branch (a tree); otherwise the drafter's drafts are used. Verification keeps the
output identical to AR either way.
"""

from __future__ import annotations


class NgramIndex:
    """The text so far (prompt included) and where each of its 2..4-grams last ended.

    Args:
        k: most tokens to draft from a match.
        min_ngram / max_ngram: match lengths tried, longest first; a 1-token match is too
            weak a signal on chatty text, so the default needs 2.
    """

    def __init__(self, k: int, min_ngram: int = 2, max_ngram: int = 4):
        self.k, self.min_ngram, self.max_ngram = k, min_ngram, max_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> end position of its latest occurrence
        self.indexed = 0  # n-grams ending before this position are in the index

    def _index_until(self, end: int) -> None:
        for p in range(self.indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if p + 1 >= n:
                    self.index[tuple(self.tokens[p + 1 - n : p + 1])] = p
        self.indexed = max(self.indexed, end)

    def extend(self, tokens: list[int]) -> None:
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
