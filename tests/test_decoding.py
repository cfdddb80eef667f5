"""The decoding loop: AR equals transformers' generate; verified equals AR (property tests);
oracle heads; EOS and stop strings inside spans; KV-cache rollback; seeded sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clpdecode.decoding import GenerationConfig, SamplingConfig, generate, make_policy
from clpdecode.decoding.tree import DraftTree, TreeConfig, build_tree, verify_tree
from clpdecode.errors import ClpError

from conftest import random_drafter

prompts = st.lists(st.integers(3, 90), min_size=1, max_size=12)
# Draft shapes: chains, small and large trees; the last takes every candidate as a sibling
# (min_prob 0), so that siblings are often what the backbone accepts.
TREES = ["chain", 2, 6, TreeConfig(size=16, width=6, min_prob=0.0)]


def hf_greedy(backbone, ids, n):
    out = backbone.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  pad_token_id=0)
    return out[0, len(ids):].tolist()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, n=st.integers(1, 24))
def test_ar_equals_transformers_generate(tiny_backbone, ids, n):
    res = generate(tiny_backbone, ids, make_policy("ar"), GenerationConfig(max_new_tokens=n))
    assert res.token_ids == hf_greedy(tiny_backbone, ids, n)
    assert res.forward_passes == res.new_tokens


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, n=st.integers(1, 40), k=st.integers(1, 4), seed=st.integers(0, 10_000),
       design=st.sampled_from(["fused", "residual", "chained", "chained-mlp", "eagle3"]),
       draft=st.sampled_from(["clp", "all"]),
       thr=st.floats(0.0, 1.0), lookup=st.booleans(), tree=st.sampled_from(TREES),
       lookup_tokens=st.sampled_from([0, 1, 9]))
def test_verified_equals_ar(tiny_backbone, ids, n, k, seed, design, draft, thr, lookup, tree, lookup_tokens):
    drafter = random_drafter(tiny_backbone, k=k, design=design, seed=seed)
    cfg = GenerationConfig(max_new_tokens=n)
    ar = generate(tiny_backbone, ids, make_policy("ar"), cfg)
    ver = generate(tiny_backbone, ids, make_policy("verified", tiny_backbone, drafter, draft=draft,
                                                   clp_threshold=thr, lookup=lookup, tree=tree,
                                                   lookup_tokens=lookup_tokens), cfg)
    assert ver.token_ids == ar.token_ids
    assert ver.forward_passes <= ar.forward_passes
    # Each forward yields one backbone token plus the drafts it verified; the last
    # forward's own token is not emitted when the output ends inside the verified drafts.
    assert ver.new_tokens - sum(ver.accepted_per_step) in (ver.forward_passes, ver.forward_passes - 1)


class OracleHeads:
    """Heads that know the AR continuation: proposes the right k tokens every step."""

    def __init__(self, reference, k):
        from clpdecode.heads import HeadsConfig

        self.cfg = HeadsConfig(k=k, hidden_size=32, design="residual", draft_vocab=0)
        self.ref, self.pos = reference, 0

    # The drafting-session interface (see Drafter.session): the oracle is its own session.
    def session(self, embed=None):
        return self

    def observe(self, rows, tokens):
        pass

    def propose(self, hidden, token, m):
        out = self.ref[self.pos + 1 : self.pos + 1 + self.cfg.k]
        self.pos += 1 + self.cfg.k
        return (out + [0] * (self.cfg.k - len(out)))[:m]


def oracle_drafter(reference, k):
    from clpdecode.heads import Drafter

    return Drafter(heads=OracleHeads(reference, k))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_oracle_heads_naive_emits_one_plus_k_per_forward(tiny_backbone, k):
    ids = [5, 17, 33, 40]
    n = 1 + (1 + k) * 6  # the prefill's step and 6 decode steps, all full
    tiny_backbone.eos_ids = set()  # no early stop
    try:
        ar = generate(tiny_backbone, ids, make_policy("ar"), GenerationConfig(max_new_tokens=n + k))
        res = generate(tiny_backbone, ids, make_policy("naive", tiny_backbone, oracle_drafter(ar.token_ids, k)),
                       GenerationConfig(max_new_tokens=(1 + k) * 7))
    finally:
        tiny_backbone.eos_ids = {2}
    assert res.token_ids == ar.token_ids[: (1 + k) * 7]
    assert res.forward_passes == 7
    assert res.accepted_per_step == [k] * 7
    assert res.tokens_per_forward == 1 + k


def test_eos_inside_accepted_span_ends_like_ar(tiny_backbone):
    ids = [8, 9, 10, 11]
    tiny_backbone.eos_ids = set()
    ar_free = generate(tiny_backbone, ids, make_policy("ar"), GenerationConfig(max_new_tokens=30))
    # Declare the 6th AR token EOS: AR must stop there, and so must a method that emits it
    # from inside a head span.
    eos = ar_free.token_ids[5]
    tiny_backbone.eos_ids = {eos}
    try:
        ar = generate(tiny_backbone, ids, make_policy("ar"), GenerationConfig(max_new_tokens=30))
        naive = generate(tiny_backbone, ids, make_policy("naive", tiny_backbone, oracle_drafter(ar_free.token_ids, 3)),
                         GenerationConfig(max_new_tokens=30))
    finally:
        tiny_backbone.eos_ids = {2}
    assert ar.token_ids[-1] == eos and len(ar.token_ids) <= 6
    assert naive.token_ids == ar.token_ids
    assert any(naive.from_heads)


def test_stop_string_inside_span(tiny_backbone):
    ids = [20, 21, 22]
    tiny_backbone.eos_ids = set()
    try:
        free = generate(tiny_backbone, ids, make_policy("ar"), GenerationConfig(max_new_tokens=30))
        stop = tiny_backbone.decode(free.token_ids[6:8])
        if not stop.strip():
            pytest.skip("random model produced whitespace")
        cfg = GenerationConfig(max_new_tokens=30, stop=(stop,))
        ar = generate(tiny_backbone, ids, make_policy("ar"), cfg)
        naive = generate(tiny_backbone, ids, make_policy("naive", tiny_backbone, oracle_drafter(free.token_ids, 3)),
                         cfg)
    finally:
        tiny_backbone.eos_ids = {2}
    assert stop in tiny_backbone.decode(ar.token_ids)
    assert len(ar.token_ids) <= 8
    assert naive.token_ids == ar.token_ids


def test_cache_rollback_matches_fresh_forward(tiny_backbone):
    bb = tiny_backbone
    prompt = torch.tensor([[4, 5, 6, 7, 8]])
    cache = bb.new_cache()
    bb.forward(prompt, cache)
    bb.forward(torch.tensor([[9, 10, 11]]), cache)  # drafts, two of them rejected
    bb.rollback(cache, 2)
    assert cache.get_seq_length() == 6
    h = bb.forward(torch.tensor([[12, 13]]), cache)[0]
    fresh = bb.forward(torch.tensor([[4, 5, 6, 7, 8, 9, 12, 13]]), bb.new_cache())[0, -2:]
    assert torch.allclose(h, fresh, atol=1e-5)


@pytest.mark.parametrize("method", ["ar", "naive", "clp", "gate", "verified", "competing"])
def test_sampling_with_seed_is_reproducible(tiny_backbone, method):
    drafter = random_drafter(tiny_backbone, k=2, seed=3)
    cfg = GenerationConfig(max_new_tokens=20, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=7))
    pol = make_policy(method, tiny_backbone, drafter)
    a = generate(tiny_backbone, [3, 4, 5], pol, cfg)
    b = generate(tiny_backbone, [3, 4, 5], pol, cfg)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("method", ["ar", "naive", "clp", "gate", "verified", "competing"])
def test_sampling_seed_changes_the_output(tiny_backbone, method):
    """Every method draws from its sampler: another seed gives another text (so the
    reproducibility test above is not passing by ignoring the sampler)."""
    drafter = random_drafter(tiny_backbone, k=2, seed=3)
    pol = make_policy(method, tiny_backbone, drafter)
    outs = {tuple(generate(tiny_backbone, [3, 4, 5], pol, GenerationConfig(
        max_new_tokens=20, sampling=SamplingConfig(temperature=1.5, seed=seed))).token_ids) for seed in range(4)}
    assert len(outs) > 1


def test_speculative_acceptance_keeps_the_backbone_distribution():
    """Accept draft d with p(d), else draw from the residual: the token's law is p itself."""
    from clpdecode.decoding import Sampler

    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    p = sampler.probs(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]))
    for draft in (0, 3):
        counts = torch.zeros(5)
        for _ in range(20_000):
            ok, p_next = sampler.accept(p, draft)
            counts[draft if ok else sampler.select(p_next)] += 1
        assert torch.allclose(counts / counts.sum(), p, atol=0.015)


