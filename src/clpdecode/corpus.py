"""The self-distilled token-id corpus: where it is shipped and how to read it.

Below training (which writes and extends it) and evaluation (which reads its held-out
answers), so that neither imports the other for it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def corpus_dir(backbone_name: str) -> Path:
    """The self-distilled token-id corpus shipped for a backbone (held-out answers included)."""
    return Path(str(resources.files("clpdecode") / "assets" / "corpus" / backbone_name))


def read_corpus(corpus_dir: Path) -> list[dict]:
    """All records of a corpus, sorted by prompt index: {"i", "split", "prompt", "answer"}."""
    recs = []
    for shard in sorted(Path(corpus_dir).glob("shard-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            recs.extend(json.loads(line) for line in f if line.strip())
    recs.sort(key=lambda r: r["i"])
    return recs
