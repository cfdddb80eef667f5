"""Drafter bundles: round trip, backbone mismatch, corrupt files, parameter counts."""

from __future__ import annotations

import pytest
import torch

from clpdecode.errors import ClpError
from clpdecode.heads import load_drafter, save_drafter
from clpdecode.predictors import CLP, Gates, PredictorConfig

from conftest import random_drafter, save_tiny_model


def test_round_trip(tmp_path, tiny_backbone):
    d = random_drafter(tiny_backbone, k=3)
    save_drafter(d, tmp_path / "h", tiny_backbone)
    back = load_drafter(tmp_path / "h", tiny_backbone)
    assert back.k == 3 and back.clp is not None and back.gates is not None and back.competing is not None
    h = torch.randn(4, 32)
    emb = torch.randn(4, 32)
    # Saved in fp16: equal to fp16 precision.
    assert torch.allclose(back.heads(h, emb), d.heads(h, emb), atol=0.05, rtol=0.01)
    assert back.sizes()["clp"]["params"] == 32 * 4 + 4


def test_wrong_backbone_is_refused(tmp_path, tiny_backbone):
    from clpdecode.backbone import load_backbone

    save_drafter(random_drafter(tiny_backbone), tmp_path / "h", tiny_backbone)
    other = load_backbone(str(save_tiny_model(tmp_path / "other", "llama", seed=9)), numerics="fp32")
    with pytest.raises(ClpError, match="trained for backbone"):
        load_drafter(tmp_path / "h", other)


def test_missing_and_corrupt(tmp_path, tiny_backbone):
    with pytest.raises(ClpError, match="not a heads folder"):
        load_drafter(tmp_path, tiny_backbone)
    save_drafter(random_drafter(tiny_backbone), tmp_path / "h", tiny_backbone)
    (tmp_path / "h" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ClpError, match="cannot read"):
        load_drafter(tmp_path / "h", tiny_backbone)


def test_parameter_counts():
    # CLP: d x (k+1) + (k+1); the paper's 4.6K-7.7K at d = 1536, k = 2..4 (bias aside).
    assert CLP(PredictorConfig(k=2, hidden_size=1536)).num_params == 1536 * 3 + 3
    assert CLP(PredictorConfig(k=4, hidden_size=1536)).num_params == 1536 * 5 + 5
    for k in (2, 4):
        n = Gates(PredictorConfig(k=k, hidden_size=1536)).num_params
        assert 0.95e6 < n < 1.05e6
        assert n == Gates.params_at(1536, k)