@pytest.mark.parametrize("method", ["naive", "gate", "clp", "competing"])
def test_multi_token_methods_run_and_count(tiny_backbone, method):
    drafter = random_drafter(tiny_backbone, k=3, seed=11)
    res = generate(tiny_backbone, [7, 8, 9], make_policy(method, tiny_backbone, drafter, clp_threshold=0.2,
                                                         gate_threshold=0.2), GenerationConfig(max_new_tokens=25))
    assert 1 <= res.new_tokens <= 25
    # Unverified: each forward is followed by one backbone token and the head tokens emitted.
    assert res.new_tokens == res.forward_passes + sum(res.accepted_per_step)
    assert all(0 <= a <= 3 for a in res.accepted_per_step)


def test_bad_inputs(tiny_backbone):
    with pytest.raises(ClpError):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ClpError):
        generate(tiny_backbone, [], make_policy("ar"))
    with pytest.raises(ClpError):
        make_policy("nope")
    with pytest.raises(ClpError):
        GenerationConfig(stop=("",))
    with pytest.raises(ClpError):
        make_policy("clp", tiny_backbone, random_drafter(tiny_backbone), clp_threshold=float("nan"))
    with pytest.raises(ClpError):
        generate(tiny_backbone, [3, 4], make_policy("ar"), GenerationConfig(max_new_tokens=10_000))
    with pytest.raises(ClpError):
        make_policy("clp", tiny_backbone, None)


