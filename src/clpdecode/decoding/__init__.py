"""The decoding loop and the policies plugged into it."""

from .loop import GenerationConfig, GenerationResult, generate
from .policies import METHODS, Policy, Proposal, make_policy
from .sampling import Sampler, SamplingConfig

__all__ = ["generate", "GenerationConfig", "GenerationResult", "make_policy", "METHODS", "Policy",
           "Proposal", "Sampler", "SamplingConfig"]
