"""MTP heads (Backbone-as-Architect and the competing ablation) and the drafter bundle."""

from .artifacts import (
                        Drafter,
                        check_drafter,
                        default_drafter,
                        load_drafter,
                        resolve_drafter,
                        save_drafter,
                        shipped_drafter_dir,
)
from .modules import DESIGNS, HeadsConfig, MTPHeads

__all__ = ["MTPHeads", "HeadsConfig", "DESIGNS", "Drafter", "load_drafter", "save_drafter",
           "default_drafter", "check_drafter", "resolve_drafter", "shipped_drafter_dir"]