def test_sliding_window_model_verified_equals_ar_past_the_window():
    """Gemma 3 style sliding-window layers (window 8), decoding 40 tokens: rollbacks past
    the window keep verified == AR == transformers' generate (lean engine)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from clpdecode.backbone.model import Backbone

    from conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    bb = Backbone(model, tok, "tiny-gemma3")
    bb.eos_ids = set()
    ids = [5, 6, 7, 8, 9]
    cfg40 = GenerationConfig(max_new_tokens=40)
    ar = generate(bb, ids, make_policy("ar"), cfg40)
    assert ar.token_ids == hf_greedy(bb, ids, 40)
    ver = generate(bb, ids, make_policy("verified", bb, random_drafter(bb, k=3, seed=1), draft="all"), cfg40)
    assert ver.token_ids == ar.token_ids
    # Drafts that are right half of the time: accepted spans and rejections past the window.
    ref = ar.token_ids + [0] * 8
    noisy = [t if i % 2 else (t + 1) % len(tok) for i, t in enumerate(ref)]
    oracle = generate(bb, ids, make_policy("verified", bb, oracle_drafter(noisy, 3), draft="all"), cfg40)
    assert oracle.token_ids == ar.token_ids and sum(oracle.accepted_per_step) > 0


def test_lookup_drafts_copy_the_latest_earlier_continuation():
    from types import SimpleNamespace

    from clpdecode.decoding import Sampler

    class Inner:  # a drafting session that always drafts 99s
        def observe(self, rows, tokens):
            pass

        def propose(self, hidden, token, m):
            return [99] * m

        def candidates(self, hidden, token, m, width=1):
            return [[(99, float("nan"))]] * m

    drafter = SimpleNamespace(k=3, clp=None, session=lambda backbone: Inner(), aux_layers=())
    pol = make_policy("verified", SimpleNamespace(), drafter, draft="all")
    greedy = Sampler(SamplingConfig())

    def propose(token):  # the backbone chose `token`: the step's drafts
        return pol.propose(torch.zeros(4), torch.nn.functional.one_hot(torch.tensor(token), 100).float(),
                           greedy).drafts

    pol.start()
    h = torch.zeros(9, 4)
    pol.observe(h, [1, 2, 3, 4, 1, 2, 3, 5])  # the text so far: x 1 2 3 4 1 2 3 5
    assert propose(1) == [99, 99, 99]  # tail "5 1": never seen, so the drafter's drafts
    pol.observe(torch.zeros(1, 4), [])
    assert propose(2) == [3, 5, 1]  # tail "1 2": its latest earlier occurrence goes on 3 5 1 (k tokens)
    pol.observe(torch.zeros(1, 4), [])
    assert propose(3) == [5, 1, 2]  # tail "1 2 3" (longest match first), k = 3 tokens
    assert pol.lookup_steps == 2
    pol.start()  # a new generation forgets the text
    pol.observe(torch.zeros(2, 4), [1])
    assert propose(2) == [99, 99, 99] and pol.lookup_steps == 0


def test_verified_with_lookup_uses_it_on_repetitive_text(tiny_backbone):
    """On a prompt that repeats, lookup drafts are taken and output still equals AR."""
    drafter = random_drafter(tiny_backbone, k=3, seed=2)
    ids = [10, 11, 12, 13, 14] * 6
    cfg = GenerationConfig(max_new_tokens=30)
    ar = generate(tiny_backbone, ids, make_policy("ar"), cfg)
    pol = make_policy("verified", tiny_backbone, drafter, draft="all", lookup=True)
    ver = generate(tiny_backbone, ids, pol, cfg)
    assert ver.token_ids == ar.token_ids and pol.lookup_steps > 0
    assert max(ver.accepted_per_step) <= 3  # a lookup draft copies k tokens by default
    # --lookup-tokens: longer lookup drafts than k, kept where the text goes on repeating.
    pol = make_policy("verified", tiny_backbone, drafter, draft="all", lookup=True, lookup_tokens=9)
    longer = generate(tiny_backbone, ids, pol, cfg)
    assert longer.token_ids == ar.token_ids
    pol.start()  # a fresh session: its lookup copies 9 tokens after the tail's earlier occurrence
    pol.ngrams.extend(list(range(10, 30)) + [10, 11, 12])
    assert pol.ngrams.lookup() == list(range(13, 22))
    for bad in (-1, 1.5, True):
        with pytest.raises(ClpError, match="lookup_tokens"):
            make_policy("verified", tiny_backbone, drafter, lookup_tokens=bad)


# ---- draft trees ---------------------------------------------------------------------------
def test_build_tree_shares_prefixes_and_keeps_within_size():
    cands = [[(5, 0.6), (6, 0.3), (7, 0.05)], [(8, 0.5), (9, 0.4)], [(10, 0.9)]]
    tree = build_tree(4, cands, span=2, lookup=[5, 8, 11], cfg=TreeConfig(size=8, min_prob=0.1))
    # chain 4-5-8; lookup shares 5-8 and adds 11; then by path probability: 6 (0.3) under the
    # root, 10 (0.6*0.5*0.9, past the span: the top-1 competes there) under 8, 9 (0.6*0.4) under
    # 5; 7 (0.05) is below min_prob.
    assert tree.tokens == [4, 5, 8, 11, 6, 10, 9]
    assert tree.parents == [-1, 0, 1, 2, 0, 2, 1]
    assert tree.depth == [0, 1, 2, 3, 1, 3, 2]
    small = build_tree(4, cands, span=2, lookup=[5, 8, 11], cfg=TreeConfig(size=3))
    assert len(small) == 4 and small.is_chain
    # below a span of 0 the drafter's top-1 competes as a sibling of the root
    zero = build_tree(4, cands, span=0, lookup=[], cfg=TreeConfig(size=8, min_prob=0.1))
    assert zero.tokens == [4, 5, 6] and zero.parents == [-1, 0, 0]


def test_tree_mask_positions_and_pruning():
    tree = DraftTree.chain(1, [2, 3])
    tree.add(0, 7)
    tree.add(1, 8)
    m = tree.mask(past=2)
    assert m.shape == (5, 7) and m[:, :2].all()
    assert m[3, 2:].tolist() == [True, False, False, True, False]  # node 3 (token 7): root and itself
    assert m[4, 2:].tolist() == [True, True, False, False, True]  # node 4 (token 8) under node 1
    assert tree.positions(2).tolist() == [2, 3, 4, 3, 4]
    p = tree.pruned(1)
    assert p.tokens == [1, 2, 7] and p.parents == [-1, 0, 0]


def test_tree_forward_equals_each_path_as_a_chain(tiny_backbone):
    """Every node's hidden state equals the one its path gets when fed as a plain chain;
    keeping a branch leaves the cache as if only that branch had been fed."""
    bb = tiny_backbone
    prompt = [5, 9, 14, 3, 22]
    tree = DraftTree.chain(40, [41, 42])
    tree.add(tree.add(0, 50), 51)  # nodes 3, 4: branch 40-50-51
    tree.add(1, 60)  # node 5: a sibling of 42
    cache = bb.new_cache()
    bb.forward(torch.tensor([prompt]), cache)
    past = cache.length
    h = bb.forward(torch.tensor([tree.tokens]), cache, mask=tree.mask(past), positions=tree.positions(past))[0]
    for leaf in (2, 4, 5):
        path = [leaf]
        while tree.parents[path[0]] >= 0:
            path.insert(0, tree.parents[path[0]])
        ref_cache = bb.new_cache()
        ref = bb.forward(torch.tensor([prompt + tree.path_tokens(path)]), ref_cache)[0, len(prompt):]
        torch.testing.assert_close(h[path], ref, atol=1e-5, rtol=1e-5)
    bb.keep(cache, len(tree), [0, 3, 4])  # keep 40-50-51
    nxt = bb.forward(torch.tensor([[77]]), cache)[0]
    ref_cache = bb.new_cache()
    ref = bb.forward(torch.tensor([prompt + [40, 50, 51, 77]]), ref_cache)[0, -1:]
    torch.testing.assert_close(nxt, ref, atol=1e-5, rtol=1e-5)


def test_sibling_acceptance_keeps_the_backbone_distribution():
    """Trying two sibling drafts in turn, each removed from p once rejected, still draws
    the kept token from p (SpecInfer's rule for several deterministic drafts)."""
    from clpdecode.decoding.sampling import Sampler

    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(3, 4)  # every node's the same

    tree = DraftTree(0)
    tree.add(0, 3)
    tree.add(0, 1)
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    counts = torch.zeros(4)
    for _ in range(20000):
        path, p = verify_tree(tree, logits, sampler)
        tok = tree.tokens[path[1]] if len(path) > 1 else sampler.select(p)
        counts[tok] += 1
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015, rtol=0)


