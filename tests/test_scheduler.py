"""Continuous batching (decoding/scheduler.py): a request's output never depends on what else
shares its steps, on the q4 kernels' batched step and on the one-forward-per-request fallback."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clpdecode.backbone import kernels, load_backbone
from clpdecode.decoding import GenerationConfig, SamplingConfig, generate, make_policy
from clpdecode.decoding.loop import Decoder
from clpdecode.decoding.scheduler import CostModel, Request, Scheduler, allocate
from clpdecode.errors import ClpError

from conftest import random_drafter, save_tiny_model

native = pytest.mark.skipif(kernels.load(quiet=True) is None, reason="the C++ kernels could not be built here")


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    """A tiny Llama with head_dim 64 in q4 numerics: the batched whole-step path."""
    path = save_tiny_model(tmp_path_factory.mktemp("tiny-q4-sched"), "llama", seed=2, hidden_size=128, heads=2,
                           kv_heads=1)
    return load_backbone(str(path), numerics="q4")


def run_all(scheduler, jobs, backbone, drafter):
    """Submit every (prompt, method, cfg, extra) job at once, run to the end; the results."""
    done = {}
    for i, (ids, method, cfg, extra) in enumerate(jobs):
        scheduler.submit(Request(ids, make_policy(method, backbone, drafter, **extra), cfg,
                                 on_done=lambda r, e, i=i: done.__setitem__(i, (r, e))))
    scheduler.run()
    assert not scheduler.running and not scheduler.waiting and sorted(scheduler.free) == list(range(scheduler.slots))
    return [done[i] for i in range(len(jobs))]


job = st.tuples(
    st.lists(st.integers(3, 90), min_size=1, max_size=30),
    st.sampled_from(["ar", "verified", "verified", "clp", "naive", "gate"]),
    st.integers(1, 30),
    st.sampled_from([0.0, 0.0, 1.0]),
    st.sampled_from([{}, {"draft": "all"}, {"tree": 4}, {"lookup": False}]),
)


@native
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jobs=st.lists(job, min_size=1, max_size=9), slots=st.integers(1, 5), max_rows=st.integers(1, 24),
       prefill_rows=st.integers(1, 48), budget=st.sampled_from(["auto", "off"]), seed=st.integers(0, 1000))
def test_a_requests_text_is_its_text_alone_whatever_shares_its_steps(q4, jobs, slots, max_rows, prefill_rows,
                                                                     budget, seed):
    """Batch invariance: every request's tokens equal generate()'s for it alone, for every
    method, greedy or sampled, whatever the slots, the row caps (prompts fed in chunks, with
    and without decode rows beside them) and the draft budget (which changes a greedy
    verified request's drafts, never its text)."""
    drafter = random_drafter(q4, k=3, design="chained", seed=seed)
    jobs = [(ids, m, GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(temperature=t, seed=i)), extra)
            for i, (ids, m, n, t, extra) in enumerate(jobs)]
    alone = [generate(q4, ids, make_policy(m, q4, drafter, **extra), cfg).token_ids for ids, m, cfg, extra in jobs]
    sched = Scheduler(q4, slots=slots, max_rows=max_rows, max_prefill_rows=prefill_rows, budget=budget,
                      calibrate=False)
    assert sched.batched
    results = run_all(sched, jobs, q4, drafter)
    assert [e for _, e in results] == [None] * len(jobs)
    assert [r.token_ids for r, _ in results] == alone


def test_the_fallback_runs_each_request_on_its_own_cache(tiny_backbone):
    """fp32 numerics have no batched step: one forward per request, the same texts."""
    drafter = random_drafter(tiny_backbone, k=2, seed=4)
    jobs = [([5 + i, 6, 7], m, GenerationConfig(max_new_tokens=12), {})
            for i, m in enumerate(["ar", "verified", "clp"])]
    sched = Scheduler(tiny_backbone, slots=2)
    assert not sched.batched
    results = run_all(sched, jobs, tiny_backbone, drafter)
    alone = [generate(tiny_backbone, ids, make_policy(m, tiny_backbone, drafter), cfg).token_ids
             for ids, m, cfg, _ in jobs]
    assert [r.token_ids for r, _ in results] == alone


