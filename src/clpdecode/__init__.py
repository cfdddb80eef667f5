"""clp-decode: faster decoding with multi-token prediction, Backbone-as-Architect and CLP.

The Python API in three calls::

    import clpdecode as clp
    bb = clp.load_backbone("embedded")                 # SmolLM2-135M-Instruct, offline (q4)
    drafter = clp.default_drafter(bb)                  # shipped heads (largest k) + CLP + gates
    res = clp.generate_text(bb, "Name three rivers.", method="clp", drafter=drafter)
    print(res.text, res.tokens_per_forward)
"""

from __future__ import annotations

from typing import Callable

from .backbone import Backbone, load_backbone
from .decoding import METHODS, GenerationConfig, GenerationResult, PolicyConfig, SamplingConfig, generate, make_policy
from .errors import ClpError
from .heads import Drafter, default_drafter, load_drafter, save_drafter

__version__ = "0.1.0"


def generate_text(
    backbone: Backbone,
    prompt: str,
    method: str | PolicyConfig = "ar",
    drafter: Drafter | None = None,
    *,
    max_new_tokens: int = 128,
    system: str | None = None,
    stop: tuple[str, ...] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    raw: bool = False,
    on_tokens: Callable[[list[int], bool], None] | None = None,
    **policy_settings,
) -> GenerationResult:
    """Encode `prompt` (chat template for instruct models; plain text with `raw`, as base
    models need) and decode it with `method`: a method name with PolicyConfig's fields as
    keywords (``clp_threshold=0.3``, ``draft="all"``, ...), or a PolicyConfig."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop=tuple(stop),
                           sampling=SamplingConfig(temperature=temperature, top_p=top_p, seed=seed))
    policy = make_policy(method, backbone, drafter, **policy_settings)
    prompt_ids = backbone.encode_prompt(prompt, system=system, chat=False if raw else None)
    return generate(backbone, prompt_ids, policy, cfg, on_tokens=on_tokens)


__all__ = ["load_backbone", "Backbone", "default_drafter", "load_drafter", "save_drafter", "Drafter",
           "generate", "generate_text", "make_policy", "GenerationConfig", "GenerationResult", "PolicyConfig",
           "SamplingConfig", "METHODS", "ClpError"]