def test_tree_keeps_a_sibling_when_the_chain_is_wrong(tiny_backbone):
    """A drafter whose top-1 is always wrong but whose runner-up is right: with a tree the
    runner-up is accepted, the output still equals AR, and fewer forwards are needed."""
    bb = tiny_backbone
    bb.eos_ids = set()
    ids = [5, 17, 33, 40]
    cfg = GenerationConfig(max_new_tokens=24)
    ar = generate(bb, ids, make_policy("ar"), cfg).token_ids

    class RunnerUp:
        def session(self, embed=None):
            self.out, self.prefilled = [], False  # the tokens generated so far
            return self

        def observe(self, rows, tokens):
            if self.prefilled:  # the prefill's tokens are the prompt's
                self.out.extend(tokens)
            self.prefilled = True

        def candidates(self, hidden, token, m, width=1):
            self.out.append(token)
            nxt = ar[len(self.out)] if len(self.out) < len(ar) else 0
            return [[((nxt + 1) % 90, 0.6), (nxt, 0.4)]][:m]

        def propose(self, hidden, token, m):
            return [c[0][0] for c in self.candidates(hidden, token, m)]

    from clpdecode.heads import Drafter, HeadsConfig

    drafter = Drafter(heads=RunnerUp())
    drafter.heads.cfg = HeadsConfig(k=1, hidden_size=32, design="residual", draft_vocab=0)
    chain = generate(bb, ids, make_policy("verified", bb, drafter, draft="all", lookup=False), cfg)
    tree = generate(bb, ids, make_policy("verified", bb, drafter, draft="all", lookup=False,
                                         tree=TreeConfig(size=2, min_prob=0.1)), cfg)
    assert chain.token_ids == tree.token_ids == ar
    assert sum(chain.accepted_per_step) == 0
    assert sum(tree.accepted_per_step) > 0 and tree.forward_passes < chain.forward_passes


