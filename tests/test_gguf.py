"""backbone/gguf.py, the one GGUF reader: names, header, q/k row order, and the two users of its
blocks (q4's GGUFWeights, scripts/device_pack.py) against gguf-py and transformers' GGUF loader,
on a small Llama file written here."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from clpdecode.backbone.gguf import GGUFFile, gguf_context_length, hf_name, layer_tensor
from clpdecode.backbone.quant import GGUFWeights

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

HEADS, KV_HEADS, D, FF, VOCAB = 4, 2, 64, 128, 16
# GGUF name -> (rows, cols, type) of a one-layer Llama: q/k of different head counts, every
# type the embedded file uses (Q4_1, Q8_0, F32).
TENSORS = {"token_embd.weight": (VOCAB, D, "Q8_0"), "output_norm.weight": (D, None, "F32"),
           "blk.0.attn_norm.weight": (D, None, "F32"), "blk.0.ffn_norm.weight": (D, None, "F32"),
           "blk.0.attn_q.weight": (D, D, "Q4_1"), "blk.0.attn_k.weight": (D // 2, D, "Q4_1"),
           "blk.0.attn_v.weight": (D // 2, D, "Q8_0"), "blk.0.attn_output.weight": (D, D, "Q4_1"),
           "blk.0.ffn_gate.weight": (FF, D, "Q4_1"), "blk.0.ffn_up.weight": (FF, D, "Q4_1"),
           "blk.0.ffn_down.weight": (D, FF, "Q4_1")}


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    """(path, the fp32 weights each tensor's blocks stand for, in the file's row order)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(321)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    stored = {}
    for name, (rows, cols, kind) in TENSORS.items():
        if kind == "F32":
            x = rng.standard_normal(rows).astype(np.float32)
            w.add_tensor(name, x)
            stored[name] = x
        else:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            raw = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            stored[name] = quants.dequantize(raw, qtype).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, stored


def transformers_order(name: str, weight: np.ndarray) -> np.ndarray:
    """The weight as transformers' GGUF loader hands it to the model (its q/k unpermute)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    return proc.process(weight, name).weights


def test_names_map_every_tensor_of_a_llama_file(llama_gguf):
    names = {hf_name(n) for n in TENSORS}
    assert names == {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                     "model.layers.0.post_attention_layernorm.weight"} | {
        f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert hf_name("output.weight") == "lm_head.weight"
    assert layer_tensor(3, "mlp.down_proj") == "blk.3.ffn_down.weight"
    with pytest.raises(ValueError, match="no Hugging Face name"):
        hf_name("blk.0.attn_sinks.weight")


def test_header_gives_the_context_length(llama_gguf, tmp_path):
    assert gguf_context_length(llama_gguf[0]) == 321
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 5)
    assert gguf_context_length(tmp_path / "bad.gguf") is None


def test_q4_weights_are_the_files_blocks_in_transformers_order(llama_gguf):
    path, stored = llama_gguf
    weights = GGUFWeights(path, types.SimpleNamespace(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
        name = layer_tensor(0, module)
        ref = torch.from_numpy(transformers_order(name, stored[name]))
        assert torch.equal(weights.get(0, module).dequantize(), ref), module
    assert torch.equal(weights.lm_head().dequantize(), torch.from_numpy(stored["token_embd.weight"]))
    # q/k rows really move: a file that is not "llama" keeps them as stored.
    q = stored["blk.0.attn_q.weight"]
    assert not np.array_equal(transformers_order("blk.0.attn_q.weight", q), q)
    f = GGUFFile(path, HEADS, KV_HEADS)
    f.arch = "qwen2"
    assert np.array_equal(f.read("blk.0.attn_q.weight")[2], np.asarray(f.tensors["blk.0.attn_q.weight"].data))


def test_device_pack_round_trip_equals_transformers_loader(llama_gguf, tmp_path):
    """scripts/device_pack.py packs the blocks here and dequantises them on the device: what
    transformers' GGUF loader computes from the same file, bit for bit."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import device_pack
    finally:
        sys.path.pop(0)
    path, stored = llama_gguf
    folders = device_pack.pack_weights(path, {"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS},
                                       tmp_path, parts=2)
    assert len(folders) == 2
    state = device_pack.load_packed(folders)
    assert set(state) == {hf_name(n) for n in TENSORS}
    for name in TENSORS:
        ref = torch.from_numpy(transformers_order(name, stored[name]))
        assert state[hf_name(name)].dtype == torch.float32 and torch.equal(state[hf_name(name)], ref), name
