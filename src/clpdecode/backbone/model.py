"""The frozen backbone: one forward that returns the post-norm hidden states, an LM head
applied only where logits are needed, and a KV cache that grows by several tokens at once
and rolls back.

Two engines run the trunk: "lean" (fast.py: fused projections, our static KV cache and
copy-free grouped-query attention; Llama/SmolLM2, Qwen2 and Gemma 3, sliding-window layers
included) and "hf" (the transformers module stack with its DynamicCache: the reference, and
the path for every other architecture). Both return the same hidden states to float
tolerance (tests/test_engine.py).
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ClpError
from .cache import StaticKVCache
from .fast import LeanForward, lean_unsupported_reason
from .loading import resolve_model, source_gguf

# Numerics (measured in docs/design.md, "Numerics and speed on CPU" and "q4"):
# fp32: the model as trained. fp16: fp16 weights, fp32 activations (fbgemm); each row of a
# multi-token step is computed independently, so verified decoding stays exactly AR. int8:
# dynamic int8 (fbgemm), but activations are quantised per tensor, so a row's result depends
# on the other rows of the step and verified output can differ from AR's. q4: the trunk's
# projections on 4-bit groups of 32 and the LM head on 8-bit ones (the GGUF's own blocks
# where the model came from one; quant.py), on the project's C++ kernels (kernels.py) with
# fp16 K/V, rows independent. auto (the default): q4 for a backbone that came from a GGUF
# (it then computes on the file's own blocks: nothing is rounded that the file did not
# round) when the C++ kernels build, fp16 otherwise (a model in full precision is not
# silently cut to 4 bits).
NUMERICS = ("auto", "fp32", "fp16", "int8", "q4")
DEFAULT_NUMERICS = "auto"


def resolve_numerics(numerics: str, gguf) -> str:
    """The numerics "auto" stands for with this backbone (others are returned as they are)."""
    if numerics != "auto":
        return numerics
    if gguf is not None:
        from . import kernels

        if kernels.load() is not None:
            return "q4"
    return "fp16"
# "auto": the lean forward where the architecture supports it, else transformers'.
ENGINES = ("auto", "lean", "hf")


@dataclass
class BackboneInfo:
    name: str
    hidden_size: int  # d
    vocab_size: int  # V, rows of the LM head
    num_layers: int
    params: int
    numerics: str
    engine: str = "hf"  # the trunk that runs: "lean" (fast.py) or "hf" (transformers)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Backbone:
    """A causal LM, frozen, split into trunk (-> hidden states) and LM head (-> logits).

    Splitting lets a decode step compute logits only at the positions it reads, and lets
    MTP heads and CLP read the same hidden state the LM head reads.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, numerics: str = "fp32", engine: str = "auto",
                 gguf=None):
        if numerics not in NUMERICS:
            raise ClpError(f"unknown numerics {numerics!r}; choose one of {', '.join(NUMERICS)}")
        numerics = resolve_numerics(numerics, gguf)
        if engine not in ENGINES:
            raise ClpError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        why_not = lean_unsupported_reason(model) if engine != "hf" else None
        if engine == "lean" and why_not:
            raise ClpError(f"the lean engine does not support {name}: {why_not}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.trunk = model.base_model  # embeddings + decoder layers + final norm
        self.lm_head = model.get_output_embeddings()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        # Fingerprint before any quantisation: heads are tied to the fp32 LM head.
        # (V, d) fp32 LM head weight: the frozen projection MTP heads reuse, kept in fp32
        # whatever the backbone's numerics.
        self.lm_head_weight = self.lm_head.weight.detach()
        self.fingerprint = lm_head_fingerprint(self.lm_head_weight)
        self.info = BackboneInfo(
            name=name,
            hidden_size=cfg.hidden_size,
            vocab_size=self.lm_head.weight.shape[0],
            num_layers=cfg.num_hidden_layers,
            params=sum(p.numel() for p in model.parameters()),
            numerics="fp32",
        )
        self.eos_ids = _eos_ids(model, tokenizer)
        self.gguf = gguf  # the GGUF file it was converted from, if any (q4 reads its blocks)
        self.source: str | None = None  # the folder or hub id load_backbone read it from
        self.quant_sources: dict = {}  # q4: how many projections came from the GGUF / were quantised
        self._lean: LeanForward | None = None
        self._use_lean = engine != "hf" and why_not is None
        if numerics != "fp32":
            self.quantize(numerics)  # builds the lean forward from the quantised linears
        elif self._use_lean:
            self._build_lean()

    def _build_lean(self) -> None:
        native = False
        if self.info.numerics == "q4":
            from . import kernels

            native = kernels.load() is not None
        # q4 attends with the C++ kernel over an fp16 cache (half the bytes to read; rows stay
        # independent, since every token's keys are rounded once, when written).
        self._lean = LeanForward(self.model, native=native,
                                 kv_dtype=torch.float16 if native else torch.float32)
        self._lean.prompt_weights()  # now, not in the first request's time to first token (~0.6 s)
        self.info.engine = "lean"

    @property
    def engine(self) -> str:
        return self.info.engine

    # ---- numerics -------------------------------------------------------------------
    def quantize(self, numerics: str) -> None:
        """Quantise in place: "fp16" or "int8" (fbgemm dynamic quantisation of every Linear, LM
        head included), or "q4" (4-bit trunk projections, 8-bit LM head: _quantize_q4).

        On this class of CPU an fp32 forward over 2-5 new tokens costs ~1.5-2x a 1-token
        one (small-M GEMMs run as GEMV per row); see docs/design.md for the measurements.
        """
        if self.info.numerics != "fp32":
            raise ClpError(f"backbone is already {self.info.numerics}")
        if numerics == "q4":
            self._quantize_q4()
            return
        from torch.ao.quantization import quantize_dynamic

        dtype = {"fp16": torch.float16, "int8": torch.qint8}[numerics]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.quantized.engine = "fbgemm"
            # The LM head is usually tied to the input embeddings: give it its own copy
            # first, so that quantising the head leaves the embedding table in fp32.
            old = self.lm_head
            head = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
            head.weight = nn.Parameter(old.weight.detach().clone(), requires_grad=False)
            if old.bias is not None:
                head.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            # In place, inside the transformers model: transformers' own generate() then
            # runs the same numerics, and no fp32 copy of the trunk stays in memory.
            quantize_dynamic(self.trunk, {nn.Linear}, dtype=dtype, inplace=True)
            self.lm_head = quantize_dynamic(nn.Sequential(head), {nn.Linear}, dtype=dtype)[0]
            self.model.set_output_embeddings(self.lm_head)
        self.info.numerics = numerics
        if self._use_lean:
            self._build_lean()  # fused copies of the now quantised projections

    def _quantize_q4(self) -> None:
        """4-bit trunk projections and an 8-bit LM head: the GGUF's own blocks where the model
        came from one (Q4_1/Q4_K and Q8_0), round-to-nearest quantisation of the fp32
        weights otherwise. In place in the transformers model as well (QuantLinear modules),
        so its own forward and generate() run the same weights."""
        from .quant import GGUFWeights, Int8Weight, QuantLinear, quantize_q4

        gguf = GGUFWeights(self.gguf, self.config) if self.gguf else None
        self.quant_sources = quantize_q4(self.trunk, gguf)
        head = gguf.lm_head() if gguf is not None else None
        if head is not None and head.shape != tuple(self.lm_head_weight.shape):
            head = None
        self.quant_sources["lm_head"] = "gguf" if head is not None else "quantised"
        # A fresh module: the tied input embeddings stay fp32.
        self.lm_head = QuantLinear(head if head is not None else Int8Weight.from_float(self.lm_head_weight))
        self.model.set_output_embeddings(self.lm_head)
        self.info.numerics = "q4"
        if self._use_lean:
            self._build_lean()

    def fp32_model(self, device) -> nn.Module:
        """The transformers model in fp32 on `device`, frozen: this one where it is fp32 and
        the device is the CPU, else a copy (reloaded from `source` when this one is quantised).
        Training runs it batched on a GPU for the drafter's targets (training/drafter.py)."""
        device = torch.device(device)
        if self.info.numerics == "fp32":
            model = self.model if device.type == "cpu" else copy.deepcopy(self.model)
        elif self.source is None:
            raise ClpError(f"{self.name} is {self.info.numerics} and was not loaded from a folder or hub id: "
                           "no fp32 copy to make")
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.source, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(device).eval()

    # ---- the forward ----------------------------------------------------------------
    def new_cache(self, capacity: int | None = None, engine: str | None = None):
        """An empty KV cache for forward(): static (lean engine) or transformers' DynamicCache.

        capacity: optional hint, the positions it will hold (prompt + new tokens + draft
        room); the static cache grows by chunks beyond it anyway.
        engine: "hf" gives a DynamicCache even when the lean engine runs, so forward() on it
        runs the transformers reference (forward() follows the cache's kind).
        """
        if self._lean is not None and engine != "hf":
            return self._lean.new_cache(capacity=capacity or 0)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        # Sliding-window layers (Gemma 3) drop what falls out of the window at every update,
        # so a rollback past it would be impossible: record the past; rollback() trims it.
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()
        return cache

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, aux_layers: tuple[int, ...] = (), prompt: bool = False):
        """Run the trunk over new tokens, extending the cache.

        Args:
            input_ids: (B, T) new token ids, appended after what the cache already holds.
            cache: a cache from new_cache(); grows by T positions.
            mask, positions: lean engine only (e.g. a draft tree): a bool (T, L + T) mask,
                True where a new token may attend, and the (T,) rotary positions of the
                new tokens. Default: causal, positions L .. L + T - 1.
            aux_layers: also return the inputs of these decoder layers (the residual stream
                before each; EAGLE-3 drafters read three of them), concatenated.
            prompt: the tokens are (part of) a prompt: on an AMX-BF16 machine they run on
                bf16 tiles (LeanForward.prompt_weights), as every prompt does there.
        Returns:
            (B, T, d) post-norm hidden states, the input of the LM head; with aux_layers, a
            pair (hidden, (B, T, len(aux_layers) * d)).
        """
        if isinstance(cache, StaticKVCache):
            return self._lean.forward(input_ids, cache, mask=mask, positions=positions, aux_layers=aux_layers,
                                      prompt=prompt)
        if mask is not None or positions is not None:
            raise ClpError("custom attention masks and positions need the lean engine (Llama/Qwen2/Gemma 3)")
        out = self.trunk(input_ids=input_ids, cache=cache, use_cache=True, output_hidden_states=bool(aux_layers))
        if aux_layers:  # hidden_states[i] is the input of layer i (i = num_layers: the last output, unnormed)
            return out.last_hidden_state, torch.cat([out.hidden_states[i] for i in aux_layers], -1)
        return out.last_hidden_state

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) hidden states -> (..., V) fp32 logits."""
        # fbgemm's dynamic Linear (and our q8 head) want a 2-D input.
        logits = self.lm_head(hidden.reshape(-1, hidden.shape[-1])).float().reshape(*hidden.shape[:-1], -1)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    @staticmethod
    def rollback(cache, n: int) -> None:
        """Drop the last n positions from the cache (rejected draft tokens)."""
        if isinstance(cache, StaticKVCache):
            if n > 0:
                cache.rollback(n)  # moves the length back, no copy
        else:
            cache.crop(-n)  # crop(0) still trims sliding-window layers back to their window

    @staticmethod
    def keep(cache, fed: int, offsets: list[int]) -> None:
        """After a step that fed `fed` tokens, keep only those at `offsets` (ascending; a
        draft tree's accepted path), compacted into place. A prefix is a plain rollback."""
        if offsets == list(range(len(offsets))):
            Backbone.rollback(cache, fed - len(offsets))
        elif isinstance(cache, StaticKVCache):
            cache.keep(cache.length - fed, offsets)
        else:
            raise ClpError("draft trees need the lean engine's static cache")

    @property
    def supports_trees(self) -> bool:
        """Whether forward() takes a tree mask and positions (the lean engine)."""
        return self._lean is not None

    # ---- many sequences in one step (continuous batching) ------------------------------------
    @property
    def batches_rows(self) -> bool:
        """Whether forward_rows() runs: rows of many sequences in one forward, each row's result
        independent of the others (the q4 kernels' whole-step path). Elsewhere a scheduler runs
        each sequence's forward on its own cache."""
        return self._lean is not None and self._lean.batches_rows

    def new_slot_cache(self, slots: int, capacity: int):
        """A SlotKVCache for forward_rows(): `slots` sequences of up to `capacity` positions."""
        return self._lean.new_slot_cache(slots, capacity)

    def forward_rows(self, cache, steps: list, aux_layers: tuple[int, ...] = (),
                     prompts_from: int | None = None) -> list:
        """One forward over several sequences' new tokens (LeanForward.forward_rows)."""
        return self._lean.forward_rows(cache, steps, aux_layers, prompts_from)

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., d) input embeddings (scaled as the model scales them)."""
        return self.model.get_input_embeddings()(ids)

    # ---- text -----------------------------------------------------------------------
    @property
    def has_chat(self) -> bool:
        """Whether the tokenizer has a chat template (instruct models; a base model has no turns)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_prompt(self, prompt: str, system: str | None = None, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt: through the chat template for instruct models.

        One user message with add_generation_prompt=True; a system message only when
        `system` is given (a template may still add its own default, as SmolLM2's does).
        """
        if not prompt or not prompt.strip():
            raise ClpError("the prompt is empty")
        use_chat = chat if chat is not None else self.has_chat
        if use_chat:
            return self.encode_chat(([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ])
        return self._check_prompt_length(self.tokenizer(((system + "\n\n") if system else "") + prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ({"role", "content"} messages) through the chat template,
        ready for the assistant's next turn (add_generation_prompt=True)."""
        if not self.has_chat:
            raise ClpError(f"{self.name} has no chat template: a conversation needs one")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001 - a template's own refusal (jinja raise_exception)
            raise ClpError(f"the chat template refused these messages: {e}") from None
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return self._check_prompt_length(list(ids))

    def _check_prompt_length(self, ids: list[int]) -> list[int]:
        if self.max_positions and len(ids) >= self.max_positions:
            raise ClpError(
                f"the prompt is {len(ids)} tokens; the model's context window is {self.max_positions}"
            )
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def lm_head_fingerprint(weight: torch.Tensor) -> str:
    """A short hash of the LM head: heads trained on one backbone refuse another."""
    w = weight.detach().float().cpu()
    # Hash a strided sample plus the shape: cheap on a 49k x 576 matrix, and any other
    # backbone (or a different quantisation of this one) differs in it.
    sample = w.flatten()[:: max(1, w.numel() // 65536)].numpy().round(4)
    h = hashlib.sha256(str(tuple(w.shape)).encode() + sample.tobytes()).hexdigest()
    return h[:16]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids


def load_backbone(name: str = "embedded", numerics: str = DEFAULT_NUMERICS, progress: bool = True,
                  engine: str = "auto") -> Backbone:
    """Load a frozen backbone by name ("embedded", "gemma3-270m"), hub id or local directory.

    numerics: "auto" (q4 for a backbone from a GGUF, fp16 otherwise; see NUMERICS), "fp32",
    "fp16", "int8" or "q4". engine: "auto" (the lean forward for Llama/Qwen2/Gemma 3,
    transformers' otherwise), "lean" or "hf".
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if numerics not in NUMERICS:
        raise ClpError(f"unknown numerics {numerics!r}; choose one of {', '.join(NUMERICS)}")
    if engine not in ENGINES:
        raise ClpError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    display, path = resolve_model(name, progress=progress)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ClpError(f"cannot load a tokenizer for {name!r}: {str(e).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "Unrecognized configuration class" in msg or "not supported" in msg:
            raise ClpError(f"{name!r} is not a causal language model ({msg[:160]})") from None
        raise ClpError(f"cannot load {name!r}: {msg[:200]}") from None
    except OSError as e:
        raise ClpError(f"cannot load model {name!r}: {str(e).splitlines()[0][:200]}") from None
    backbone = Backbone(model, tokenizer, display, numerics=numerics, engine=engine, gguf=source_gguf(name))
    backbone.source = path
    return backbone
