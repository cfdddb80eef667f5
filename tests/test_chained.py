"""The chained drafter: training-time unroll == inference chain, shapes, loss, resume."""

from __future__ import annotations

import pytest
import torch

from clpdecode.heads.accuracy import accuracy_counts, shifted, summarise
from clpdecode.heads.chained import ChainConfig, ChainedHeads
from clpdecode.training.chain import ChainLossConfig, chain_loss
from clpdecode.training.drafter import accepted_drafts

D, V = 32, 97


def make_chain(attention: bool, k: int = 4, seed: int = 0) -> tuple[ChainedHeads, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = ChainConfig(k=k, hidden_size=D, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                      attention=attention, draft_vocab=0)
    chain = ChainedHeads(cfg)
    with torch.no_grad():
        for p in chain.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    table = torch.randn(V, D)
    chain.attach(table, table)
    return chain.eval(), table


@pytest.mark.parametrize("attention", [True, False])
def test_unrolled_training_chain_equals_inference_chain(attention):
    """forward_train(own_tokens=True) at chain start j proposes exactly what extend + draft
    propose at inference after seeing positions 0..j: same masks, positions and inputs."""
    chain, table = make_chain(attention)
    L = 12
    feats = torch.randn(1, L, D)
    tokens = torch.randint(0, V, (1, L))
    outs = chain.forward_train(feats, [table[shifted(tokens, 1)]], steps=4, own_tokens=True)
    train_drafts = torch.stack([chain.draft_ids[chain.logits(g).argmax(-1)] for g in outs], -1)[0]  # (L, 4)
    state = chain.new_state()
    done = 0
    for j in (3, 4, 7, 10):  # extend in uneven groups, as accepted spans arrive
        g = chain.extend(state, feats[0, done : j + 1], tokens[0, done + 1 : j + 2].tolist())
        done = j + 1
        assert chain.draft(state, g, 4) == train_drafts[j].tolist()
        if state is not None:
            assert state.length == j + 1  # the chain's own entries are not kept


def test_chain_loss_backward_and_shapes():
    chain, table = make_chain(True)
    chain.train()
    B, L = 3, 10
    feats, tokens = torch.randn(B, L, D), torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, :3] = False
    for steps in (1, 2, 4):
        loss, stats = chain_loss(chain, feats, tokens, mask, table, ChainLossConfig(steps=steps))
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert len(stats["top1"]) == steps
        chain.zero_grad()
        loss.backward()
        assert chain.fc.weight.grad is not None and chain.fc.weight.grad.abs().sum() > 0
        assert chain.q_proj.weight.grad.abs().sum() > 0


def test_acceptance_counts_oracle_chain():
    """A chain whose proposals match the text everywhere accepts every step where the
    target exists; counts never exceed the positions."""
    chain, table = make_chain(False, k=2)
    B, L = 2, 9
    feats, tokens = torch.randn(B, L, D), torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, -1] = False
    res = summarise([accuracy_counts(chain, feats, tokens, mask, table, 2)], 2, chain.cfg.design)
    assert res["tokens"] == int(mask.sum())
    assert 0 <= res["chain_accept"][1] <= res["chain_accept"][0] <= 1
    lengths, correct = accepted_drafts(chain, feats, feats, tokens, mask, table, table, 2)
    assert lengths.shape == (B, L) and correct.shape == (B, L, 2)
    assert int(lengths.max()) <= 2