@native
def test_one_request_failing_or_cancelled_costs_the_others_nothing(q4):
    drafter = random_drafter(q4, k=2, design="chained", seed=3)
    cfg = GenerationConfig(max_new_tokens=20)
    want = generate(q4, [5, 6, 7], make_policy("verified", q4, drafter), cfg).token_ids
    sched = Scheduler(q4, slots=3, calibrate=False)
    done = {}

    def boom(ids, from_heads):
        raise RuntimeError("a client's callback failed")

    cancel_me = Request([8, 9], make_policy("ar"), GenerationConfig(max_new_tokens=30),
                        on_done=lambda r, e: done.__setitem__("cancelled", (r, e)))
    cancel_me.on_tokens = lambda ids, fh: cancel_me.cancel()  # goes away after its first token
    sched.submit(Request([5, 6, 7], make_policy("verified", q4, drafter), cfg,
                         on_done=lambda r, e: done.__setitem__("ok", (r, e))))
    sched.submit(Request([5, 6, 7], make_policy("ar"), cfg, on_tokens=boom,
                         on_done=lambda r, e: done.__setitem__("boom", (r, e))))
    sched.submit(cancel_me)
    too_long = Request([3] * 10, make_policy("ar"), GenerationConfig(max_new_tokens=10_000),
                       on_done=lambda r, e: done.__setitem__("long", (r, e)))
    sched.submit(too_long)
    sched.run()
    assert done["ok"][0].token_ids == want and done["ok"][1] is None
    assert done["boom"][0] is None and isinstance(done["boom"][1], RuntimeError)
    assert done["cancelled"] == (None, None)
    assert done["long"][0] is None and isinstance(done["long"][1], ClpError)
    assert sched.stats["completed"] == 1 and sched.stats["failed"] == 2 and sched.stats["cancelled"] == 1
    assert sorted(sched.free) == [0, 1, 2]


def test_a_policy_shared_by_two_running_requests_fails_the_second_only(tiny_backbone):
    """A policy object holds one request's draft state: a second running request on the same
    object gets a clear error (before this it failed mid-step, "observe() twice without
    propose()"); the first one is unharmed, and reusing the object afterwards is fine."""
    drafter = random_drafter(tiny_backbone, k=2, seed=5)
    policy = make_policy("verified", tiny_backbone, drafter)
    cfg = GenerationConfig(max_new_tokens=8)
    sched, done = Scheduler(tiny_backbone, slots=2), {}
    for name in ("first", "second"):
        sched.submit(Request([5, 6, 7], policy, cfg, on_done=lambda r, e, n=name: done.__setitem__(n, (r, e))))
    sched.run()
    want = generate(tiny_backbone, [5, 6, 7], make_policy("verified", tiny_backbone, drafter), cfg).token_ids
    assert done["first"][0].token_ids == want and done["first"][1] is None
    assert done["second"][0] is None and isinstance(done["second"][1], ClpError)
    assert "make one per request" in str(done["second"][1])
    sched.submit(Request([5, 6, 7], policy, cfg, on_done=lambda r, e: done.__setitem__("again", (r, e))))
    sched.run()
    assert done["again"][0].token_ids == want


@native
def test_one_request_alone_drafts_as_unbudgeted_verified(q4):
    """The budget reduces to `verified` at one request: the same drafts as with no budget."""
    drafter = random_drafter(q4, k=2, design="chained", seed=6)
    drafted = {}
    for budget in ("auto", "off"):
        sched = Scheduler(q4, slots=2, budget=budget, calibrate=False)
        sched.cost.draft_ms = 1e3  # by its cost model no drafter draft would pay: alone, it drafts anyway
        for ids in ([5, 6, 7], [9, 4]):  # one after the other: never two at once
            sched.submit(Request(ids, make_policy("verified", q4, drafter), GenerationConfig(max_new_tokens=16)))
            sched.run()
        drafted[budget] = sched.stats["drafted"]
    assert drafted["auto"] == drafted["off"] > 0


