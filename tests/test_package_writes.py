"""No command writes under the installed package.

Every command that writes runs once on the tiny model with its default output places, and
the package folder must be the same afterwards, file for file (size and mtime). Its files
are read-only input: `clp distill --prompts -1` once rewrote the shipped corpus's meta.json.
chmod cannot show this (root writes through it), so the folder is compared before and after.

To cover another command, add its argv to `commands` below (a run as short as it allows); one
that writes nothing by default is worth listing too. (`clp serve` writes nothing but its log.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import clpdecode


def _snapshot(folder: Path) -> dict:
    """relative path -> (size, mtime) of every file and folder; Python's own bytecode caches
    (written by any import, not by a command) left out."""
    out = {}
    for p in folder.rglob("*"):
        if "__pycache__" in p.parts:
            continue
        st = p.stat()
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns) if p.is_file() else "dir"
    return out


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty $CLP_CACHE holding only ShareGPT's split (15-20 s to recompute)."""
    from clpdecode.backbone.loading import cache_dir

    cache = tmp_path / "cache"
    (cache / "datasets").mkdir(parents=True)
    for f in (cache_dir() / "datasets").glob("sharegpt-split-*.json"):
        shutil.copy(f, cache / "datasets" / f.name)
    monkeypatch.setenv("CLP_CACHE", str(cache))
    return cache


def test_no_command_writes_under_the_installed_package(fresh_cache, tiny_llama_dir, tmp_path, capsys):
    from clpdecode.backbone import load_backbone
    from clpdecode.cli import main

    package = Path(clpdecode.__file__).resolve().parent
    model = ["--model", str(tiny_llama_dir)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "say hi"}\n')
    commands = [
        # the corpus and the hidden states go to their default places
        ["distill", *model, "--prompts", "3", "--max-new-tokens", "8", "--batch-size", "3", "--teacher-forced", "2"],
        ["train", "--design", "fused", *model, "--k", "2", "--steps", "2", "--predictor-steps", "2",
         "--competing-steps", "2", "--batch-size", "8", "--draft-vocab", "40", "--out", str(tmp_path / "fused")],
        ["train", "--design", "chain", *model, "--numerics", "fp32", "--k", "2", "--steps", "1", "--conversations",
         "2", "--max-len", "64", "--batch-sequences", "2", "--draft-vocab", "40", "--predictor-steps", "2",
         "--competing-steps", "2", "--out", str(tmp_path / "chain")],
        ["sequences", *model, "--conversations", "2", "--max-len", "64", "--out", str(tmp_path / "s.npz")],
        # the evaluation commands' results and caches (eval-answers) go to --out and the cache
        ["bench", *model, "--heads", str(tmp_path / "fused"), "--prompts", str(prompts), "--limit", "1", "--methods",
         "ar,verified", "--max-new-tokens", "4", "--out", str(tmp_path / "bench")],
        ["eval-heads", *model, "--heads", str(tmp_path / "fused"), "--prompts", str(prompts), "--limit", "1",
         "--max-new-tokens", "4", "--json"],
        ["generate", *model, "--heads", str(tmp_path / "fused"), "--method", "verified", "--prompt", "hi",
         "--max-new-tokens", "3", "--json"],
    ]
    before = _snapshot(package)
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
    assert _snapshot(package) == before
    from clpdecode.corpus import user_corpus_dir

    err = capsys.readouterr().err
    name = load_backbone(str(tiny_llama_dir), numerics="fp32").name
    assert f"distill: corpus {user_corpus_dir(name)}" in err  # where it wrote, said on stderr
    assert any(user_corpus_dir(name).glob("shard-*.jsonl"))
    # A folder inside the package, named on purpose, is refused too.
    inside = str(package / "assets" / "drafters" / "mine")
    for argv in (["train", *model, "--out", inside], ["distill", *model, "--prompts", "1", "--corpus", inside],
                 ["sequences", *model, "--out", inside + ".npz"]):
        assert main(argv) == 2
        assert "inside the installed package" in capsys.readouterr().err
    assert _snapshot(package) == before


def test_distill_extends_a_copy_of_the_shipped_corpus(fresh_cache, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The default corpus of `clp distill --prompts N` is the cache's, begun as a copy of the
    one shipped for the backbone (so the shipped answers are not generated again); `clp
    train` and `clp distill` without --prompts read the shipped one until then."""
    from clpdecode import corpus as corpus_mod
    from clpdecode.backbone import load_backbone
    from clpdecode.cli import main
    from clpdecode.training.distill import DistillConfig, generate_corpus

    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    shipped = tmp_path / "shipped"
    generate_corpus(bb, shipped, DistillConfig(n_prompts=3, max_new_tokens=8, batch_size=3), progress=False)
    monkeypatch.setattr(corpus_mod, "corpus_dir", lambda name: shipped)
    assert corpus_mod.default_corpus(bb.name) == shipped
    before = _snapshot(shipped)
    argv = ["distill", "--model", str(tiny_llama_dir), "--prompts", "5", "--max-new-tokens", "8", "--batch-size",
            "3", "--corpus-only"]
    assert main(argv) == 0
    own = corpus_mod.user_corpus_dir(bb.name)
    assert capsys.readouterr().out == f"corpus: {own}\n"
    assert _snapshot(shipped) == before
    assert corpus_mod.default_corpus(bb.name) == own
    answers = {r["i"]: r["answer"] for r in corpus_mod.read_corpus(own)}
    assert len(answers) == 5
    for r in corpus_mod.read_corpus(shipped):  # copied, not answered again
        assert answers[r["i"]] == r["answer"]
    assert (own / "shard-00000.jsonl").read_bytes() == (shipped / "shard-00000.jsonl").read_bytes()
