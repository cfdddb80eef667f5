"""q4 numerics: GGUF blocks read exactly, the C++ kernels against torch references, rows of a
step bit-identical to one-row steps, and verified == AR on q4 (property test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clpdecode.backbone import kernels, load_backbone
from clpdecode.backbone.attention import gqa_attention
from clpdecode.backbone.gguf import DECODERS
from clpdecode.backbone.quant import GROUP, Int4Linear, Int4Weight, from_blocks, pack_dense, pack_tiles
from clpdecode.decoding import GenerationConfig, generate, make_policy

from conftest import random_drafter, save_tiny_model

native = pytest.mark.skipif(kernels.load(quiet=True) is None, reason="the C++ kernels could not be built here")


# ---- GGUF blocks -------------------------------------------------------------------------------
def decoded(kind: str, raw: np.ndarray, k: int):
    """Raw blocks as q4's weights: gguf.py's decoder, then quant.py's weight."""
    return from_blocks(DECODERS[kind](raw, k))


def test_q4_1_blocks_decode_exactly_as_ggml():
    import gguf
    from gguf import quants

    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = quants.quantize(x, gguf.GGMLQuantizationType.Q4_1)
    ref = quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    w = decoded("Q4_1", raw, 128)
    assert torch.equal(w.dequantize(), torch.from_numpy(ref.astype(np.float32)))
    # Our own quantiser is ggml's reference one.
    ours = Int4Weight.from_float(torch.from_numpy(x))
    assert torch.equal(ours.codes, w.codes) and torch.equal(ours.scales, w.scales)