@native
def test_requests_join_while_others_run(q4):
    """Continuous batching: a request submitted mid-run joins at a step boundary."""
    sched = Scheduler(q4, slots=2, calibrate=False)
    cfg = GenerationConfig(max_new_tokens=25)
    done = {}
    sched.submit(Request([5, 6, 7], make_policy("ar"), cfg, on_done=lambda r, e: done.__setitem__(0, r)))
    for _ in range(5):
        sched.step()
    sched.submit(Request([9, 10], make_policy("ar"), cfg, on_done=lambda r, e: done.__setitem__(1, r)))
    sched.step()
    assert len(sched.running) == 2
    sched.run()
    for i, ids in enumerate(([5, 6, 7], [9, 10])):
        assert done[i].token_ids == generate(q4, ids, make_policy("ar"), cfg).token_ids


def test_allocate_grants_the_most_valuable_rows_while_they_pay():
    cost = CostModel(a=10.0, b=2.0, draft_ms=0.0)  # 10 ms a step + 2 ms a row
    # One request alone: a step makes 1 token in 12 ms; a draft worth v pays when v/2 > 1/12.
    assert allocate({"a": [0.9, 0.5, 0.1]}, rows=1, tokens=1.0, cost=cost) == {"a": 2}
    # Eight requests: 8 tokens in 26 ms; only drafts worth more than 2 * 8/26 ~ 0.62 pay.
    grant = allocate({i: [0.9, 0.7, 0.3] if i == 0 else [0.5] for i in range(8)}, rows=8, tokens=8.0, cost=cost)
    assert grant == {0: 2, **{i: 0 for i in range(1, 8)}}
    # Drafts are granted in order: the second only after the first.
    assert allocate({"a": [0.05, 0.05]}, rows=1, tokens=1.0, cost=cost) == {"a": 0}
    # The drafter's own time counts against its rows, not against lookup's.
    slow = CostModel(a=10.0, b=2.0, draft_ms=20.0)
    assert allocate({"a": [0.9], "b": [0.9]}, rows=2, tokens=2.0, cost=slow, lookup={"b": True}) == {"a": 0, "b": 1}
    # A prefill's rows make no tokens yet: against the step they share (1 token in 150 ms) any
    # draft would look cheap; against what the decode rows alone make (8 in 26 ms) a 0.5 does not.
    assert allocate({i: [0.5] for i in range(8)}, rows=70, tokens=8.0, cost=cost) == {i: 1 for i in range(8)}
    assert allocate({i: [0.5] for i in range(8)}, rows=70, tokens=8.0, cost=cost, decode_rows=8) == {
        i: 0 for i in range(8)}


def test_grants_follow_how_drafts_are_kept_and_what_they_save():
    """CLP's worth is scaled by kept / expected of the drafts verified lately, and a grant's
    expected saving (Grant.gain_ms) is its kept tokens at the ms per token of the step with the
    grants before it, less its row."""
    cost = CostModel(a=10.0, b=2.0, draft_ms=0.0)  # one request: 1 token in 12 ms, 2 ms a row
    grant = allocate({"a": [0.9, 0.5, 0.1]}, rows=1, tokens=1.0, cost=cost)
    assert grant == {"a": 2} and grant.gain_ms == pytest.approx((0.9 * 12 - 2) + (0.5 * 14 / 1.9 - 2))
    assert cost.keep_scale == 1.0
    cost.observe_keep(2.0, 1)  # too little evidence yet
    assert cost.keep_scale == 1.0
    for _ in range(20):
        cost.observe_keep(1.0, 0)
    assert cost.keep_scale < 0.1 + 1e-9  # drafts CLP liked were not kept: scaled down (to the floor)
    assert allocate({"a": [0.9, 0.5, 0.1]}, rows=1, tokens=1.0, cost=cost) == {"a": 0}
    for _ in range(200):
        cost.observe_keep(1.0, 1)
    assert cost.keep_scale == pytest.approx(1.0, abs=0.05)


