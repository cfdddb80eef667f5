"""The lean decoding engine: static KV cache, copy-free grouped-query attention, and the lean
Llama/Qwen2 forward against the transformers reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clpdecode.backbone import Backbone, load_backbone
from clpdecode.backbone.attention import causal_offset_mask, gqa_attention
from clpdecode.backbone.cache import StaticKVCache
from clpdecode.decoding import GenerationConfig, generate, make_policy
from clpdecode.errors import ClpError

from conftest import make_tokenizer


# ---- cache ---------------------------------------------------------------------------------
def test_static_cache_writes_in_place_grows_and_rolls_back():
    c = StaticKVCache(num_layers=2, batch=1, n_kv_heads=2, head_dim=3, capacity=0, chunk=4)
    assert c.capacity == 0 and c.get_seq_length() == 0
    k1, v1 = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    c.reserve(3)
    assert c.capacity == 4
    buf = c.keys[0]
    keys, values = c.write(0, k1, v1)
    assert keys.data_ptr() == buf.data_ptr() and keys.shape[2] == 3  # a view of the buffer
    c.write(1, k1, v1)
    c.advance(3)
    # The next step does not fit: every buffer grows by whole chunks, keeping its contents.
    k2 = torch.randn(1, 2, 4, 3)
    c.reserve(4)
    assert c.capacity % 4 == 0 and c.capacity >= 7
    keys, _ = c.write(0, k2, k2)
    assert torch.equal(keys[:, :, :3], k1) and torch.equal(keys[:, :, 3:], k2)
    c.write(1, k2, k2)
    c.advance(4)
    cap = c.capacity
    c.rollback(3)  # rejected drafts: only the length moves
    assert c.get_seq_length() == 4 and c.capacity == cap
    c.crop(-1)
    assert c.get_seq_length() == 3
    with pytest.raises(ValueError):
        c.rollback(4)


# ---- attention -----------------------------------------------------------------------------
def _reference_attention(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # transformers' repeat_kv
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)  # (B, T, H, hd)


@pytest.mark.parametrize("t,cached", [(1, 7), (4, 0), (5, 9)])
def test_gqa_attention_matches_expanded_kv(t, cached):
    g = torch.Generator().manual_seed(t)
    b, n_heads, n_kv, hd = 2, 6, 2, 8
    s = cached + t
    q = torch.randn(b, n_heads, t, hd, generator=g)
    buf_k, buf_v = torch.randn(b, n_kv, s + 5, hd, generator=g), torch.randn(b, n_kv, s + 5, hd, generator=g)
    k, v = buf_k[:, :, :s], buf_v[:, :, :s]  # non-contiguous views, as from the static cache
    ref = _reference_attention(q, k, v, causal_offset_mask(t, s))
    assert torch.allclose(gqa_attention(q, k, v), ref, atol=1e-5)


def test_gqa_attention_with_a_tree_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8,
                                                                                                        generator=g)
    # 5 cached positions, then a root and two siblings that do not see each other.
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :5] = True
    mask[0, 5] = mask[1, [5, 6]] = mask[2, [5, 7]] = True
    ref = _reference_attention(q, k, v, mask)
    assert torch.allclose(gqa_attention(q, k, v, mask), ref, atol=1e-5)
    with pytest.raises(ValueError):
        gqa_attention(q, k, v, mask[:, :7])


# ---- lean forward against transformers -----------------------------------------------------
def _hf_hidden(bb, ids):
    out = bb.model.model(input_ids=ids, use_cache=False)
    return out.last_hidden_state


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir", "tiny_gemma_dir"])
@pytest.mark.parametrize("numerics", ["fp32", "fp16", "int8", "q4"])
def test_lean_hidden_states_match_transformers(request, fixture, numerics):
    """Prefill, multi-token steps, a rollback and a long step against transformers' own
    forward on the same weights (Gemma 3: across its sliding window of 8)."""
    bb = load_backbone(str(request.getfixturevalue(fixture)), numerics=numerics)
    assert bb.engine == "lean" and bb.info.as_dict()["engine"] == "lean"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (1, 40), generator=g)
    with torch.inference_mode():
        ref = _hf_hidden(bb, ids)  # one prefill over all 40 tokens, no cache
    cache = bb.new_cache()
    parts = [bb.forward(ids[:, :20], cache)]  # prefill
    parts.append(bb.forward(ids[:, 20:23], cache))  # a 3-token step
    drafts = bb.forward(torch.tensor([[ids[0, 23].item(), 5, 6, 7]]), cache)  # 1 kept, 3 rejected
    parts.append(drafts[:, :1])
    bb.rollback(cache, 3)
    assert cache.get_seq_length() == 24
    parts.append(bb.forward(ids[:, 24:25], cache))  # a 1-token step
    parts.append(bb.forward(ids[:, 25:40], cache))  # a longer step
    got = torch.cat(parts, dim=1)
    # int8 quantises activations per tensor, so a row depends on the other rows of its
    # step: only the fp32, fp16 and q4 paths can match a single prefill to float tolerance
    # (q4: activations rounded to 16 bits per group of 32, its cache fp16).
    tol = {"fp32": 1e-4, "fp16": 1e-4, "q4": 2e-3}.get(numerics)
    if tol is not None:
        assert torch.allclose(got, ref, atol=tol * ref.abs().max()), (got - ref).abs().max()
    else:
        with torch.inference_mode():
            cache_hf = bb.model.model(input_ids=ids[:, :20], use_cache=True).cache
            step = bb.model.model(input_ids=ids[:, 20:23], cache=cache_hf, use_cache=True).last_hidden_state
        assert torch.allclose(parts[1], step, atol=1e-3 * step.abs().max())


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
@pytest.mark.parametrize("numerics", ["fp32", "q4"])
def test_aux_layer_inputs_match_transformers_hidden_states(request, fixture, numerics):
    """The residual stream entering chosen layers (what EAGLE-3 drafters read), from the
    lean engine (both paths) and transformers' engine alike."""
    bb = load_backbone(str(request.getfixturevalue(fixture)), numerics=numerics)
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = bb.model.model(input_ids=ids, output_hidden_states=True).hidden_states
    want = torch.cat([ref[0], ref[1]], -1)  # inputs of layers 0 and 1
    cache = bb.new_cache()
    h1, aux1 = bb.forward(ids[:, :9], cache, aux_layers=(0, 1))
    h2, aux2 = bb.forward(ids[:, 9:], cache, aux_layers=(0, 1))
    got = torch.cat([aux1, aux2], 1)
    assert got.shape == (1, 12, 2 * bb.info.hidden_size)
    tol = 1e-4 if numerics == "fp32" else 3e-3
    assert torch.allclose(got, want, atol=tol * want.abs().max())
    hf_h, hf_aux = bb.forward(ids, bb.new_cache(engine="hf"), aux_layers=(0, 1))
    assert torch.allclose(hf_aux, want, atol=1e-5 * want.abs().max())
    with pytest.raises(ValueError, match="aux layers"):
        bb.forward(ids[:, :2], bb.new_cache(), aux_layers=(5,))


