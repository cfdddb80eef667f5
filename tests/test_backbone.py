"""Backbone loading: local folders (Llama and Qwen2 code paths), errors, the GGUF cache."""

from __future__ import annotations

import json

import pytest
import torch

from clpdecode.backbone import load_backbone
from clpdecode.backbone.loading import _cache_is_complete, cache_dir
from clpdecode.errors import ClpError


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_local_folder_loads_and_matches_generate(request, fixture):
    from clpdecode import generate_text

    path = request.getfixturevalue(fixture)
    bb = load_backbone(str(path), numerics="fp32")
    assert bb.info.hidden_size == 32 and bb.info.num_layers == 2
    res = generate_text(bb, "hello there", max_new_tokens=12)
    ids = torch.tensor([bb.encode_prompt("hello there")])
    ref = bb.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                            pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert res.token_ids == ref


def test_chat_template_and_system(tiny_backbone):
    ids = tiny_backbone.encode_prompt("hi", system="be brief")
    text = tiny_backbone.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief") and text.endswith("<|im_start|>assistant\n")
    assert "system" not in tiny_backbone.tokenizer.decode(tiny_backbone.encode_prompt("hi"))


def test_bad_models(tmp_path, tiny_backbone):
    with pytest.raises(ClpError, match="does not exist"):
        load_backbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClpError, match="config.json"):
        load_backbone(str(tmp_path / "empty"))
    # A model that is not a causal LM.
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vit)
    tiny_backbone.tokenizer.save_pretrained(vit)
    with pytest.raises(ClpError, match="not a causal language model"):
        load_backbone(str(vit))
    with pytest.raises(ClpError):
        load_backbone(str(tmp_path), numerics="fp8")


def test_empty_and_overlong_prompts(tiny_backbone):
    with pytest.raises(ClpError, match="empty"):
        tiny_backbone.encode_prompt("   ")
    with pytest.raises(ClpError, match="context window"):
        tiny_backbone.encode_prompt("x" * 400)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CLP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "clp-decode"


def test_partial_cache_is_detected(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x" * 10)  # not safetensors: its header is not checked
    marker = {"format": 1, "source": "s", "files": {"weights.bin": 10}}
    assert not _cache_is_complete(folder, "s")  # no marker: a conversion that never finished
    (folder / "clp_cache_complete.json").write_text(json.dumps(marker))
    assert _cache_is_complete(folder, "s")
    assert not _cache_is_complete(folder, "other-gguf")
    (folder / "weights.bin").write_bytes(b"x" * 5)  # truncated
    assert not _cache_is_complete(folder, "s")


@pytest.mark.parametrize("numerics", ["fp16", "int8"])
def test_quantised_numerics(tiny_llama_dir, numerics):
    from clpdecode import generate_text

    bb = load_backbone(str(tiny_llama_dir), numerics=numerics)
    assert bb.info.numerics == numerics
    res = generate_text(bb, "abc", max_new_tokens=8)
    assert 1 <= res.new_tokens <= 8
    # Heads stay tied to the fp32 LM head: same fingerprint as the fp32 backbone.
    assert bb.fingerprint == load_backbone(str(tiny_llama_dir), numerics="fp32").fingerprint
    # transformers' generate() runs the same numerics (quantised in place).
    ids = torch.tensor([bb.encode_prompt("abc")])
    ref = bb.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                            pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert res.token_ids == ref


def test_fp16_rows_are_independent_so_verified_equals_ar(tiny_llama_dir):
    from clpdecode import generate_text

    from conftest import random_drafter

    bb = load_backbone(str(tiny_llama_dir), numerics="fp16")
    for seed in range(6):
        drafter = random_drafter(bb, k=3, seed=seed)
        prompt = "xyz"[: 1 + seed % 3] + "q" * seed
        ar = generate_text(bb, prompt, max_new_tokens=30)
        ver = generate_text(bb, prompt, method="verified", drafter=drafter, draft="all", max_new_tokens=30)
        assert ver.token_ids == ar.token_ids