@native
def test_the_budget_asks_seldom_while_asking_costs_more_than_it_buys(q4, monkeypatch):
    """Where the grants' expected saving has been below what the offers cost, the requests
    are asked once in ASK_EVERY steps; where it pays, every step."""
    from clpdecode.decoding.scheduler import ASK_EVERY

    drafter = random_drafter(q4, k=3, design="chained", seed=2)
    asked = []

    def run(gain_ms: float) -> list[int]:
        sched = Scheduler(q4, slots=3, calibrate=False)
        sched.cost = CostModel(a=10.0, b=0.1)  # rows cheap beside a step: drafts may pay
        sched.cost.offer_ms, sched.cost.gain_ms = 1.0, gain_ms
        for name in ("observe", "observe_gain", "observe_offers"):  # keep the costs as set
            monkeypatch.setattr(sched.cost, name, lambda *a: None)
        real = Decoder.offer
        asked.clear()
        monkeypatch.setattr(Decoder, "offer", lambda self: (asked.append(sched.stats["steps"]), real(self))[1])
        for i in range(3):
            policy = make_policy("verified", q4, drafter)
            sched.submit(Request([5 + i] * 6, policy, GenerationConfig(max_new_tokens=40)))
        for _ in range(1 + 2 * ASK_EVERY):
            sched.step()
        return sorted(set(asked))

    seldom = run(0.5)  # 0.5 ms saved against 3 x 1 ms asked
    assert 1 <= len(seldom) <= 3 and all(b - a == ASK_EVERY for a, b in zip(seldom, seldom[1:]))
    assert len(run(50.0)) >= 2 * ASK_EVERY - 1  # asked at every step


def test_cost_model_follows_the_measured_steps():
    cost = CostModel(a=1.0, b=1.0)
    curve = {1: 10.0, 2: 10.5, 4: 12.0, 8: 20.0, 16: 40.0}  # the first extra rows cost less than later ones
    for _ in range(40):
        for rows, ms in curve.items():
            cost.observe(rows, ms)
    for rows, ms in curve.items():
        assert cost.step_ms(rows) == pytest.approx(ms, rel=0.02)
    assert cost.row_ms(1) == pytest.approx(0.5, rel=0.1) and cost.row_ms(8) == pytest.approx(2.5, rel=0.1)
    assert cost.step_ms(6) == pytest.approx(16.0, rel=0.03)  # between entries: interpolated
    assert cost.step_ms(32) == pytest.approx(80.0, rel=0.02)  # past the measured sizes: the last slope
    assert CostModel(a=10.0, b=2.0).step_ms(5) == 20.0  # nothing measured: the prior line


@native
def test_the_cost_table_learns_from_decode_steps_only(q4, monkeypatch):
    """Prompt rows cost less than decode and draft rows (no LM head; their own kernel on
    AMX-BF16), so steps carrying prompt chunks do not enter the table that prices drafts."""
    sched = Scheduler(q4, slots=2, max_rows=64, calibrate=False)
    seen = []
    monkeypatch.setattr(sched.cost, "observe", lambda rows, ms: seen.append(rows))
    for ids in ([5] * 20, [7] * 30):
        sched.submit(Request(ids, make_policy("ar"), GenerationConfig(max_new_tokens=4)))
    steps = []
    while sched.running or sched.waiting:
        steps.append(sched.step())
    assert steps[0] == 50 and seen == [r for r in steps[1:] if r]  # the prompts' step only is left out


