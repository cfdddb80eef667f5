"""End to end on the embedded SmolLM2-135M-Instruct backbone and the shipped heads."""

from __future__ import annotations

import json

import pytest
import torch

import clpdecode as clp
from clpdecode.cli import main
from clpdecode.evaluation.prompts import mtbench
from clpdecode.heads import shipped_drafter_dir

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def embedded():
    return clp.load_backbone("embedded", numerics="fp32")


def test_ar_matches_transformers_generate(embedded):
    for prompt in ["What is the capital of France?", mtbench()[0]]:
        res = clp.generate_text(embedded, prompt, max_new_tokens=24)
        ids = torch.tensor([embedded.encode_prompt(prompt)])
        ref = embedded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=24)[0, ids.shape[1]:].tolist()
        assert res.token_ids == ref


@pytest.mark.parametrize("k", [2, 4])
def test_shipped_heads_load_and_verified_equals_ar(embedded, k):
    assert shipped_drafter_dir(embedded.name, k) is not None
    drafter = clp.default_drafter(embedded, k=k)
    assert drafter.k == k and drafter.clp is not None and drafter.gates is not None
    assert drafter.clp.num_params == embedded.info.hidden_size * (k + 1) + (k + 1)
    total_forwards = total_tokens = 0
    for prompt in mtbench()[:2]:
        ar = clp.generate_text(embedded, prompt, max_new_tokens=32)
        ver = clp.generate_text(embedded, prompt, method="verified", drafter=drafter, max_new_tokens=32)
        assert ver.token_ids == ar.token_ids
        res = clp.generate_text(embedded, prompt, method="clp", drafter=drafter, max_new_tokens=32)
        total_forwards += res.forward_passes
        total_tokens += res.new_tokens
    assert total_tokens / total_forwards > 1.0


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backbone"]["hidden_size"] == 576 and info["backbone"]["vocab_size"] == 49152
    assert info["heads"]["k"] == 4 and info["clp"]["params"] == 576 * 5 + 5
    assert info["gate"]["params"] > 100 * info["clp"]["params"]
