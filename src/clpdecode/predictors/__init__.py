"""Span predictors: CLP (one linear layer) and the gate-network baseline."""

from .modules import CLP, Gates, PredictorConfig, gate_width

__all__ = ["CLP", "Gates", "PredictorConfig", "gate_width"]
