"""The decoding loop, the policies plugged into it, and their one settings object."""

from .config import METHODS, PolicyConfig
from .loop import GenerationConfig, GenerationResult, generate
from .policies import Policy, Proposal, make_policy
from .sampling import Sampler, SamplingConfig
from .session import DraftSession

__all__ = ["generate", "GenerationConfig", "GenerationResult", "make_policy", "METHODS", "Policy", "PolicyConfig",
           "Proposal", "Sampler", "SamplingConfig", "DraftSession"]
