"""Backbones: loading (embedded GGUF, Gemma, hub ids, local folders) and the frozen model."""

from .loading import EMBEDDED, GEMMA, cache_dir, resolve_model
from .model import Backbone, BackboneInfo, load_backbone

__all__ = ["Backbone", "BackboneInfo", "load_backbone", "resolve_model", "cache_dir", "EMBEDDED", "GEMMA"]
