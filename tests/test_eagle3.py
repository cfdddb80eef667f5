"""The EAGLE-3 drafter: training-time unroll == inference drafts, the kernel drafting path,
bundle round trip, and the loop feeding it the backbone's aux-layer rows."""

from __future__ import annotations

import pytest
import torch

from clpdecode.backbone import kernels, load_backbone
from clpdecode.heads.accuracy import shifted
from clpdecode.heads.eagle3 import Eagle3Config, Eagle3Drafter, default_aux_layers

from conftest import random_drafter, save_tiny_model

D, V = 64, 97


def make_drafter(k: int = 4, seed: int = 0, head_dim: int = 16,
                 kv_heads: int = 2) -> tuple[Eagle3Drafter, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = Eagle3Config(k=k, hidden_size=D, target_hidden_size=D, aux_layers=(0, 1, 2), num_heads=D // head_dim,
                       num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=96, vocab_size=V, draft_vocab=0)
    drafter = Eagle3Drafter(cfg)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    table = torch.randn(V, D)
    drafter.attach(table, table)
    return drafter.eval(), table


def test_default_aux_layers_follow_vllm_and_llama_cpp():
    assert default_aux_layers(30) == (2, 15, 27)
    with pytest.raises(ValueError):
        Eagle3Config(aux_layers=(1, 2))


def test_unrolled_training_equals_inference_drafts():
    """forward_train(own_tokens=True) at start j proposes what extend + draft propose at
    inference after positions 0..j (uneven extends, as accepted spans arrive)."""
    drafter, table = make_drafter()
    L = 12
    aux = torch.randn(1, L, 3 * D)
    tokens = torch.randint(0, V, (1, L))
    with torch.no_grad():
        outs = drafter.forward_train(aux, [table[shifted(tokens, 1)]], steps=4, own_tokens=True)
        train = torch.stack([drafter.draft_ids[drafter.logits(x).argmax(-1)] for x in outs], -1)[0]  # (L, 4)
    state, done = drafter.new_state(), 0
    for j in (3, 4, 7, 10):
        x = drafter.extend(state, aux[0, done : j + 1], tokens[0, done + 1 : j + 2].tolist())
        done = j + 1
        assert [c[0][0] for c in drafter.draft_candidates(state, x, 4)] == train[j].tolist()
        assert state.length == j + 1


def test_training_backward_reaches_every_weight():
    drafter, table = make_drafter(k=2)
    drafter.train()
    aux, tokens = torch.randn(2, 8, 3 * D), torch.randint(0, V, (2, 8))
    outs = drafter.forward_train(aux, [table[shifted(tokens, s)] for s in (1, 2)])
    sum(drafter.logits(x).logsumexp(-1).mean() for x in outs).backward()
    for name, p in drafter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.skipif(kernels.load(quiet=True) is None, reason="no C++ kernels here")
def test_kernel_drafting_matches_fp32():
    drafter, table = make_drafter(head_dim=32, kv_heads=1)  # 64 inputs: whole groups of 32
    aux, tokens = torch.randn(6, 3 * D), list(range(5, 11))
    s32, s8 = drafter.new_state(), drafter.new_state()
    drafter.prepare_inference(None)
    x32 = drafter.extend(s32, aux, tokens)
    drafter.prepare_inference("q8")
    x8 = drafter.extend(s8, aux, tokens)
    # 8-bit weights (groups of 32) move a random drafter's outputs by a few percent; a wiring
    # error (wrong half, norm or residual) moves them by their own size.
    rel = lambda a, b: float((a - b).abs().mean() / b.abs().mean())  # noqa: E731
    assert rel(x8, x32) < 0.05
    with torch.no_grad():
        assert rel(drafter._head(x8[None]), drafter.logits(x32[None])) < 0.05


def test_bundle_round_trip_and_loop_feeds_aux_rows(tiny_backbone, tmp_path):
    from clpdecode.decoding import GenerationConfig, generate, make_policy
    from clpdecode.heads.artifacts import load_drafter, save_drafter

    drafter = random_drafter(tiny_backbone, k=3, design="eagle3", seed=4)
    assert drafter.aux_layers == (0, 1, 1)
    save_drafter(drafter, tmp_path / "e3", tiny_backbone)
    again = load_drafter(tmp_path / "e3", tiny_backbone)
    assert isinstance(again.heads, Eagle3Drafter) and again.aux_layers == drafter.aux_layers
    for a, b in zip(drafter.heads.state_dict().values(), again.heads.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-2 * max(1.0, float(a.float().abs().max())))
    ids = [5, 9, 14, 20]
    cfg = GenerationConfig(max_new_tokens=24)
    ar = generate(tiny_backbone, ids, make_policy("ar"), cfg)
    ver = generate(tiny_backbone, ids, make_policy("verified", tiny_backbone, again, draft="all"), cfg)
    assert ver.token_ids == ar.token_ids


def test_q4_backbone_drafts_with_eagle3_on_the_kernels(tmp_path):
    from clpdecode.decoding import GenerationConfig, generate, make_policy

    path = save_tiny_model(tmp_path, "llama", seed=2, hidden_size=128, heads=2, kv_heads=1)
    bb = load_backbone(str(path), numerics="q4")
    drafter = random_drafter(bb, k=3, design="eagle3", seed=5, scale=0.05)
    ids = [5, 9, 14, 20, 33]
    cfg = GenerationConfig(max_new_tokens=30)
    ar = generate(bb, ids, make_policy("ar"), cfg)
    for tree in ("chain", 4):
        ver = generate(bb, ids, make_policy("verified", bb, drafter, draft="all", tree=tree), cfg)
        assert ver.token_ids == ar.token_ids


def test_a_batch_with_nothing_to_train_steps_instead_of_failing(tiny_backbone):
    """A batch whose answers all lie past max_len (seen at step 378 of a CPU run: `loss.backward`
    raised) gives a zero loss on the graph; train_drafter drops such sequences up front."""
    from clpdecode.training.drafter import BackboneTargets, DrafterTrainConfig, drafter_loss

    drafter = random_drafter(tiny_backbone, k=2, design="eagle3", seed=1).heads.train()
    embed = tiny_backbone.model.get_input_embeddings().weight.detach().float()
    drafter.attach(tiny_backbone.lm_head_weight, embed)
    targets = BackboneTargets(tiny_backbone, drafter.aux_layers, drafter.draft_ids)
    cfg = DrafterTrainConfig(k=2, max_len=16)
    batch = [(list(range(3, 19)), [False] * 16), (list(range(5, 15)), [False] * 10)]
    loss, stats = drafter_loss(drafter, targets, batch, cfg, embed)
    loss.backward()
    assert float(loss.detach()) == 0.0 and stats["top1"] == [0.0, 0.0]
    trained = [(list(range(3, 19)), [False] * 8 + [True] * 7 + [False])]
    loss, _ = drafter_loss(drafter, targets, trained, cfg, embed)
    assert float(loss.detach()) > 0
