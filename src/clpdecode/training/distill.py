"""Self-distilled training data: the backbone's own greedy answers to ShareGPT prompts.

Two stages, both resumable:

1. ``generate_corpus``: batched greedy generation (left padding), written as small
   token-id shards (``shard-*.jsonl``, one per batch, each written atomically). This is
   the slow part (~50 tok/s on 2 cores); the corpus is compact enough to commit.
2. ``build_features``: one prefill per sequence over prompt + answer, caching the
   backbone's post-norm hidden states of the answer positions in fp16 (~300 tok/s), so
   that head, CLP and gate training never rerun the backbone. Not committed.

Because the answer is the backbone's own greedy continuation, the target of head i at
answer position t is simply the answer token at t+1+i.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file, atomic_write_text
from ..corpus import corpus_grid, greedy_answers, read_corpus  # noqa: F401  (read_corpus re-exported)
from ..datasets import opening_prompt, passages, sharegpt_conversations, sharegpt_split
from ..errors import ClpError


@dataclass
class DistillConfig:
    n_prompts: int = 2000  # ShareGPT prompts to answer (first human turns, shuffled)
    max_prompt_tokens: int = 320  # longer prompts are skipped, not truncated
    max_new_tokens: int = 192  # answer length cap
    batch_size: int = 16  # batched greedy generation: ~4x the tokens/s of batch 1 on CPU
    # Which prompts are held out is the rule's (datasets.sharegpt_split), never this: None
    # takes prompts in the seeded shuffled order whatever their split (about 3.5% are held
    # out); N makes every N-th chosen prompt a held-out one (a small corpus then has some).
    heldout_every: int | None = None
    seed: int = 0
    # "sharegpt": first human turns through the chat template (instruct models);
    # "passages": plain-text openings of ShareGPT answers to continue (base models).
    prompt_set: str = "sharegpt"
    device: str = "cpu"  # "cuda": answer with an fp32 copy of the backbone on the GPU (raise batch_size)


DISTILL_PROMPT_SETS = ("sharegpt", "passages")


def _candidate_prompts(cfg: DistillConfig) -> tuple[list[str], list[int], list[int], bool | None]:
    """The texts to answer.

    Args:
        cfg: its prompt_set picks the texts.
    Returns:
        (texts, their corpus indices "i", their ShareGPT record indices, chat): "i" is the
        record index for passages and the prompt number for ShareGPT prompts (as the
        committed corpora have it); chat is False for passages (plain text) and None
        otherwise (the backbone's template, if any).
    """
    if cfg.prompt_set == "passages":
        pairs = passages("all")
        return [text for _, text in pairs], [i for i, _ in pairs], [i for i, _ in pairs], False
    if cfg.prompt_set != "sharegpt":
        raise ClpError(f"unknown distillation prompt set {cfg.prompt_set!r}; use {', '.join(DISTILL_PROMPT_SETS)}")
    texts, records = [], []
    for r, rec in enumerate(sharegpt_conversations()):
        text = opening_prompt(rec)
        if text is not None:
            texts.append(text)
            records.append(r)
    return texts, list(range(len(texts))), records, None


def _grid(cfg: DistillConfig) -> str:
    return "records" if cfg.prompt_set == "passages" else "prompts"


def _select_prompts(backbone, cfg: DistillConfig) -> list[tuple[int, int, str, list[int]]]:
    """(corpus index, record, split, prompt ids) of the prompts to answer, in a seeded order;
    prompts that duplicate a benchmark prompt are never chosen."""
    prompts, index, record, chat = _candidate_prompts(cfg)
    rule = sharegpt_split(_grid(cfg))
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    order = [n for n in order if rule.of_record(record[n]) != "bench"]
    if cfg.heldout_every:
        held = iter([n for n in order if rule.of_record(record[n]) == "heldout"])
        train = iter([n for n in order if rule.of_record(record[n]) == "train"])
        order = []
        for pos in range(len(prompts)):
            n = next(held if pos % cfg.heldout_every == 0 else train, None)
            if n is None:
                break
            order.append(n)
    chosen = []
    for n in order:
        try:
            ids = backbone.encode_prompt(prompts[n], chat=chat)
        except ClpError:
            continue
        if len(ids) <= cfg.max_prompt_tokens:
            chosen.append((index[n], record[n], rule.of_record(record[n]), ids))
        if len(chosen) >= cfg.n_prompts:
            break
    return chosen


def generate_corpus(backbone, corpus_dir: Path, cfg: DistillConfig, progress: bool = True) -> Path:
    """Answer ShareGPT prompts (or continue passages) greedily in batches; resume where an
    earlier run stopped. Each answer is labelled with its prompt's split under the held-out
    rule; readers relabel under the current rule anyway (corpus.read_corpus)."""
    corpus_dir = Path(corpus_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    meta_path = corpus_dir / "meta.json"
    grid = _grid(cfg)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") != backbone.fingerprint:
            raise ClpError(f"{corpus_dir} was generated by another backbone ({old.get('backbone')})")
        if corpus_grid(corpus_dir) not in (None, grid):
            raise ClpError(f"{corpus_dir} holds answers to another prompt set than {cfg.prompt_set}")
    rule = sharegpt_split(grid)
    done = {r["i"] for r in read_corpus(corpus_dir, resplit=False)}
    todo = [c for c in _select_prompts(backbone, cfg) if c[0] not in done]
    if todo or not meta_path.exists():  # a run with nothing to answer keeps the record of the last one that did
        meta = {"backbone": backbone.name, "fingerprint": backbone.fingerprint, "config": cfg.__dict__,
                "grid": grid, "split_rule": rule.key}
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    next_shard = len(list(corpus_dir.glob("shard-*.jsonl")))
    for batch in greedy_answers(backbone, [ids for *_, ids in todo], cfg.max_new_tokens, cfg.batch_size,
                                progress=progress, desc="distill: answering prompts", device=cfg.device):
        lines = []
        for n, ans in batch:
            i, record, split, ids = todo[n]
            lines.append(json.dumps({"i": i, "record": record, "split": split, "prompt": ids, "answer": ans}))
        atomic_write_text(corpus_dir / f"shard-{next_shard:05d}.jsonl", "\n".join(lines) + "\n")
        next_shard += 1
    return corpus_dir


def build_features(backbone, corpus_dir: Path, features_dir: Path, progress: bool = True) -> Path:
    """Cache fp16 hidden states of every answer position, one .npz per corpus shard.

    Each features shard holds, for its answer positions in order: ``hidden`` (N, d) fp16,
    the state that predicted answer token j from the context before it... precisely: row j
    is the hidden state at the position whose LM-head argmax is answer token j; ``tokens``
    (N,) the answer tokens; ``seq`` (N,) a sequence id; ``split`` per sequence.
    """
    from tqdm import tqdm

    corpus_dir, features_dir = Path(corpus_dir), Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(corpus_dir.glob("shard-*.jsonl"))
    if not shards:
        raise ClpError(f"no corpus in {corpus_dir}: run `clp distill` first")
    claim_features_dir(features_dir)
    labels = {r["i"]: r["split"] for r in read_corpus(corpus_dir)}  # the current held-out rule's
    todo = [s for s in shards if not (features_dir / (s.stem + ".npz")).exists()]
    bar = tqdm(todo, desc="distill: caching hidden states", unit="shard", disable=not progress)
    for shard in bar:
        recs = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
        hidden, tokens, seq, split = [], [], [], []
        for r in recs:
            ans = r["answer"]
            if len(ans) < 2 or labels[r["i"]] not in ("train", "heldout"):
                continue  # too short, or a duplicate of a benchmark prompt
            ids = torch.tensor([r["prompt"] + ans])
            h = backbone.forward(ids, backbone.new_cache())[0]  # (T, d)
            p = len(r["prompt"])
            # h[p - 1 + j] is what produced answer token j (the backbone's next-token state).
            hidden.append(h[p - 1 : p - 1 + len(ans)].to(torch.float16).numpy())
            tokens.append(np.asarray(ans, dtype=np.int32))
            seq.append(np.full(len(ans), r["i"], dtype=np.int32))
            split.append(np.full(len(ans), labels[r["i"]] == "heldout", dtype=np.bool_))
        on_path = [np.ones(len(t), dtype=np.bool_) for t in tokens]
        if not hidden:
            continue
        _save_shard(features_dir / (shard.stem + ".npz"), hidden, tokens, seq, split, on_path)
    return features_dir


SPLIT_MARKER = "split.json"


def claim_features_dir(features_dir: Path) -> None:
    """Refuse hidden states cached under another held-out rule, and mark a folder as this rule's.

    Their held-out flags (and the teacher-forced conversations they hold) were chosen by the
    rule of their day; the marker (split.json) records it. A folder with shards and no
    marker predates the deduplicated split.
    """
    from ..datasets import split_rule_key

    features_dir = Path(features_dir)
    marker = features_dir / SPLIT_MARKER
    key = split_rule_key()
    check_features_rule(features_dir, key)
    if not marker.exists():
        atomic_write_text(marker, json.dumps({"split_rule": key}))


def check_features_rule(features_dir: Path, key: str | None = None) -> None:
    """ClpError when the cached hidden states were labelled under another held-out rule."""
    from ..datasets import split_rule_key

    features_dir = Path(features_dir)
    shards = list(features_dir.glob("shard-*.npz")) + list(features_dir.glob("tf-*.npz"))
    if not shards:
        return
    try:
        recorded = json.loads((features_dir / SPLIT_MARKER).read_text()).get("split_rule")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != (key or split_rule_key()):
        raise ClpError(f"the hidden states in {features_dir} were cached under another held-out rule (before "
                       "ShareGPT was deduplicated, or on other data): delete that folder and rerun `clp distill`")


def _save_shard(path: Path, hidden, tokens, seq, heldout, on_path) -> None:
    """Write one features shard atomically (lists of per-sequence arrays, concatenated)."""
    arrays = {name: np.concatenate(parts) for name, parts in
              dict(hidden=hidden, tokens=tokens, seq=seq, heldout=heldout, on_path=on_path).items()}
    atomic_file(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def build_teacher_features(backbone, features_dir: Path, n_conversations: int = 2000, max_tokens: int = 512,
                           per_shard: int = 50, seed: int = 1, progress: bool = True) -> Path:
    """Cheap extra head-training data: ShareGPT's own answers, teacher-forced.

    One prefill per conversation (first human turn + first gpt answer, chat template)
    gives, at each answer position j, the hidden state and the backbone's argmax a_j (its
    "t+1"). a_{j+i} is the backbone's greedy continuation from j exactly when the text
    followed the backbone's choices in between (a_j == x_{j+1}, ...): ``on_path[j]``
    records a_j == x_{j+1}, and training uses a head target only when the whole chain
    before it is on the path. No generation: ~10x the positions per CPU-hour of
    self-distillation. Rows go to the head-training split only (shards ``tf-*.npz``), and
    only conversations the held-out rule lets train are read.
    """
    from tqdm import tqdm

    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    claim_features_dir(features_dir)
    rule = sharegpt_split("prompts")
    pairs = []
    for r, rec in enumerate(sharegpt_conversations()):
        if rule.of_record(r) != "train":  # held out, or a duplicate of a benchmark prompt
            continue
        turns = rec.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            if (turns[0].get("value") or "").strip() and (turns[1].get("value") or "").strip():
                pairs.append((turns[0]["value"], turns[1]["value"]))
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:n_conversations]
    n_shards = (len(pairs) + per_shard - 1) // per_shard
    todo = [s for s in range(n_shards) if not (features_dir / f"tf-{s:05d}.npz").exists()]
    bar = tqdm(todo, desc="distill: teacher-forced hidden states", unit="shard", disable=not progress)
    tok = backbone.tokenizer
    for s in bar:
        hidden, tokens, seq, on_path = [], [], [], []
        for n, (prompt, answer) in enumerate(pairs[s * per_shard : (s + 1) * per_shard]):
            try:
                p_ids = backbone.encode_prompt(prompt)
            except ClpError:
                continue
            a_ids = tok(answer, add_special_tokens=False)["input_ids"]
            room = max_tokens - len(p_ids)
            if room < 16:
                continue
            a_ids = a_ids[:room]
            h = backbone.forward(torch.tensor([p_ids + a_ids]), backbone.new_cache())[0]
            h = h[len(p_ids) - 1 : len(p_ids) - 1 + len(a_ids)]  # row j predicts answer token j
            argmax = backbone.logits(h).argmax(-1)
            text = torch.tensor(a_ids)
            hidden.append(h.to(torch.float16).numpy())
            tokens.append(argmax.numpy().astype(np.int32))
            seq.append(np.full(len(a_ids), -(s * per_shard + n + 1), dtype=np.int32))
            # on_path[j]: the text's token j equals the backbone's choice a_j, so the
            # state at j+1 lies on the backbone's own greedy path from j.
            on_path.append((argmax == text).numpy())
        if not hidden:
            continue
        heldout = [np.zeros(len(t), dtype=np.bool_) for t in tokens]
        _save_shard(features_dir / f"tf-{s:05d}.npz", hidden, tokens, seq, heldout, on_path)
    return features_dir