def test_int8_step_matches_transformers_step(tiny_llama_dir):
    """int8: the fused QKV/gate-up keep each projection's weight scale, so a step equals
    transformers' own int8 step (same rows in the same step)."""
    bb = load_backbone(str(tiny_llama_dir), numerics="int8")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = bb.new_cache()
    bb.forward(ids[:, :8], cache)
    got = bb.forward(ids[:, 8:], cache)
    with torch.inference_mode():
        c = bb.model.model(input_ids=ids[:, :8], use_cache=True).cache
        ref = bb.model.model(input_ids=ids[:, 8:], cache=c, use_cache=True).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max())


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir", "tiny_gemma_dir"])
@pytest.mark.parametrize("numerics", ["fp32", "fp16"])
def test_lean_greedy_equals_transformers_generate(request, fixture, numerics):
    bb = load_backbone(str(request.getfixturevalue(fixture)), numerics=numerics)
    assert bb.engine == "lean"
    for prompt in ([5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49] * 3):
        ours = generate(bb, prompt, make_policy("ar"), GenerationConfig(max_new_tokens=40)).token_ids
        ids = torch.tensor([prompt])
        ref = bb.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert ours == ref


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_tree_mask_and_positions(request, fixture):
    """Two siblings after one node, in one forward: each equals its own chain."""
    bb = load_backbone(str(request.getfixturevalue(fixture)), numerics="fp32")
    prompt = torch.tensor([[4, 5, 6, 7, 8]])
    a, b1, b2 = 30, 31, 32
    cache = bb.new_cache()
    bb.forward(prompt, cache)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :5] = True  # the cached prompt
    mask[0, 5] = mask[1, [5, 6]] = mask[2, [5, 7]] = True
    tree = bb.forward(torch.tensor([[a, b1, b2]]), cache, mask=mask, positions=torch.tensor([5, 6, 6]))[0]
    for branch, row in ((b1, 1), (b2, 2)):
        ref = bb.forward(torch.tensor([[4, 5, 6, 7, 8, a, branch]]), bb.new_cache())[0]
        assert torch.allclose(tree[row], ref[-1], atol=1e-4 * ref.abs().max())
        assert torch.allclose(tree[0], ref[-2], atol=1e-4 * ref.abs().max())
    with pytest.raises(ClpError, match="lean engine"):
        bb.forward(torch.tensor([[a]]), bb.new_cache(engine="hf"), mask=mask[:1, :6])


