"""Training examples from cached hidden states.

A features shard holds, per answer position j of each sequence: ``hidden[j]`` (d,), the
backbone state whose LM-head argmax is answer token j (the backbone's "t+1"), and
``tokens[j]``. For a head with target offset o (o = 2 under Backbone-as-Architect: head i
-> t+1+i), the target of head i at j is tokens[j + o - 2 + i], when the sequence is that
long.

Splits, by sequence: ``heldout`` (the held-out rule's, datasets.sharegpt_split: every
evaluation), and the rest split again into ``heads`` (trains the heads) and ``predictor``
(trains CLP and the gates on head predictions the heads were not fitted to, so that their
labels are honest).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ClpError

IGNORE = -100


@dataclass
class Features:
    hidden: torch.Tensor  # (N, d) fp16
    tokens: torch.Tensor  # (N,) answer tokens; tokens[j] is the backbone's t+1 at row j
    seq: torch.Tensor  # (N,) sequence id (negative: teacher-forced ShareGPT text)
    split: np.ndarray  # (N,) "heads" | "predictor" | "heldout"
    on_path: torch.Tensor  # (N,) bool: the sequence's next row follows the backbone's greedy choice

    def targets(self, k: int, offset: int = 2) -> torch.Tensor:
        """(N, k) target token of head i at each row.

        IGNORE past the sequence end, and where the sequence left the backbone's greedy
        path before the target (teacher-forced text), since the target is then unknown.
        """
        n = len(self.tokens)
        out = torch.full((n, k), IGNORE, dtype=torch.long)
        valid = torch.ones(n, dtype=torch.bool)  # chain from j to j+shift is on the path
        shift_done = 0
        for i in range(k):
            shift = offset - 1 + i  # rows ahead of j holding head i's target
            while shift_done < shift:
                s = shift_done
                step = torch.zeros(n, dtype=torch.bool)
                step[: n - s - 1] = (self.seq[s + 1 :] == self.seq[: n - s - 1]) & self.on_path[s : n - 1]
                valid &= step
                shift_done += 1
            if shift == 0:
                out[:, i] = self.tokens
                continue
            tgt = torch.full((n,), IGNORE, dtype=torch.long)
            tgt[: n - shift] = self.tokens[shift:]
            out[:, i] = torch.where(valid, tgt, torch.tensor(IGNORE))
        return out

    def rows(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.nonzero(self.split == split)[0])


def sequence_states(feats: Features, split: str) -> list[tuple]:
    """The rows of a split as whole sequences, in the layout of heads.accuracy.heldout_states:
    [(states (1, n+1, d), ids (1, n+1), answer_mask (1, n+1), None)], one per sequence (no
    aux-layer states: these caches hold the last state only).

    Row j's state is the one whose next token is answer token j, so at position j of that
    layout ids[j+1] = tokens[j]. ids[0] (the prompt's last token, not cached) and the state
    at position n (none: the answer has ended) are padding that no draft reads or scores.
    """
    rows = feats.rows(split)
    # A sequence's rows are consecutive (as Features.targets assumes).
    _, counts = torch.unique_consecutive(feats.seq[rows], return_counts=True)
    out = []
    for seq_rows in torch.split(rows, counts.tolist()):
        n = len(seq_rows)
        states = torch.zeros(1, n + 1, feats.hidden.shape[1])
        states[0, :n] = feats.hidden[seq_rows].float()
        ids = torch.zeros(1, n + 1, dtype=torch.long)
        ids[0, 1:] = feats.tokens[seq_rows]
        mask = torch.zeros(1, n + 1, dtype=torch.bool)
        mask[0, :n] = True
        out.append((states, ids, mask, None))
    return out


SOURCES = ("all", "distilled", "teacher")


def load_features(features_dir: Path, predictor_share: float = 0.2, sources: str = "all") -> Features:
    """Load cached hidden states. `sources`: all, distilled (self-generated answers only) or
    teacher (teacher-forced ShareGPT only, plus the distilled rows CLP and evaluation need)."""
    if sources not in SOURCES:
        raise ClpError(f"sources must be one of {', '.join(SOURCES)}")
    from .distill import check_features_rule

    check_features_rule(features_dir)  # held-out flags of today's rule, or a clear error
    # Self-distilled shards are always read: even "teacher" needs them for CLP and evaluation.
    shards = sorted(Path(features_dir).glob("shard-*.npz"))
    shards += sorted(Path(features_dir).glob("tf-*.npz")) if sources != "distilled" else []
    if not shards:
        raise ClpError(f"no cached hidden states in {features_dir}: run `clp distill` first")
    parts = [np.load(s) for s in shards]
    hidden = np.concatenate([p["hidden"] for p in parts])
    tokens = np.concatenate([p["tokens"] for p in parts]).astype(np.int64)
    seq = np.concatenate([p["seq"] for p in parts]).astype(np.int64)
    heldout = np.concatenate([p["heldout"] for p in parts])
    on_path = np.concatenate([p["on_path"] if "on_path" in p else np.ones(len(p["tokens"]), bool) for p in parts])
    # Every n-th self-distilled training sequence (by id) trains CLP and the gates: the same
    # ones on every run. Teacher-forced rows (seq < 0) never do: their labels are partial.
    own = np.unique(seq[(seq >= 0) & ~heldout])
    every = max(1, round(1 / predictor_share)) if predictor_share > 0 else 0
    predictor = np.isin(seq, own[::every]) if every else np.zeros(len(seq), bool)
    split = np.where(heldout, "heldout", np.where(predictor, "predictor", "heads"))
    if sources == "teacher":  # distilled sequences may serve CLP and evaluation, not the heads
        split = np.where((seq >= 0) & (split == "heads"), "unused", split)
    return Features(torch.from_numpy(hidden), torch.from_numpy(tokens), torch.from_numpy(seq), split,
                    torch.from_numpy(on_path))


def draft_vocabulary(tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens (all tokens when size is 0), sorted by id."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(tokens, minlength=vocab_size)
    top = counts.argsort(descending=True)[:size]
    return top.sort().values


def to_draft_index(targets: torch.Tensor, draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Map backbone token ids to draft-vocabulary indices; tokens outside -> IGNORE."""
    lut = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    lut[draft_ids] = torch.arange(len(draft_ids))
    out = torch.full_like(targets, IGNORE)
    valid = targets >= 0
    out[valid] = lut[targets[valid]]
    return out


# ---- token sequences for the drafter (training/drafter.py) -----------------------------------
TURNS = ("all", "first")  # clp train --turns: every answer of a conversation, or its first only


def _chat_messages(turns: list[dict]) -> list[dict]:
    """A ShareGPT conversation as chat messages, user first, roles alternating; it stops at
    the first malformed turn (unknown role, empty text, two turns of one role in a row)."""
    role = {"human": "user", "gpt": "assistant"}
    messages = []
    for t in turns:
        r, v = role.get(t.get("from")), t.get("value")
        if r is None or not isinstance(v, str) or not v.strip():
            break
        if messages and messages[-1]["role"] == r:
            break
        messages.append({"role": r, "content": v})
    return messages if messages and messages[0]["role"] == "user" else []


def _chat_turns(tokenizer, turns: list[dict], max_len: int,
                first_only: bool = False) -> list[tuple[list[int], list[bool]]]:
    """A ShareGPT conversation through the chat template as one (ids, mask) sequence per
    answer: the answer with as many of its earlier turns as context as fit in half of
    max_len (at least its own user turn, cut from the left when that alone is longer), so
    a later turn trains in its context instead of being cut off by max_len, as it was when a
    conversation was one sequence (84% of them hit the 384-token cap there and 82% of the
    trained tokens were first answers). mask[p] is True when token p+1 belongs to the
    answer (its text and end-of-turn). `first_only`: the first answer only."""
    messages = _chat_messages(turns)

    def render(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    budget = max_len // 2  # context tokens; the answer gets the rest
    out = []
    for i in range(1, len(messages), 2):  # the assistant messages
        j = i - 1  # its own user turn, then earlier exchanges while they fit
        prompt = render(messages[j:i], True)
        while j >= 2:
            longer = render(messages[j - 2 : i], True)
            if len(longer) > budget:
                break
            j, prompt = j - 2, longer
        full = render(messages[j : i + 1], False)
        if full[: len(prompt)] != prompt or len(full) <= len(prompt):
            break  # a template that does not extend its prefix: skip the rest of the conversation
        answer = full[len(prompt) :]
        context = prompt[-budget:] if len(prompt) > budget else prompt
        ids = (context + answer)[:max_len]
        # mask[p]: token p + 1 is an answer token.
        out.append((ids, [len(context) - 1 <= p < len(ids) - 1 for p in range(len(ids))]))
        if first_only:
            break
    return out


def trainable(sequences: list, max_len: int | None = None) -> list:
    """The (ids, mask) sequences with a token to train within their first max_len tokens (a
    prompt or context longer than that leaves an answer nothing)."""
    return [(ids, m) for ids, m in sequences if any(m[:max_len])]


def answer_sequences(corpus_records: list[dict], max_len: int = 384, predictor_share: float = 0.08,
                     seed: int = 0) -> tuple[list, list]:
    """The self-distilled answers of the training split as (ids, mask) sequences (prompt +
    the backbone's greedy answer; answer tokens train), shuffled, split into (drafter's,
    predictors'): a `predictor_share` of them, never seen by the drafter, is CLP's and the
    gates' data (their labels need the backbone's own continuations)."""
    import random

    answers = []
    for r in corpus_records:
        if r.get("split") != "train" or len(r.get("answer", ())) < 2:
            continue
        ids = (list(r["prompt"]) + list(r["answer"]))[:max_len]
        n_prompt = len(r["prompt"])
        answers.append((ids, [n_prompt - 1 <= p < len(ids) - 1 for p in range(len(ids))]))
    answers = trainable(answers)
    random.Random(seed).shuffle(answers)
    n_pred = max(1, int(len(answers) * predictor_share)) if len(answers) >= 2 and predictor_share > 0 else 0
    return answers[n_pred:], answers[:n_pred]


def flat_ids(seqs: list[list[int]], dtype=np.uint32) -> tuple[np.ndarray, np.ndarray]:
    """Lists of token ids (or mask bits) -> their concatenation (uint32: Gemma's vocabulary
    passes uint16) and the (len + 1,) int64 offsets of each list: the compact layout of
    every packed token file."""
    off = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    cat = np.concatenate([np.asarray(s, dtype) for s in seqs]) if seqs else np.zeros(0, dtype)
    return cat, off


def save_sequences(path, sequences: list[tuple[list[int], list[bool]]]) -> None:
    """(ids, mask) sequences -> one compressed .npz (flat uint32 ids, uint8 mask, offsets),
    written atomically: the teacher-forced data carried to a machine without ShareGPT's
    package (`clp train --sequences`)."""
    from ..atomic import atomic_file

    ids, off = flat_ids([i for i, _ in sequences])
    mask, _ = flat_ids([m for _, m in sequences], np.uint8)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, ids=ids, mask=mask, off=off)

    atomic_file(Path(path), write)


def write_sequences(backbone, path, max_len: int = 384, conversations: int | None = None, turns: str = "all",
                    progress: bool = True) -> dict:
    """ShareGPT's training-split answers as `clp train` reads them (drafter_sequences, no
    self-distilled answers), tokenised here and written to `path` (save_sequences): the
    teacher-forced data for `clp train --sequences` on a machine without ShareGPT's package.
    Returns what was written."""
    convs, _ = drafter_sequences(backbone, [], max_len=max_len, conversations=conversations, predictor_share=0,
                                 progress=progress, turns=turns)
    if not convs:
        raise ClpError("no ShareGPT answer fits: nothing to write (raise --max-len or --conversations)")
    save_sequences(path, convs)
    return {"out": str(path), "sequences": len(convs), "tokens": sum(len(i) for i, _ in convs),
            "trained_tokens": sum(sum(m) for _, m in convs), "bytes": Path(path).stat().st_size}


def load_sequences(path, vocab_size: int | None = None) -> list[tuple[list[int], list[bool]]]:
    """What save_sequences wrote; a clear error for a missing or foreign file, or token ids
    outside the backbone's vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise ClpError(f"sequences file {path} does not exist")
    try:
        with np.load(path) as z:
            ids, mask, off = z["ids"], z["mask"], z["off"]
    except (OSError, ValueError, KeyError) as e:
        raise ClpError(f"{path} is not a sequences file written by save_sequences ({e})") from None
    if len(ids) != len(mask) or len(off) == 0 or off[-1] != len(ids):
        raise ClpError(f"{path}: ids, mask and offsets disagree")
    if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
        raise ClpError(f"{path} holds token id {int(ids.max())}, outside this backbone's vocabulary of {vocab_size}")
    return [(ids[a:b].tolist(), mask[a:b].astype(bool).tolist()) for a, b in zip(off[:-1], off[1:])]


def drafter_sequences(backbone, corpus_records: list[dict], max_len: int = 384, conversations: int | None = None,
                      predictor_share: float = 0.08, seed: int = 0, progress: bool = True, sequences=None,
                      turns: str = "all"):
    """The drafter's data: (train, predictor) lists of (ids, mask), mask[p] True when token
    p+1 trains.

    - self-distilled answers of the corpus's training split (prompt + the backbone's greedy
      answer; answer tokens train); a `predictor_share` of them, never seen by the drafter,
      goes to CLP and the gates (their labels need the backbone's own continuations);
    - ShareGPT conversations of the training split (datasets.sharegpt_split: deduplicated,
      no benchmark prompt), one sequence per answer with its earlier turns as context
      (_chat_turns), through the chat template, the answer's tokens training
      (`conversations`: how many conversations, None = all, 0 = none; `turns`: "all" answers
      or each conversation's "first"); a backbone without a chat template (a base model)
      reads each answer as plain text.
    Tokenised conversations are cached in <cache>/datasets (keyed by the split rule, the
    tokenizer and max_len). `sequences`: a save_sequences file of conversations tokenised
    elsewhere, read in their place (no ShareGPT package needed).
    """
    import hashlib
    import json
    import random

    from tqdm import tqdm

    from ..backbone.loading import cache_dir
    from ..datasets import sharegpt_conversations, sharegpt_split

    if turns not in TURNS:
        raise ClpError(f"turns must be one of {', '.join(TURNS)}, got {turns!r}")
    train, pred = answer_sequences(corpus_records, max_len, predictor_share, seed)
    if sequences is not None:
        return train + trainable(load_sequences(sequences, backbone.info.vocab_size), max_len), pred
    if conversations == 0:  # the self-distilled answers only
        return train, pred
    tok = backbone.tokenizer
    chat = backbone.has_chat
    # The held-out rule of the prompts this backbone is scored on: first turns through the
    # chat template ("prompts" grid), or for a base model passages of ShareGPT's answers
    # ("records" grid, its corpus's): under the other grid 20 of Gemma's 24 held-out
    # passages belonged to training records, and their answers were trained on.
    grid = "prompts" if chat else "records"
    split = sharegpt_split(grid, progress=progress)

    def tokenise(records) -> list:
        out, n_conv = [], 0
        for r, rec in tqdm(records, desc="train: tokenising ShareGPT conversations", unit="conv",
                           disable=not progress):
            if split.of_record(r) != "train":
                continue
            conv = rec.get("conversations") or []
            if chat:
                out.extend(_chat_turns(tok, conv, max_len, first_only=turns == "first"))
            else:  # a base model: each answer as plain text, every token trains
                for t in conv:
                    if t.get("from") == "gpt" and isinstance(t.get("value"), str) and t["value"].strip():
                        ids = tok(t["value"])["input_ids"][:max_len]
                        if len(ids) >= 8:
                            out.append((ids, [True] * (len(ids) - 1) + [False]))
                            if turns == "first":
                                break
            n_conv += 1
            if conversations is not None and n_conv >= conversations:
                break
        return out

    records = list(enumerate(sharegpt_conversations()))
    random.Random(seed + 1).shuffle(records)
    if conversations is not None:  # a sample: tokenised as needed
        convs = tokenise(records)
    else:
        key = hashlib.sha256(json.dumps([split.key, grid, backbone.name, backbone.info.vocab_size, chat, max_len,
                                         seed, "per-answer", turns]).encode()).hexdigest()[:16]
        # Flat arrays (save_sequences), not a pickled list: 36k sequences load in 2 s, not 35.
        path = cache_dir() / "datasets" / f"drafter-sequences-{key}.npz"
        legacy = path.with_suffix(".pt")  # the same data as a pickled list (before the .npz)
        if path.is_file():
            if progress:
                print(f"train: ShareGPT's answers, tokenised ({path})", file=sys.stderr)
            convs = load_sequences(path)
        else:
            convs = torch.load(legacy) if legacy.is_file() else tokenise(records)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_sequences(path, convs)
        legacy.unlink(missing_ok=True)
    return train + trainable(convs), pred
