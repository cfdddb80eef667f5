"""Deduplication and the held-out split: exact and near duplicates are found, unrelated
prompts kept apart, and no held-out cluster has anything in training."""

from __future__ import annotations

import random

import numpy as np
import pytest

from clpdecode import dedup
from clpdecode.datasets import HELDOUT_EVERY, _grid_split, compute_clusters

BASE = ("Write a detailed travel itinerary for five days in Lisbon, with restaurants, museums, "
        "day trips to Sintra and Cascais, and a budget for a couple in their thirties.")


def _words(seed: int, n: int = 40) -> str:
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(5000)}" for _ in range(400)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_normalisation_strips_case_punctuation_and_whitespace():
    assert dedup.normalise("  Hello,   WORLD!!\n\tHow's it_going? ") == "hello world how s it going"
    assert dedup.normalise("你好，世界") == "你 好 世 界"  # CJK: one token per character
    assert dedup.normalise("?!...") == ""


def test_exact_and_near_duplicates_are_found_and_unrelated_texts_kept_apart():
    near = BASE.replace("thirties.", "thirties, please.")  # one word more: Jaccard ~0.9
    texts = [BASE, _words(1), BASE.upper() + "  ", near, _words(2), _words(3), "hi", "Hi!", "?!"]
    g = dedup.find_duplicates(texts)
    assert g.exact_of.tolist() == [0, 1, 0, 3, 4, 5, 6, 6, 8]  # case, spaces, punctuation
    assert g.near_pairs == [(0, 3)]
    sets = dedup.shingle_sets([dedup.tokens(BASE), dedup.tokens(near)])
    assert dedup.jaccard(*sets) >= dedup.NEAR_JACCARD


