"""The self-distilled token-id corpus: where it is shipped, how to read it, and the backbone's
batched greedy answers it (and `clp eval-heads --prompts`) is made of.

Below training (which writes and extends it) and evaluation (which reads its held-out
answers), so that neither imports the other for it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Iterator


def corpus_dir(backbone_name: str) -> Path:
    """The self-distilled token-id corpus shipped for a backbone (held-out answers included):
    read-only input, which nothing writes to."""
    return Path(str(resources.files("clpdecode") / "assets" / "corpus" / backbone_name))


def user_corpus_dir(backbone_name: str) -> Path:
    """Where `clp distill` writes a backbone's corpus unless told otherwise: the cache
    (<cache>/corpus/<backbone>), never the installed package."""
    from .backbone.loading import cache_dir

    return cache_dir() / "corpus" / backbone_name


def _has_answers(folder: Path) -> bool:
    return any(Path(folder).glob("shard-*.jsonl"))


def default_corpus(backbone_name: str) -> Path:
    """The corpus `clp train` and `clp distill` read unless told otherwise: the one `clp
    distill` wrote in the cache once there is one, else the shipped one."""
    own = user_corpus_dir(backbone_name)
    return own if _has_answers(own) else corpus_dir(backbone_name)


def start_user_corpus(backbone_name: str) -> Path:
    """user_corpus_dir, begun as a copy of the shipped corpus (when there is one and the
    cache holds none yet), so that `clp distill --prompts N` extends the shipped answers
    instead of answering those prompts again."""
    import shutil

    from .atomic import atomic_folder

    own, shipped = user_corpus_dir(backbone_name), corpus_dir(backbone_name)
    if not _has_answers(own) and _has_answers(shipped):
        with atomic_folder(own) as tmp:
            for f in shipped.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    return own


def corpus_grid(corpus_dir: Path) -> str | None:
    """The held-out grid of a corpus `clp distill` wrote (datasets.GRIDS): "records" for
    passages, "prompts" for ShareGPT prompts; None for a corpus without its meta.json (not
    made from ShareGPT by `clp distill`: its own "split" labels stand)."""
    meta_path = Path(corpus_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        return None
    return meta.get("grid") or ("records" if config.get("prompt_set") == "passages" else "prompts")


def read_corpus(corpus_dir: Path, resplit: bool = True) -> list[dict]:
    """All records of a corpus, sorted by prompt index: {"i", "split", "prompt", "answer"}.

    With `resplit` (the default) a corpus made from ShareGPT gets its "split" from the
    current held-out rule (datasets.sharegpt_split), whatever rule it was generated under:
    "train", "heldout" or "bench" (duplicates a benchmark prompt: neither trains nor
    evaluates). Each record then also has "record" (its ShareGPT record index) and
    "split_at_generation" (the label written when it was answered). The committed corpora
    were made under the first rule (every 20th prompt held out before any deduplication):
    this is how their leaked held-out answers leave the held-out set.
    """
    recs = []
    for shard in sorted(Path(corpus_dir).glob("shard-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            recs.extend(json.loads(line) for line in f if line.strip())
    recs.sort(key=lambda r: r["i"])
    grid = corpus_grid(corpus_dir) if resplit else None
    if grid is not None and recs:
        from .datasets import sharegpt_split

        split = sharegpt_split(grid)
        for r in recs:
            if "record" not in r:
                r["record"] = r["i"] if grid == "records" else split.record_of_prompt(r["i"])
            r["split_at_generation"] = r["split"]
            r["split"] = split.of_record(r["record"])
    return recs


def greedy_answers(backbone, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                   progress: bool = True, desc: str = "greedy answers",
                   device: str = "cpu") -> Iterator[list[tuple[int, list[int]]]]:
    """The backbone's greedy answers, many generated at once.

    On the CPU with the q4 kernels' batched step (Backbone.batches_rows): through the
    continuous-batching scheduler, `batch_size` answers decoding together, each exactly the
    answer the backbone gives that prompt alone (the step's rows are independent), new
    prompts joining as others finish. Otherwise transformers' generate() in batches of
    `batch_size`, shortest prompts first, left padded (~4x the tokens/s of batch 1 on CPU;
    padding may move a float, so an answer can differ from the prompt's alone); "cuda" runs
    an fp32 copy of the backbone on the GPU (Backbone.fp32_model), where batches of hundreds pay.

    Args:
        prompts: token ids of each prompt.
    Yields:
        Lists of about `batch_size` (index into `prompts`, answer ids up to and including the
        first EOS), as they are done (a caller writes each list as it comes: resumable).
    """
    import torch

    if torch.device(device).type == "cpu" and backbone.batches_rows:
        yield from _scheduled_answers(backbone, prompts, max_new_tokens, batch_size, progress, desc)
        return
    yield from _generate_answers(backbone, prompts, max_new_tokens, batch_size, progress, desc, device)


def _scheduled_answers(backbone, prompts, max_new_tokens, batch_size, progress, desc):
    import time

    from tqdm import tqdm

    from .decoding import GenerationConfig, make_policy
    from .decoding.scheduler import Request, Scheduler

    capacity = max(len(p) for p in prompts) + max_new_tokens if prompts else 1
    # Throughput, not latency: prompts in larger chunks (fewer, fuller steps).
    sched = Scheduler(backbone, slots=batch_size, capacity=capacity, max_rows=256, budget="off", calibrate=False)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    done: list[tuple[int, list[int]]] = []
    failed: list[BaseException] = []

    def finish(n):
        def on_done(result, error):
            if error is not None:
                failed.append(error)
            elif result is not None:
                done.append((n, result.token_ids))
        return on_done

    for n, ids in enumerate(prompts):
        sched.submit(Request(list(ids), make_policy("ar"), cfg, on_done=finish(n)))
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    n_tokens, t0 = 0, time.time()
    while sched.running or sched.waiting:
        sched.step()
        if failed:
            raise failed[0]
        if len(done) >= batch_size or (done and not (sched.running or sched.waiting)):
            batch, done[:] = list(done), []
            n_tokens += sum(len(a) for _, a in batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tokens / (time.time() - t0):.1f}", tokens=n_tokens)
            yield batch
    bar.close()


def _generate_answers(backbone, prompts, max_new_tokens, batch_size, progress, desc, device):
    import time

    import torch
    from tqdm import tqdm

    model = backbone.model if torch.device(device).type == "cpu" else backbone.fp32_model(device)
    dev = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda n: len(prompts[n]))  # less padding per batch
    tok = backbone.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(backbone.eos_ids))
    bar = tqdm(total=len(order), desc=desc, unit="prompt", disable=not progress)
    n_tokens, t0 = 0, time.time()
    for j in range(0, len(order), batch_size):
        batch = order[j : j + batch_size]
        width = max(len(prompts[n]) for n in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, n in enumerate(batch):
            ids = prompts[n]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id).cpu()
        answers = []
        for r, n in enumerate(batch):
            ans = out[r, width:].tolist()
            for k, t in enumerate(ans):  # cut after the first EOS: what follows is padding
                if t in backbone.eos_ids:
                    ans = ans[: k + 1]
                    break
            n_tokens += len(ans)
            answers.append((n, ans))
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tokens / (time.time() - t0):.1f}", tokens=n_tokens)
        yield answers
    bar.close()
