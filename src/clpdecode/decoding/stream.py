"""Incremental detokenisation for streamed output (the CLI's and the server's)."""

from __future__ import annotations

from typing import Callable


class StreamDecoder:
    """Text of a growing token sequence, piece by piece, in time linear in its length.

    Each push decodes only the tokens since the last printed piece plus a few before them
    (their context: a sentencepiece decoder drops the leading space of a sequence's first
    token, and byte-level tokens may hold part of a character), and returns the new
    suffix; a piece that ends inside a multi-byte character waits for the next token.
    finish() returns whatever the incremental pieces did not cover of the full decode.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens whose text has been returned
        self.printed: list[str] = []

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd") or not text.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        new = text[len(before):]
        self.printed.append(new)
        return new

    def finish(self) -> str:
        full, done = self.decode(self.ids), "".join(self.printed)
        return full[len(done):] if full.startswith(done) else ""