def test_near_duplicate_threshold_is_exact_not_estimated():
    """LSH only proposes pairs; every pair kept has a true Jaccard >= the threshold, and
    pairs far above it are all found."""
    rng = random.Random(0)
    texts, truth = [], []
    for k in range(60):
        words = _words(100 + k, 60).split()
        texts.append(" ".join(words))
        edited = list(words)
        for _ in range(rng.choice([1, 2, 12])):  # light edits (near duplicate) or heavy ones (not)
            edited[rng.randrange(len(edited))] = f"x{rng.randrange(10**6)}"
        texts.append(" ".join(edited))
        truth.append((2 * k, 2 * k + 1))
    g = dedup.find_duplicates(texts)
    docs = dedup.shingle_sets([dedup.tokens(t) for t in texts])
    for a, b in g.near_pairs:
        assert dedup.jaccard(docs[a], docs[b]) >= dedup.NEAR_JACCARD
    found = set(g.near_pairs)
    for a, b in truth:
        if dedup.jaccard(docs[a], docs[b]) >= 0.9:
            assert (a, b) in found
    assert all(a // 2 == b // 2 for a, b in g.near_pairs)  # unrelated texts never paired


def _record(rid: str, *turns: str, opens_with_gpt: bool = False) -> dict:
    conv = [{"from": "gpt", "value": "Sure."}] if opens_with_gpt else []
    for t in turns:
        conv += [{"from": "human", "value": t}, {"from": "gpt", "value": "An answer."}]
    return {"id": rid, "conversations": conv}


@pytest.fixture(scope="module")
def synthetic():
    """200 records: unrelated prompts, plus planted exact duplicates, near duplicates,
    a conversation cut into parts, a shared long later turn and a benchmark prompt."""
    recs = [_record(f"c{i}", _words(1000 + i)) for i in range(200)]
    recs[40] = _record("c40", BASE)  # on the grid (prompt number 40)...
    recs[57] = _record("c57", "  " + BASE.lower())  # ...and its exact duplicate off the grid
    recs[60] = _record("c60", _words(7, 60))  # on the grid...
    recs[93] = _record("c93", _words(7, 60) + " thanks")  # ...its near duplicate off the grid
    recs[80] = _record("c80_0", _words(8))  # on the grid, part 0 of a conversation...
    recs[199] = _record("c80_1", _words(9), opens_with_gpt=True)  # ...whose part 1 opens with gpt
    recs[100] = _record("c100", _words(10), "continue")  # held out; "continue" is no link
    recs[101] = _record("c101", _words(11), "continue")
    recs[120] = _record("c120", _words(12), _words(13, 30))  # on the grid; its long 2nd turn...
    recs[133] = _record("c133", _words(13, 30))  # ...opens a training record
    recs[150] = _record("c150", "Please answer: " + _words(14, 50))  # duplicates a benchmark prompt
    bench = {"mtbench": [_words(14, 50) + "?"], "gsm8k": ["What is 2 + 2?"]}
    data = compute_clusters(recs, bench, progress=False)
    return recs, data


def test_clusters_join_duplicates_and_conversation_parts(synthetic):
    recs, data = synthetic
    c = data["cluster"]
    assert c[40] == c[57] and c[60] == c[93] and c[80] == c[199] and c[120] == c[133]
    assert c[100] != c[101]  # a short generic later turn does not join conversations
    assert len(set(c)) == 200 - 4
    assert data["stats"]["exact_duplicate_prompts"] == 1
    assert data["bench"][150] == "mtbench" and data["stats"]["benchmark_prompts_duplicated_in_sharegpt"] == {
        "gsm8k": 0, "mtbench": 1}
    # Record 199 opens with gpt: it has no prompt number.
    assert data["prompt_number"][199] == -1 and data["prompt_number"][198] == 198


def test_heldout_clusters_never_reach_training(synthetic):
    recs, data = synthetic
    split, counts = _grid_split(data, "prompts")
    number = np.asarray(data["prompt_number"])
    cluster = np.asarray(data["cluster"])
    held = set(cluster[split == "heldout"].tolist())
    assert not held & set(cluster[split == "train"].tolist())  # whole clusters, one side
    assert split[40] == split[57] == "train"  # its exact duplicate trained: no longer held out
    assert split[60] == "train" and split[120] == "train"  # near duplicate, shared long turn
    assert split[80] == split[199] == "heldout"  # part 1 was never a prompt: held out with part 0
    assert split[100] == "heldout" and split[150] == "bench"
    on_grid = [r for r in range(len(recs)) if number[r] >= 0 and number[r] % HELDOUT_EVERY == 0]
    assert {r for r in on_grid if split[r] != "heldout"} == {40, 60, 120}
    # Every held-out turn: no exact or near duplicate among training turns.
    train_keys = {dedup.normalise(t["value"]) for r in np.flatnonzero(split == "train")
                  for t in recs[r]["conversations"] if t["from"] == "human"}
    for r in np.flatnonzero(split == "heldout"):
        for t in recs[r]["conversations"]:
            if t["from"] == "human" and len(dedup.tokens(t["value"])) >= 8:
                assert dedup.normalise(t["value"]) not in train_keys
    legacy = data["stats"]["legacy"]
    assert legacy["heldout_with_exact_duplicate_in_training"] == 1
    assert legacy["heldout_with_near_duplicate_in_training"] == 1
    assert legacy["heldout_linked_to_training"] == 3
    assert counts["first_rule_heldout_now_train_or_bench"] == 3


def test_records_grid_numbers_every_record(synthetic):
    """The passages' grid: every record is numbered, so a conversation is held out only when
    all its parts are on the grid."""
    _, data = synthetic
    split, _ = _grid_split(data, "records")
    assert split[80] == split[199] == "train"  # part 1 (record 199) is off the grid
    assert split[100] == "heldout" and split[140] == "heldout"


def test_mtbench_second_turns_have_no_duplicate_among_sharegpts_human_turns():
    """`clp eval-heads --prompts mtbench-2` scores unseen turns: by the split's own duplicate
    test (exact and near), no MT-Bench second turn occurs among ShareGPT's human turns, so
    no training record holds one (the first turns are in the split's benchmark rule)."""
    from clpdecode import datasets

    turns = [t for _, _, t in datasets._human_turns(list(datasets.sharegpt_conversations()))]
    second = [b for _, b in datasets.mtbench_turn_pairs()]
    assert len(second) == 80
    dup = dedup.find_duplicates(turns + second)
    n = len(turns)
    assert all(int(dup.exact_of[n + j]) == n + j for j in range(len(second)) if dup.key[n + j])
    assert not [(a, b) for a, b in dup.near_pairs if (a < n) != (b < n)]
