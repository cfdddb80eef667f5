"""Tiny randomly initialised backbones (Llama and Qwen2) with a character tokenizer.

Most tests run on these: a forward takes about a millisecond, so property tests can
afford hundreds of generations.
"""

from __future__ import annotations

import string

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _threads_as_they_were():
    """A command run in-process (`main([...])`) may start the --threads auto governor and
    change torch's thread count: neither outlives the test."""
    from clpdecode.backbone import threads

    before = torch.get_num_threads()
    yield
    threads.set_threads(None)
    torch.set_num_threads(before)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.printable)
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", additional_special_tokens=specials[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 32, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256,
                  eos_token_id=2, pad_token_id=0, bos_token_id=1, tie_word_embeddings=True)
    if arch == "gemma3":  # sliding-window layers (window 8), Gemma's norms and tanh-GELU
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, head_dim=hidden_size // heads, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"])
    return LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)


def save_tiny_model(path, arch: str = "llama", seed: int = 0, scale: float = 8.0, **sizes):
    """sizes: hidden_size, heads, kv_heads (default 32, 4, 2: head_dim 8). scale multiplies the
    initial weight matrices (8: peaked, varied distributions)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), **sizes))
    # Larger-than-default weights give peaked, varied distributions (and some EOS).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3", seed=3)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_llama_dir):
    from clpdecode.backbone import load_backbone

    return load_backbone(str(tiny_llama_dir), numerics="fp32")


def random_drafter(backbone, k: int = 2, design: str = "fused", seed: int = 0, scale: float = 0.5):
    """Heads, CLP, gates and competing heads with random (non-zero) weights."""
    from clpdecode.heads import Drafter, HeadsConfig, MTPHeads
    from clpdecode.predictors import CLP, Gates, PredictorConfig

    g = torch.Generator().manual_seed(seed)
    d = backbone.info.hidden_size

    def randomise(mod):
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        return mod

    if design == "eagle3":
        from clpdecode.heads.eagle3 import Eagle3Config, Eagle3Drafter

        cfg = Eagle3Config.from_backbone_config(backbone.config, k=k, draft_vocab=0,
                                                aux_layers=(0, 1, backbone.info.num_layers - 1))
        heads = randomise(Eagle3Drafter(cfg))
    elif design in ("chained", "chained-mlp"):
        from clpdecode.heads.chained import ChainConfig, ChainedHeads

        cfg = ChainConfig.from_backbone_config(backbone.config, k=k, draft_vocab=0,
                                               attention=design == "chained")
        heads = randomise(ChainedHeads(cfg))
    else:
        heads = randomise(MTPHeads(HeadsConfig(k=k, hidden_size=d, design=design, draft_vocab=0)))
    competing = randomise(MTPHeads(HeadsConfig(k=k + 1, hidden_size=d, design="residual", offset=1,
                                               draft_vocab=0)))
    pc = PredictorConfig(k=k, hidden_size=d)
    drafter = Drafter(heads=heads, clp=randomise(CLP(pc)), gates=randomise(Gates(pc)), competing=competing,
                      meta={"backbone": {"name": backbone.name, "hidden_size": d,
                                         "vocab_size": backbone.info.vocab_size,
                                         "lm_head_fingerprint": backbone.fingerprint}})
    return drafter.attach(backbone)
