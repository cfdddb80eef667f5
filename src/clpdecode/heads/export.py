"""`clp export --format eagle3`: the EAGLE-3 drafter as the checkpoint serving engines load.

The layout is SpecForge's ``LlamaForCausalLMEagle3`` (what vLLM and SGLang serve as an EAGLE-3
draft, and what llama.cpp's ``convert_hf_to_gguf.py --target-model-dir`` converts for
``llama-server --spec-type draft-eagle3``): a config.json and one model.safetensors with

    fc.weight                                   (d, 3 d_target)  the fusion of the three layers
    midlayer.input_layernorm.weight             (d,)             on the token embedding
    midlayer.hidden_norm.weight                 (d,)             on the fused state
    midlayer.self_attn.{q,k,v}_proj.weight      (.., 2d)         reading [embedding ; state]
    midlayer.self_attn.o_proj.weight
    midlayer.post_attention_layernorm.weight
    midlayer.mlp.{gate,up,down}_proj.weight
    norm.weight, lm_head.weight                 (Vd, d)          the draft vocabulary's head
    d2t (Vd,) int64                             target id = draft id + d2t[draft id]
    t2d (V,) bool                               whether a target token is in the draft vocabulary

Our drafter is that model exactly (heads/eagle3.py); the token embedding is the target's own
(not stored: every engine takes it from the target model). Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_folder
from ..errors import ClpError
from .eagle3 import Eagle3Drafter

FORMATS = ("eagle3",)


def eagle3_state(drafter: Eagle3Drafter, dtype: torch.dtype = torch.float16) -> dict:
    """The tensors of the checkpoint, by their SpecForge names."""
    m = drafter
    names = {
        "fc.weight": m.fc.weight,
        "midlayer.input_layernorm.weight": m.input_layernorm.weight,
        "midlayer.hidden_norm.weight": m.hidden_norm.weight,
        "midlayer.self_attn.q_proj.weight": m.q_proj.weight,
        "midlayer.self_attn.k_proj.weight": m.k_proj.weight,
        "midlayer.self_attn.v_proj.weight": m.v_proj.weight,
        "midlayer.self_attn.o_proj.weight": m.o_proj.weight,
        "midlayer.post_attention_layernorm.weight": m.post_attention_layernorm.weight,
        "midlayer.mlp.gate_proj.weight": m.gate_proj.weight,
        "midlayer.mlp.up_proj.weight": m.up_proj.weight,
        "midlayer.mlp.down_proj.weight": m.down_proj.weight,
        "norm.weight": m.norm.weight,
        "lm_head.weight": m.lm_head.weight,
    }
    out = {k: v.detach().cpu().to(dtype).contiguous() for k, v in names.items()}
    ids = m.draft_ids.cpu().long()
    out["d2t"] = (ids - torch.arange(len(ids))).contiguous()
    t2d = torch.zeros(m.cfg.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    out["t2d"] = t2d
    return out


def eagle3_config(drafter: Eagle3Drafter, dtype: str = "float16") -> dict:
    c = drafter.cfg
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": int(drafter.draft_ids.numel()),
        "target_hidden_size": c.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(c.aux_layers),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.aux_layers), "use_aux_hidden_state": True,
                         "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True},
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "attention_bias": False,
        "mlp_bias": False,
    }


def export_eagle3(drafter, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `drafter` (a Drafter or an Eagle3Drafter) as an EAGLE-3 checkpoint folder."""
    from safetensors.torch import save_file

    heads = getattr(drafter, "heads", drafter)
    if not isinstance(heads, Eagle3Drafter):
        design = getattr(getattr(heads, "cfg", None), "design", type(heads).__name__)
        raise ClpError(f"only an EAGLE-3 drafter exports as an EAGLE-3 checkpoint; these heads are {design!r} "
                       "(train one with `clp train --design eagle3`)")
    out = Path(out)
    tensors = eagle3_state(heads, dtype)
    config = eagle3_config(heads, {torch.float16: "float16", torch.bfloat16: "bfloat16",
                                   torch.float32: "float32"}[dtype])
    with atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
    return out
