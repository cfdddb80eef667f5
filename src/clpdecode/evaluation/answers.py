"""The backbone's greedy answers to a prompt set, for `clp eval-heads --prompts`, cached by content.

Generating them is the slow part (~10-40 tokens/s here), so they are kept in
<cache>/eval-answers/<key>.jsonl, where the key hashes everything that decides them: the
prompts' token ids (so the chat template too), the backbone (name and LM-head fingerprint),
its numerics and engine, max_new_tokens, and how they were generated: on the q4 kernels'
batched step each answer is the prompt's answer alone, whatever the batch; through
transformers' generate() left padding of a batch can move a float, so there a batch's
answers are only reproduced by the same batches (the batch size is part of the key).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import ClpError, check_context

ANSWERS_FORMAT = 1


def answers_key(backbone, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int) -> str:
    how = {"batched_step": True} if backbone.batches_rows else {"batch_size": batch_size}  # corpus.greedy_answers
    blob = json.dumps({"format": ANSWERS_FORMAT, "backbone": backbone.name, "fingerprint": backbone.fingerprint,
                       "numerics": backbone.info.numerics, "max_new_tokens": max_new_tokens, **how,
                       "prompts": prompt_ids}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def answers_path(key: str) -> Path:
    from ..backbone.loading import cache_dir

    return cache_dir() / "eval-answers" / f"{key}.jsonl"


def prompt_answers(backbone, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   progress: bool = True) -> tuple[list[dict], bool]:
    """Greedy answers of the backbone to `prompts` (its chat template when it has one).

    Returns:
        ([{"prompt": ids, "answer": ids}] in the order of `prompts`, whether they came
        from the cache).
    """
    encoded = encode_each(backbone, prompts, backbone.encode_prompt, "prompt", max_new_tokens)
    return encoded_answers(backbone, encoded, max_new_tokens, batch_size, progress)


def encode_each(backbone, items: list, encode, what: str, max_new_tokens: int) -> list[list[int]]:
    """encode(item) for each item, checked to leave room for the answer; an error names the item."""
    encoded = []
    for n, item in enumerate(items):
        try:
            ids = encode(item)
            check_context(len(ids), max_new_tokens, backbone.max_positions)
        except ClpError as e:
            raise ClpError(f"{what} {n + 1}: {e}") from None
        encoded.append(ids)
    return encoded


def second_turn_prompts(backbone, pairs: list[tuple[str, str]], max_new_tokens: int, batch_size: int = 16,
                        progress: bool = True) -> tuple[list[list[int]], bool]:
    """Token ids of two-turn conversations up to the backbone's second answer: the first turn,
    the backbone's own greedy answer to it (as text, as a chat front end sends it back; cut at
    `max_new_tokens` like every answer here), then the second turn.

    Returns:
        (the conversations' token ids, ready for the assistant's second turn; whether the
        first answers came from the cache).
    """
    if not backbone.has_chat:  # before minutes of first answers
        raise ClpError(f"{backbone.name} has no chat template: second turns need one (a base model has no turns)")
    first, cached = prompt_answers(backbone, [a for a, _ in pairs], max_new_tokens, batch_size, progress)
    conversations = [[{"role": "user", "content": turn1},
                      {"role": "assistant", "content": backbone.decode(rec["answer"]).strip()},
                      {"role": "user", "content": turn2}] for (turn1, turn2), rec in zip(pairs, first)]
    return encode_each(backbone, conversations, backbone.encode_chat, "conversation", max_new_tokens), cached


def second_turn_answers(backbone, pairs: list[tuple[str, str]], max_new_tokens: int, batch_size: int = 16,
                        progress: bool = True) -> tuple[list[dict], bool]:
    """Greedy answers of the backbone to the second turn of two-turn conversations
    (second_turn_prompts). The drafter is scored on the second answer, whose context holds a
    whole earlier exchange.

    Returns:
        ([{"prompt": ids, "answer": ids}] of the second turns, whether both turns' answers
        came from the cache).
    """
    encoded, cached = second_turn_prompts(backbone, pairs, max_new_tokens, batch_size, progress)
    recs, cached2 = encoded_answers(backbone, encoded, max_new_tokens, batch_size, progress)
    return recs, cached and cached2


def encoded_answers(backbone, encoded: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                    progress: bool = True) -> tuple[list[dict], bool]:
    """Greedy answers to prompts already tokenised, from the cache when it holds them."""
    from ..corpus import greedy_answers

    key = answers_key(backbone, encoded, max_new_tokens, batch_size)
    path = answers_path(key)
    try:
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if [r["prompt"] for r in recs] == encoded:
            if progress:
                print(f"clp: {len(recs)} cached answers of the backbone ({path})", file=sys.stderr)
            return recs, True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    answers: list[list[int] | None] = [None] * len(encoded)
    for batch in greedy_answers(backbone, encoded, max_new_tokens, batch_size, progress=progress,
                                desc="the backbone's greedy answers"):
        for n, ans in batch:
            answers[n] = ans
    recs = [{"prompt": p, "answer": a} for p, a in zip(encoded, answers)]
    try:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
    except OSError:  # a read-only cache: generated again next time
        pass
    return recs, False