@native
def test_a_burst_prefills_in_one_step_while_nobody_decodes(q4):
    """Prompts arriving together run in one step under max_prefill_rows (nobody waits for a
    token yet); a prompt arriving while others decode is fed in chunks of max_rows."""
    sched = Scheduler(q4, slots=4, max_rows=8, max_prefill_rows=100, budget="off", calibrate=False)
    for ids in ([5] * 20, [7] * 30, [9] * 25):
        sched.submit(Request(ids, make_policy("ar"), GenerationConfig(max_new_tokens=12)))
    assert sched.step() == 75  # the whole burst at once
    assert sched.step() == 3  # three decode rows
    sched.submit(Request([11] * 20, make_policy("ar"), GenerationConfig(max_new_tokens=4)))
    assert [sched.step() for _ in range(5)] == [8, 8, 8, 8, 4]  # 3 decode rows + 5 of its 20, then 4 decode
    assert Scheduler(q4, max_rows=300, max_prefill_rows=10, calibrate=False).max_prefill_rows == 300


def test_bad_scheduler_settings(tiny_backbone):
    for kw, param in [({"budget": "maybe"}, "spec_budget"), ({"slots": 0}, "parallel"), ({"max_rows": 0}, "max_rows"),
                      ({"max_prefill_rows": 0}, "max_prefill_rows")]:
        with pytest.raises(ClpError) as e:
            Scheduler(tiny_backbone, **kw)
        assert e.value.param == param


@native
def test_the_scheduler_serves_from_another_thread(q4):
    """The server's use: one thread steps, others submit and wait."""
    sched = Scheduler(q4, slots=4, calibrate=False)
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            if sched.wait_for_work(0.05):
                sched.step()

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    events = [threading.Event() for _ in range(6)]
    outs = {}
    for i, ev in enumerate(events):
        sched.submit(Request([4 + i, 5, 6], make_policy("ar"), GenerationConfig(max_new_tokens=10),
                             on_done=lambda r, e, i=i, ev=ev: (outs.__setitem__(i, r), ev.set())))
    assert all(ev.wait(60) for ev in events)
    stop.set()
    sched.wake()
    t.join(5)
    for i in range(6):
        assert outs[i].token_ids == generate(q4, [4 + i, 5, 6], make_policy("ar"),
                                             GenerationConfig(max_new_tokens=10)).token_ids
    assert torch.get_num_threads() >= 1


@native
def test_greedy_answers_on_the_batched_step_are_each_prompts_answer_alone(q4):
    """`clp distill` and `eval-heads --prompts` answer through the scheduler: every answer is
    generate()'s for its prompt alone (EOS kept, as before), in batches of about batch_size."""
    from clpdecode.corpus import greedy_answers

    prompts = [[5 + i] * (1 + i % 7) for i in range(11)]
    got, batches = {}, 0
    for batch in greedy_answers(q4, prompts, 9, batch_size=4, progress=False):
        batches += 1
        got.update(batch)
    assert sorted(got) == list(range(11)) and batches >= 3
    for n, ids in enumerate(prompts):
        assert got[n] == generate(q4, ids, make_policy("ar"), GenerationConfig(max_new_tokens=9)).token_ids


@native
def test_gemma3_sliding_windows_batch_invariant(tmp_path):
    """A tiny Gemma 3 (sliding-window layers of 8, q/k norms, tanh-GELU) on the batched step:
    prompts and answers past the window, every request its text alone."""
    path = save_tiny_model(tmp_path, "gemma3", seed=3, hidden_size=128, heads=2, kv_heads=1)
    bb = load_backbone(str(path), numerics="q4")
    drafter = random_drafter(bb, k=2, design="chained", seed=1)
    jobs = [([5 + i] * (3 + 4 * i), m, GenerationConfig(max_new_tokens=20), {})
            for i, m in enumerate(["ar", "verified", "verified", "clp", "ar"])]
    alone = [generate(bb, ids, make_policy(m, bb, drafter), cfg).token_ids for ids, m, cfg, _ in jobs]
    sched = Scheduler(bb, slots=3, max_rows=7, calibrate=False)
    assert sched.batched
    assert [r.token_ids for r, _ in run_all(sched, jobs, bb, drafter)] == alone
