"""Prompt sets from their PyPI packages, and user files."""

from __future__ import annotations

import pytest

from clpdecode.errors import ClpError
from clpdecode.evaluation.prompts import load_prompts, sharegpt


def test_packaged_sets():
    assert len(load_prompts("mtbench")) == 80
    assert len(load_prompts("gsm8k")) == 100
    assert len(load_prompts("humaneval")) == 164
    assert len(load_prompts("mtbench", limit=5)) == 5


def test_sharegpt_truncated_file_is_read_record_by_record():
    prompts = sharegpt()
    assert len(prompts) > 10_000 and all(p.strip() for p in prompts[:100])


def test_user_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert load_prompts(str(f)) == ["a", "b"]
    f.write_text('{"text": "a"}\n')
    with pytest.raises(ClpError, match="prompt"):
        load_prompts(str(f))
    f.write_text("{not json\n")
    with pytest.raises(ClpError, match="not valid JSON"):
        load_prompts(str(f))
    with pytest.raises(ClpError, match="unknown prompt set"):
        load_prompts("nope")