def test_cache_grows_past_its_capacity_hint(tiny_llama_dir):
    bb = load_backbone(str(tiny_llama_dir), numerics="fp32")
    ids = torch.randint(3, 90, (1, 60), generator=torch.Generator().manual_seed(3))
    cache = bb._lean.new_cache(capacity=8, chunk=8)
    hs = [bb._lean.forward(ids[:, :5], cache)] + [bb._lean.forward(ids[:, i : i + 5], cache) for i in range(5, 60, 5)]
    assert cache.capacity >= 60 and cache.get_seq_length() == 60
    with torch.inference_mode():
        ref = _hf_hidden(bb, ids)
    assert torch.allclose(torch.cat(hs, 1), ref, atol=1e-4 * ref.abs().max())
    assert bb.new_cache(capacity=100).capacity >= 100


def test_batched_steps_match_transformers(tiny_qwen_dir):
    bb = load_backbone(str(tiny_qwen_dir), numerics="fp32")
    ids = torch.randint(3, 90, (2, 14), generator=torch.Generator().manual_seed(4))
    cache = bb.new_cache()  # sized for batch 1; takes the batch of its first step
    got = torch.cat([bb.forward(ids[:, :10], cache), bb.forward(ids[:, 10:], cache)], 1)
    with torch.inference_mode():
        ref = _hf_hidden(bb, ids)
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max())
    with pytest.raises(ValueError, match="batch"):
        bb.forward(ids[:1, :1], cache)


def test_engine_choice_and_fallback(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig

    hf = load_backbone(str(tiny_llama_dir), engine="hf", numerics="fp32")
    assert hf.engine == "hf" and isinstance(hf.new_cache(), DynamicCache)
    lean = load_backbone(str(tiny_llama_dir), engine="lean", numerics="fp32")
    assert isinstance(lean.new_cache(), StaticKVCache)
    prompt = [9, 10, 11, 12]
    a = generate(hf, prompt, make_policy("ar"), GenerationConfig(max_new_tokens=20)).token_ids
    b = generate(lean, prompt, make_policy("ar"), GenerationConfig(max_new_tokens=20)).token_ids
    assert a == b
    with pytest.raises(ClpError, match="engine"):
        load_backbone(str(tiny_llama_dir), engine="fast")
    # Another architecture: "auto" falls back to transformers, "lean" refuses.
    tok = make_tokenizer()
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg)
    assert Backbone(model, tok, "tiny-mistral").engine == "hf"
    with pytest.raises(ClpError, match="lean engine"):
        Backbone(model, tok, "tiny-mistral", engine="lean")


# ---- the embedded backbone -----------------------------------------------------------------
@pytest.mark.embedded
def test_embedded_lean_greedy_equals_transformers_generate():
    import clpdecode as clp

    bb = clp.load_backbone("embedded", numerics="fp32")
    assert bb.engine == "lean"
    ids = bb.encode_prompt("Give me three tips for sleeping well.")
    ours = generate(bb, ids, make_policy("ar"), GenerationConfig(max_new_tokens=32)).token_ids
    x = torch.tensor([ids])
    ref = bb.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32)[0, x.shape[1]:]
    assert ours == ref.tolist()