def test_policy_config_is_the_one_check_of_the_policy_settings():
    from dataclasses import FrozenInstanceError

    from clpdecode.decoding import PolicyConfig

    cfg = PolicyConfig(method="verified", tree="4")
    assert cfg.tree_config.size == 4 and cfg.needs_drafter and not PolicyConfig().needs_drafter
    with pytest.raises(FrozenInstanceError):
        cfg.method = "ar"
    for bad, param in [({"method": "fast"}, "method"), ({"clp_threshold": -0.1}, "clp_threshold"),
                       ({"gate_threshold": float("nan")}, "gate_threshold"), ({"draft": "some"}, "draft"),
                       ({"lookup": "yes"}, "lookup"), ({"lookup_tokens": -1}, "lookup_tokens"),
                       ({"tree": "bush"}, "tree"), ({"tree": 0}, "tree")]:
        with pytest.raises(ClpError) as e:
            PolicyConfig(**bad)
        assert e.value.param == param and param in str(e.value)
    ns = type("Args", (), {"clp_threshold": 0.7, "method": "clp", "threads": 2})()
    assert PolicyConfig.from_namespace(ns) == PolicyConfig(method="clp", clp_threshold=0.7)
    assert PolicyConfig.from_namespace(ns, method="gate").method == "gate"


def test_every_drafting_session_has_the_protocols_methods(tiny_backbone):
    from clpdecode.decoding import DraftSession

    for design in ("fused", "residual", "chained", "chained-mlp", "eagle3"):
        assert isinstance(random_drafter(tiny_backbone, k=2, design=design).session(tiny_backbone), DraftSession)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([-1.0, 0.0, 2.5, 2.5, float("inf"), float("-inf"), float("nan")]),
                       min_size=1, max_size=40), n=st.integers(1, 3000), seed=st.integers(0, 99))
def test_top1_is_torch_argmax(values, n, seed):
    """The greedy pick through numpy is torch.argmax's, ties (first index), infinities and
    NaN (the first NaN) included; other dtypes and shapes go to torch itself."""
    from clpdecode.decoding.sampling import top1

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 3, (n,), generator=g).float()  # many ties
    x[torch.randint(0, n, (len(values),), generator=g)] = torch.tensor(values)
    assert top1(x) == int(torch.argmax(x))
    for y in (x.half(), x[::2], x.double()):
        assert top1(y) == int(torch.argmax(y))