@pytest.mark.parametrize("design", ["chained", "fused"])
def test_eval_heads_on_a_tiny_model_without_cached_features(capsys, tmp_path, tiny_backbone, tiny_llama_dir, design):
    """eval-heads computes the held-out states itself from a corpus; JSON has every key."""
    import json

    from clpdecode.cli import main
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.heads import save_drafter

    from conftest import random_drafter

    save_drafter(random_drafter(tiny_backbone, k=3, design=design), tmp_path / "h", tiny_backbone)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = []
    for i, prompt in enumerate(([5, 6, 7], [9, 10, 11, 12], [30, 31])):
        ans = generate(tiny_backbone, prompt, make_policy("ar"), GenerationConfig(max_new_tokens=12)).token_ids
        lines.append(json.dumps({"i": i, "split": "heldout", "prompt": prompt, "answer": ans}))
    (corpus / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    code = main(["eval-heads", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"),
                 "--corpus", str(corpus), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(res) >= {"k", "design", "head_top1", "head_top5", "chain_accept", "mean_accepted", "tokens"}
    assert res["k"] == 3 and res["design"] == design and len(res["chain_accept"]) == 3
    assert res["tokens"] > 0
    assert all(a1 <= a5 for a1, a5 in zip(res["head_top1"], res["head_top5"]))
    assert res["chain_accept"] == sorted(res["chain_accept"], reverse=True)
    assert abs(res["mean_accepted"] - sum(res["chain_accept"])) < 1e-3


def test_eval_heads_on_a_prompt_file_generates_answers_once(capsys, tmp_path, monkeypatch, tiny_backbone,
                                                            tiny_llama_dir):
    """--prompts FILE: the backbone's greedy answers are generated (batched), scored, and
    cached by content: a rerun reads them back and gives the same figures."""
    import json

    from clpdecode.cli import main
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.heads import save_drafter

    from conftest import random_drafter

    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    save_drafter(random_drafter(tiny_backbone, k=2, design="chained"), tmp_path / "h", tiny_backbone)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "abc"}\n{"prompt": "hello there"}\n{"prompt": "xyz 123 q"}\n')
    argv = ["eval-heads", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), "--prompts", str(prompts),
            "--max-new-tokens", "12", "--batch-size", "2", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr()
    first = json.loads(out.out)
    assert first["answers_cached"] is False and first["sequences"] == 3 and first["tokens"] > 0
    assert first["source"] == "prompts" and first["max_new_tokens"] == 12
    assert abs(first["mean_accepted"] - sum(first["chain_accept"])) < 1e-3
    cached = list((tmp_path / "cache" / "eval-answers").glob("*.jsonl"))
    assert len(cached) == 1
    recs = [json.loads(line) for line in cached[0].read_text().splitlines()]
    for r, text in zip(recs, ["abc", "hello there", "xyz 123 q"]):  # in the file's order
        assert r["prompt"] == tiny_backbone.encode_prompt(text)
        ar = generate(tiny_backbone, r["prompt"], make_policy("ar"), GenerationConfig(max_new_tokens=12))
        assert ar.token_ids == r["answer"]  # the backbone's greedy answer
    stamp = cached[0].stat().st_mtime_ns
    assert main(argv) == 0
    out = capsys.readouterr()
    second = json.loads(out.out)
    assert second.pop("answers_cached") is True and first.pop("answers_cached") is False
    assert second == first and cached[0].stat().st_mtime_ns == stamp and "cached answers" in out.err
    # Other settings are other answers: --limit and --max-new-tokens are part of the key.
    assert main(argv[:-1] + ["--limit", "2", "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == 2
    assert len(list((tmp_path / "cache" / "eval-answers").glob("*.jsonl"))) == 2


def test_eval_heads_scores_second_turns_after_the_backbones_own_first_answer(capsys, tmp_path, monkeypatch,
                                                                          tiny_backbone, tiny_llama_dir):
    """--prompts mtbench-2: each conversation's first turn is answered greedily, that answer
    goes back as the assistant's turn (as text, as a chat front end sends it), and the
    drafter is scored on the greedy answer to the second turn; both turns' answers are
    cached; `clp bench` times the same second answers."""
    import json

    from clpdecode.cli import main
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.errors import ClpError
    from clpdecode.evaluation import prompts as prompt_sets
    from clpdecode.evaluation.answers import second_turn_answers
    from clpdecode.evaluation.bench import _prompt_key
    from clpdecode.heads import save_drafter

    from conftest import random_drafter

    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    pairs = [("abc", "and again"), ("hello there", "shorter now"), ("xyz 123 q", "why")]
    monkeypatch.setitem(prompt_sets.SECOND_TURN_SETS, "mtbench-2", lambda: pairs)
    save_drafter(random_drafter(tiny_backbone, k=2, design="chained"), tmp_path / "h", tiny_backbone)
    argv = ["eval-heads", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), "--prompts", "mtbench-2",
            "--limit", "2", "--max-new-tokens", "8", "--batch-size", "2", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sequences"] == 2 and res["tokens"] > 0 and res["answers_cached"] is False
    cfg = GenerationConfig(max_new_tokens=8)
    files = sorted((tmp_path / "cache" / "eval-answers").glob("*.jsonl"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 2  # the first turns' answers, then the second turns'
    firsts, seconds = ([json.loads(line) for line in f.read_text().splitlines()] for f in files)
    for (turn1, turn2), a, b in zip(pairs, firsts, seconds):
        assert a["answer"] == generate(tiny_backbone, a["prompt"], make_policy("ar"), cfg).token_ids
        want = tiny_backbone.encode_chat([{"role": "user", "content": turn1},
                                          {"role": "assistant", "content": tiny_backbone.decode(a["answer"]).strip()},
                                          {"role": "user", "content": turn2}])
        assert b["prompt"] == want and len(want) > len(a["prompt"]) + 2
        assert b["answer"] == generate(tiny_backbone, want, make_policy("ar"), cfg).token_ids
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again.pop("answers_cached") is True and res.pop("answers_cached") is False and again == res
    # The bench times the second answers, after the same first answers (the bench's batches
    # differ from these, so it makes its own): verified is identical to AR there too.
    out = tmp_path / "b"
    assert main(["bench", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), "--prompts", "mtbench-2",
                 "--limit", "2", "--max-new-tokens", "8", "--methods", "ar,verified", "--out", str(out)]) == 0
    bench = json.loads((out / "results.json").read_text())
    assert bench["settings"]["prompts"] == "mtbench-2" and bench["n_prompts_done"] == 2
    for rec, b in zip(bench["runs"], seconds):
        assert rec["prompt_key"] == _prompt_key(b["prompt"])
        assert rec["methods"]["verified"]["token_ids"] == rec["methods"]["ar"]["token_ids"] == b["answer"]
    capsys.readouterr()
    assert main(["bench", "--model", str(tiny_llama_dir), "--prompts", "mtbench-2", "--raw"]) == 2
    assert "go through the chat template" in capsys.readouterr().err
    monkeypatch.setattr(tiny_backbone.tokenizer, "chat_template", None)
    with pytest.raises(ClpError, match="no chat template"):
        second_turn_answers(tiny_backbone, pairs, 8)


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "nope"], "unknown prompt set 'nope'"),
    (["--prompts", "mtbench", "--limit", "0"], "--limit must be at least 1"),
    (["--prompts", "mtbench", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompts", "mtbench", "--corpus", "x"], "--corpus and --prompts"),
    (["--limit", "3"], "--limit and --max-new-tokens go with --prompts"),
])
def test_eval_heads_prompt_options_are_checked_before_the_load(capsys, monkeypatch, tmp_path, tiny_backbone,
                                                               tiny_llama_dir, extra, message):
    import clpdecode.backbone
    from clpdecode.cli import main
    from clpdecode.heads import save_drafter

    from conftest import random_drafter

    save_drafter(random_drafter(tiny_backbone, k=2, design="chained"), tmp_path / "h", tiny_backbone)

    def must_not_load(*a, **k):
        raise AssertionError("loaded the backbone before checking the options")

    monkeypatch.setattr(clpdecode.backbone, "load_backbone", must_not_load)
    code = main(["eval-heads", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), *extra])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and out.err.startswith("clp: error:") and out.err.count("\n") == 1
    assert message in out.err, out.err


def test_verified_acceptance_matches_heldout_chain_accept(tiny_backbone):
    """The accuracy metric and the decoding loop agree: with span k on the backbone's own
    greedy text, the drafts the loop keeps per step are what chain_accept predicts for
    the positions the loop visits (checked exactly on one sequence)."""
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.heads.accuracy import draft_topk

    from conftest import random_drafter

    drafter = random_drafter(tiny_backbone, k=3, design="chained", seed=3, scale=0.3)
    prompt = [5, 17, 33, 40]
    tiny_backbone.eos_ids = set()
    try:
        pol = make_policy("verified", tiny_backbone, drafter, draft="all", lookup=False)  # the chain's drafts only
        ver = generate(tiny_backbone, prompt, pol,
                       GenerationConfig(max_new_tokens=30))
    finally:
        tiny_backbone.eos_ids = {2}
    ids = prompt + ver.token_ids
    states = tiny_backbone.forward(torch.tensor([ids]), tiny_backbone.new_cache())
    embed = tiny_backbone.model.get_input_embeddings().weight.detach().float()
    top = draft_topk(drafter.heads, states.float(), torch.tensor([ids]), embed, 3)[0, :, :, 0]  # (T, 3)
    # Walk the loop's steps: from position p (its token t+1 = ids[p+1]), keep the agreeing drafts.
    p, kept = len(prompt) - 1, []
    while len(kept) < len(ver.accepted_per_step):
        n = 0
        while n < 3 and p + 2 + n < len(ids) and int(top[p, n]) == ids[p + 2 + n]:
            n += 1
        kept.append(n)
        p += 1 + n
    assert kept == ver.accepted_per_step