def test_q4_k_blocks_decode_exactly_as_ggml():
    import gguf
    from gguf import quants

    rng = np.random.default_rng(1)
    n, k = 4, 512
    blocks = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
    dd = rng.uniform(0.001, 0.05, size=(n, k // 256, 2)).astype(np.float16)  # valid d and dmin
    blocks[..., 0:4] = dd.view(np.uint8).reshape(n, k // 256, 4)
    raw = blocks.reshape(n, -1)
    ref = quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    assert torch.allclose(decoded("Q4_K", raw, k).dequantize(), torch.from_numpy(ref.astype(np.float32)), atol=1e-6)


def test_q5_0_q8_0_and_q6_k_blocks_decode_exactly():
    import gguf
    from gguf import quants

    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    for qtype in ("Q5_0", "Q8_0"):
        t = getattr(gguf.GGMLQuantizationType, qtype)
        raw = quants.quantize(x, t)
        ref = torch.from_numpy(quants.dequantize(raw, t).astype(np.float32))
        assert torch.equal(decoded(qtype, raw, 256).dequantize(), ref), qtype
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(4, 1, 210), dtype=np.uint8)
    blocks[..., 208:210] = np.array([0.01], dtype=np.float16).view(np.uint8)  # d, the last 2 bytes
    raw = blocks.reshape(4, -1)
    ref = torch.from_numpy(quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).astype(np.float32))
    assert torch.equal(decoded("Q6_K", raw, 256).dequantize(), ref)


def test_from_float_rounds_to_the_nearest_code():
    w = torch.randn(8, 64)
    q = Int4Weight.from_float(w)
    step = q.scales.repeat_interleave(GROUP, 1)
    # Half a step, plus what storing the step and the min as fp16 moves (as ggml does).
    assert (q.dequantize() - w).abs().le(step / 2 + 2e-3 * w.abs().max()).all()
    with pytest.raises(ValueError):
        Int4Weight.from_float(torch.randn(4, 40))


# ---- kernels -----------------------------------------------------------------------------------
def _q8_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """What clp::q4_linear computes, in torch: rows quantised to integers per group of 32 (as
    many levels as the built kernel uses), the 4-bit weight, the min term on exact group sums."""
    m, k = x.shape
    g = x.view(m, k // GROUP, GROUP).double()
    d = g.abs().amax(-1, keepdim=True) / kernels.load().activation_levels()
    q = torch.where(d > 0, torch.round(g / d), torch.zeros_like(g))
    n = w.shape[0]
    codes = w.codes.view(n, k // GROUP, GROUP).double()
    dots = torch.einsum("mgj,ngj->mng", q, codes)  # exact integers
    out = (dots * d[None, :, :, 0].transpose(0, 1) * w.scales[None].double()).sum(-1) + g.sum(-1) @ w.mins.double().t()
    return out.float()


@native
@pytest.mark.parametrize("n,k", [(64, 32), (960, 576), (12, 1536), (48, 96)])  # 48: an odd number of wide tiles
def test_q4_linear_matches_reference_and_rows_are_independent(n, k):
    g = torch.Generator().manual_seed(n)
    w = Int4Weight.from_float(torch.randn(n, k, generator=g) * 0.05)
    lin = Int4Linear(w, torch.randn(n, generator=g))
    x = torch.randn(19, k, generator=g)  # two blocks of 8 rows (tiles in pairs) and 3 more
    y = lin(x)
    ref = _q8_reference(x, w) + lin.bias
    assert torch.allclose(y, ref, atol=1e-5 * ref.abs().max())
    exact = x @ w.dequantize().t() + lin.bias  # what the rounding of activations costs
    tol = 2e-4 if kernels.load().activation_levels() > 127 else 2e-2
    assert torch.allclose(y, exact, atol=tol * exact.abs().max())
    one = torch.cat([lin(x[i : i + 1]) for i in range(19)])
    for rows in range(1, 20):  # any number of rows: bit-identical to one-row products
        assert torch.equal(lin(x[:rows]), one[:rows])


@native
def test_q4_linear_fuses_norm_activation_and_residual():
    g = torch.Generator().manual_seed(3)
    n, k = 64, 96
    w = Int4Weight.from_float(torch.randn(n, k, generator=g) * 0.1)
    qs, d, m = pack_tiles(w)
    op = torch.ops.clp.q4_linear
    x, res = torch.randn(5, k, generator=g) * 3, torch.randn(5, n, generator=g)
    norm = torch.rand(k, generator=g) + 0.5
    plain = lambda h: op(h, qs, d, m, None, None, 0.0, 0, None)  # noqa: E731
    assert torch.allclose(op(x, qs, d, m, None, norm, 1e-6, 0, None), plain(F.rms_norm(x, (k,), norm, 1e-6)),
                          atol=1e-4)
    gu = torch.randn(5, 2 * k, generator=g)
    assert torch.allclose(op(gu, qs, d, m, None, None, 0.0, 1, None), plain(F.silu(gu[:, :k]) * gu[:, k:]), atol=1e-4)
    gelu = F.gelu(gu[:, :k], approximate="tanh") * gu[:, k:]
    assert torch.allclose(op(gu, qs, d, m, None, None, 0.0, 2, None), plain(gelu), atol=1e-4)
    assert torch.equal(op(x, qs, d, m, None, None, 0.0, 0, res), plain(x) + res)


@native
@pytest.mark.parametrize("hd", [64, 8, 256])  # the vectorised path (2 sizes) and the generic one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cached,t", [(0, 1), (5, 3), (300, 1), (1000, 5), (130, 8)])
@pytest.mark.parametrize("window", [0, 7, 200])
def test_decode_attention_matches_sdpa_and_is_row_invariant(hd, dtype, cached, t, window):
    g = torch.Generator().manual_seed(cached + t)
    nh, nkv = 6, 2
    k = torch.randn(nkv, cached + t + 3, hd, generator=g).to(dtype)
    v = torch.randn(nkv, cached + t + 3, hd, generator=g).to(dtype)
    q = torch.randn(t, nh, hd, generator=g)
    op = torch.ops.clp.decode_attention
    out = op(q, k, v, cached, None, hd ** -0.5, window)
    s = cached + t
    pos = torch.arange(s)
    qpos = pos[cached:, None]
    mask = (pos[None] <= qpos) & ((pos[None] > qpos - window) if window else True)  # transformers' sliding rule
    ref = gqa_attention(q.transpose(0, 1)[None], k[None, :, :s].float(), v[None, :, :s].float(), mask)
    assert torch.allclose(out, ref[0], atol=2e-6)
    one = torch.cat([op(q[i : i + 1], k, v, cached + i, None, hd ** -0.5, window) for i in range(t)])
    assert torch.equal(out, one)


@native
def test_decode_attention_tree_rows_equal_their_paths_as_chains():
    g = torch.Generator().manual_seed(0)
    nh, nkv, hd, cached = 4, 2, 64, 200
    # A root, its child, a sibling of that child, and the sibling's child.
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    k, v = torch.randn(nkv, 210, hd, generator=g), torch.randn(nkv, 210, hd, generator=g)
    q = torch.randn(4, nh, hd, generator=g)
    op = torch.ops.clp.decode_attention
    out = op(q, k, v, cached, tree, hd ** -0.5)
    full = torch.cat([torch.ones(4, cached, dtype=torch.bool), tree], 1)
    ref = gqa_attention(q.transpose(0, 1)[None], k[None, :, : cached + 4], v[None, :, : cached + 4], full)
    assert torch.allclose(out, ref[0], atol=2e-6)
    for row, path in ((1, [0, 1]), (3, [0, 2, 3])):
        k2, v2 = k.clone(), v.clone()
        for dst, src in enumerate(path):  # the path laid out as a chain after the cache
            k2[:, cached + dst], v2[:, cached + dst] = k[:, cached + src], v[:, cached + src]
        chain = op(q[row : row + 1], k2, v2, cached + len(path) - 1, None, hd ** -0.5)
        assert torch.equal(chain[0], out[row])


@native
def test_rope_store_rotates_and_writes_the_cache():
    g = torch.Generator().manual_seed(0)
    nh, nkv, hd, t, start = 4, 2, 8, 3, 5
    qkv = torch.randn(t, (nh + 2 * nkv) * hd, generator=g)
    cos, sin = torch.randn(t, hd, generator=g), torch.randn(t, hd, generator=g)
    kc, vc = torch.zeros(nkv, 16, hd), torch.zeros(nkv, 16, hd, dtype=torch.float16)
    q = torch.ops.clp.rope_store(qkv, cos, sin, kc, vc, start, nh)
    x = qkv.view(t, nh + 2 * nkv, hd)
    rot = x * cos[:, None] + torch.roll(x, hd // 2, -1) * sin[:, None]
    # With per-head RMSNorms on queries and keys first (Gemma 3).
    qn, kn = torch.rand(hd, generator=g) + 0.5, torch.rand(hd, generator=g) + 0.5
    kc2 = torch.zeros(nkv, 16, hd)
    q2 = torch.ops.clp.rope_store(qkv, cos, sin, kc2, vc.clone(), start, nh, qn, kn, 1e-6)
    xn = torch.cat([F.rms_norm(x[:, :nh], (hd,), qn, 1e-6), F.rms_norm(x[:, nh : nh + nkv], (hd,), kn, 1e-6)], 1)
    rot2 = xn * cos[:, None] + torch.roll(xn, hd // 2, -1) * sin[:, None]
    assert torch.allclose(q2, rot2[:, :nh], atol=1e-5)
    assert torch.allclose(kc2[:, start : start + t], rot2[:, nh:].transpose(0, 1), atol=1e-5)
    assert torch.allclose(q, rot[:, :nh], atol=1e-6)
    assert torch.allclose(kc[:, start : start + t], rot[:, nh : nh + nkv].transpose(0, 1), atol=1e-6)
    assert torch.equal(vc[:, start : start + t], x[:, nh + nkv :].transpose(0, 1).half())
    assert kc[:, :start].abs().sum() == 0 and kc[:, start + t :].abs().sum() == 0


amx = pytest.mark.skipif(not kernels.amx_prompts(), reason="no AMX-BF16 tiles here: prompts take the q4 kernels")


@amx
@pytest.mark.parametrize("n,k", [(960, 576), (16, 32), (48, 1536)])  # 48: an odd number of feature tiles
def test_dense_linear_on_amx_tiles_is_bf16_math_and_rows_are_independent(n, k):
    g = torch.Generator().manual_seed(n)
    w, bias = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    packed = pack_dense(w)
    op = lambda x, **kw: torch.ops.clp.dense_linear(  # noqa: E731
        x, packed, kw.get("bias"), kw.get("norm"), kw.get("eps", 0.0), kw.get("act", 0), kw.get("residual"))
    x = torch.randn(37, k, generator=g)  # two blocks of 16 rows and a padded third
    y = op(x, bias=bias)
    ref = F.linear(x.bfloat16().double(), w.bfloat16().double()) + bias.double()  # bf16 inputs, exact sums
    assert torch.allclose(y.double(), ref, atol=1e-5 * ref.abs().max())
    one = torch.cat([op(x[i : i + 1], bias=bias) for i in range(37)])
    for a, b in [(0, 1), (0, 16), (3, 20), (5, 37), (17, 18)]:  # any rows, any split: the same bits
        assert torch.equal(op(x[a:b], bias=bias), one[a:b])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(op(x, bias=bias), y)  # and any thread count
    finally:
        torch.set_num_threads(threads)
    # The fused fronts and the residual, as q4_linear takes them.
    norm, res = torch.rand(k, generator=g) + 0.5, torch.randn(37, n, generator=g)
    assert torch.equal(op(x, norm=norm, eps=1e-6), op(F.rms_norm(x, (k,), norm, 1e-6)))
    gu = torch.randn(37, 2 * k, generator=g)
    assert torch.allclose(op(gu, act=1), op(F.silu(gu[:, :k]) * gu[:, k:]), atol=1e-2)
    assert torch.equal(op(x, residual=res), op(x) + res)


# ---- the q4 backbone ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def q4_backbone(tmp_path_factory):
    """A tiny Llama with head_dim 64 (the kernels' vectorised attention) in q4 numerics."""
    path = save_tiny_model(tmp_path_factory.mktemp("tiny-q4"), "llama", seed=2, hidden_size=128, heads=2, kv_heads=1)
    return load_backbone(str(path), numerics="q4")


def test_q4_backbone_runs_the_fused_path_with_an_fp16_cache(q4_backbone):
    if kernels.load(quiet=True) is None:
        pytest.skip("no C++ kernels: q4 runs torch's int4 kernel")
    assert q4_backbone.info.numerics == "q4" and q4_backbone._lean.native
    assert q4_backbone.new_cache().dtype == torch.float16
    assert q4_backbone.quant_sources == {"gguf": 0, "gguf_rounded": 0, "quantised": 14, "lm_head": "quantised"}


def test_q4_steps_equal_one_token_steps_bit_for_bit(q4_backbone):
    ids = torch.tensor([[5, 9, 14, 20, 33, 7]])
    c1, c2 = q4_backbone.new_cache(), q4_backbone.new_cache()
    q4_backbone.forward(ids, c1)
    q4_backbone.forward(ids, c2)
    x = torch.tensor([[40, 41, 42, 43]])
    joint = q4_backbone.forward(x, c1)
    single = torch.cat([q4_backbone.forward(x[:, i : i + 1], c2) for i in range(4)], 1)
    if q4_backbone._lean.native:
        assert torch.equal(joint, single)
    else:
        assert torch.allclose(joint, single, atol=1e-2)


@amx
def test_prompts_run_on_amx_tiles_chunked_or_whole_and_decode_rows_never_do(q4_backbone):
    """On an AMX-BF16 machine a prompt's rows take the dense bf16 path: the same bits however
    the prompt is cut into chunks, close to the q4 rows, and a decode step is untouched."""
    assert q4_backbone._lean.prompt_weights()
    ids = torch.tensor([[5, 9, 14, 20, 33, 7, 60, 2, 11, 40, 41, 42, 43, 8, 3, 19, 27, 31, 50]])
    whole = q4_backbone.forward(ids, q4_backbone.new_cache(), prompt=True)
    c = q4_backbone.new_cache()
    chunks = torch.cat([q4_backbone.forward(ids[:, a:b], c, prompt=True) for a, b in [(0, 5), (5, 6), (6, 19)]], 1)
    assert torch.equal(whole, chunks)
    q4 = q4_backbone.forward(ids, q4_backbone.new_cache())
    assert not torch.equal(whole, q4) and (whole - q4).abs().mean() < 0.02 * q4.abs().mean()
    # Decode rows after a prompt: q4 rows, bit-identical to one-token steps.
    c1, c2 = q4_backbone.new_cache(), q4_backbone.new_cache()
    q4_backbone.forward(ids, c1, prompt=True)
    q4_backbone.forward(ids, c2, prompt=True)
    x = torch.tensor([[40, 41, 42]])
    assert torch.equal(q4_backbone.forward(x, c1),
                       torch.cat([q4_backbone.forward(x[:, i : i + 1], c2) for i in range(3)], 1))


def _dequantised_reference(path):
    """The fp32 model with every projection replaced by its 4-bit weights, dequantised: what
    q4 computes, but for the int8 rounding of activations and the fp16 cache."""
    ref = load_backbone(str(path), numerics="fp32")
    with torch.no_grad():
        for layer in ref.model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(Int4Weight.from_float(lin.weight).dequantize())
    ref._build_lean()  # the lean forward fused copies of the old weights
    return ref


def test_q4_hidden_states_stay_close_to_the_dequantised_model(q4_backbone):
    ref = _dequantised_reference(q4_backbone.model.name_or_path)
    ids = torch.tensor([[5, 9, 14, 20, 33, 7, 60, 2, 11]])
    h4 = q4_backbone.forward(ids, q4_backbone.new_cache())
    h32 = ref.forward(ids, ref.new_cache())
    # Activations are rounded to 16 bits per group of 32 (8 with CLP_ACT8) and K/V to fp16.
    tol = 2e-3 if kernels.load(quiet=True) is not None and kernels.load().activation_levels() > 127 else 0.1
    assert (h4 - h32).abs().mean() < tol * h32.abs().mean()
    # The transformers engine runs the same q4 projections (QuantLinear modules in place).
    hf = q4_backbone.forward(ids, q4_backbone.new_cache(engine="hf"))
    assert (h4 - hf).abs().mean() < tol * hf.abs().mean()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(3, 90), min_size=1, max_size=12), n=st.integers(1, 40), k=st.integers(1, 4),
       seed=st.integers(0, 10_000), lookup=st.booleans(), tree=st.sampled_from(["chain", 3, 6]))
def test_verified_equals_ar_on_q4(q4_backbone, ids, n, k, seed, lookup, tree):
    drafter = random_drafter(q4_backbone, k=k, design="chained", seed=seed)
    cfg = GenerationConfig(max_new_tokens=n)
    ar = generate(q4_backbone, ids, make_policy("ar"), cfg)
    ver = generate(q4_backbone, ids, make_policy("verified", q4_backbone, drafter, draft="all", lookup=lookup,
                                                 tree=tree), cfg)
    assert ver.token_ids == ar.token_ids


def test_q4_without_the_kernels_falls_back_to_torchs_int4(tmp_path, monkeypatch):
    monkeypatch.setitem(kernels._state, "module", None)
    path = save_tiny_model(tmp_path, "llama", seed=4)
    bb = load_backbone(str(path), numerics="q4")
    assert not bb._lean.native and bb.new_cache().dtype == torch.float32
    ref = _dequantised_reference(path)
    ids = torch.tensor([[5, 9, 14, 20]])
    h4, h32 = bb.forward(ids, bb.new_cache()), ref.forward(ids, ref.new_cache())
    assert (h4 - h32).abs().mean() < 0.1 * h32.abs().mean()  # bf16 activations


@native
def test_chain_drafting_on_the_kernels_matches_the_fp32_chain(q4_backbone):
    """Drafting with 8-bit weights on the kernels (what q4 backbones do) computes the same
    chain features as the fp32 chain, to the rounding of its weights."""
    drafter = random_drafter(q4_backbone, k=3, design="chained", seed=1, scale=0.05)
    chain = drafter.heads
    assert "kernels" in chain._fast_mods()  # attach() under q4 picked the kernels
    g = torch.Generator().manual_seed(0)
    feats, tokens = torch.randn(6, 128, generator=g), [5, 9, 14, 20, 33, 7]
    s_k, s_f = chain.new_state(), chain.new_state()
    g_k = chain.extend(s_k, feats, tokens)
    d_k = chain.draft_candidates(s_k, g_k, 3)
    chain.prepare_inference(None)  # fp32 copies
    g_f = chain.extend(s_f, feats, tokens)
    assert torch.allclose(g_k, g_f, atol=0.02 * g_f.abs().max())
    assert torch.allclose(s_k.k[:, :6], s_f.k[:, :6], atol=0.02 * s_f.k[:, :6].abs().max())
    assert len(chain.draft_candidates(s_f, g_f, 3)) == len(d_k) == 3


@native
@pytest.mark.parametrize("group", [32, 16])
@pytest.mark.parametrize("n", [20, 48])  # 20: a padded 4-feature tile; 48: three wide tiles (pairs and one alone)
def test_q8_linear_matches_the_dequantised_weight(group, n):
    from clpdecode.backbone.quant import Int8Linear, Int8Weight

    g = torch.Generator().manual_seed(group)
    k = 96
    w = Int8Weight(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                   torch.rand(n, k // group, generator=g) * 0.01, group)
    lin = Int8Linear(w)
    x = torch.randn(19, k, generator=g)  # two blocks of 8 rows and 3 more
    ref = x @ w.dequantize().t()
    y = lin(x)
    assert y.shape == (19, n) and torch.allclose(y, ref, atol=2e-4 * ref.abs().max())
    one = torch.cat([lin(x[i : i + 1]) for i in range(19)])
    for rows in (1, 6, 8, 9, 16, 19):  # any number of rows: bit-identical to one-row products
        assert torch.equal(lin(x[:rows]), one[:rows]), rows


@native
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cpp_layer_loop_equals_the_python_loop(tmp_path, arch):
    """clp::layers_forward (the whole step's layers in one call) computes exactly what the
    Python loop over the same kernels computes, steps, trees and aux layers included."""
    path = save_tiny_model(tmp_path, arch, seed=6, hidden_size=128, heads=2, kv_heads=1)
    bb = load_backbone(str(path), numerics="q4")
    lean = bb._lean
    assert lean._plan is not None
    ids = torch.tensor([[5, 9, 14, 20, 33, 7, 60, 2, 11, 40, 41, 42]])
    results = []
    for use_cpp in (True, False):
        plan, lean._plan = lean._plan, (lean._plan if use_cpp else None)
        cache = bb.new_cache()
        h1, a1 = bb.forward(ids[:, :9], cache, aux_layers=(0, 1))
        h2 = bb.forward(ids[:, 9:], cache)
        tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
        mask = torch.cat([torch.ones(3, cache.length, dtype=torch.bool), tree], 1)
        h3 = bb.forward(torch.tensor([[3, 4, 5]]), cache, mask=mask,
                        positions=torch.tensor([cache.length, cache.length + 1, cache.length + 1]))
        results.append((h1, a1, h2, h3))
        lean._plan = plan
    for a, b in zip(*results):
        assert torch.equal(a, b)
