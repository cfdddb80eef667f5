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


def test_two_turn_sets_load_as_pairs_with_the_same_checks():
    from clpdecode.evaluation.prompts import load_turn_pairs

    pairs = load_turn_pairs("mtbench-2")
    assert len(pairs) == 80 and [a for a, _ in pairs] == load_prompts("mtbench")
    assert all(isinstance(b, str) and b.strip() for _, b in pairs)
    assert load_turn_pairs("mtbench-2", limit=3) == pairs[:3]
    with pytest.raises(ClpError, match="--limit must be at least 1"):
        load_turn_pairs("mtbench-2", limit=0)
    with pytest.raises(ClpError, match="not a two-turn set"):
        load_turn_pairs("mtbench")
    with pytest.raises(ClpError, match="load_turn_pairs"):
        load_prompts("mtbench-2")


def test_sharegpt_truncated_file_is_read_record_by_record():
    prompts = sharegpt()
    assert len(prompts) > 10_000 and all(p.strip() for p in prompts[:100])


def test_passages_are_held_out_plain_text_openings():
    from clpdecode.datasets import PASSAGE_MAX, PASSAGE_MIN, passage_opening, passages, sharegpt_split

    held = passages("heldout", limit=20)
    assert [p for _, p in held] == load_prompts("passages", limit=20)  # deterministic, one source
    rule = sharegpt_split("records")  # the held-out rule of passages: one source with training
    assert all(rule.of_record(i) == "heldout" and PASSAGE_MIN <= len(p) <= PASSAGE_MAX for i, p in held)
    assert all(rule.of_record(i) == "train" for i, _ in passages("train", limit=20))
    assert passage_opening("word " * 200) is not None and passage_opening("short.") is None
    assert passage_opening("```python\n" + "a = 1\n" * 100) is None
    # The opening ends at a sentence end, not at a list number's "1.".
    assert passage_opening("Steps: 1." + " word" * 60 + ". More text follows here.").endswith("word.")
    with pytest.raises(ClpError):
        passages("nope")


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


def test_user_file_errors_name_file_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n\n{"text": "b"}\n')
    with pytest.raises(ClpError, match=r"p.jsonl:4: no string field"):
        load_prompts(str(f))
    f.write_text('{"prompt": "a"}\n\n{oops\n')
    with pytest.raises(ClpError, match=r"p.jsonl:3: not valid JSON"):
        load_prompts(str(f))
    f.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ClpError, match=r"p.jsonl:3: not valid UTF-8 \(byte 0xe9\)"):
        load_prompts(str(f))
    f.write_text('{"prompt": "a"}\n{"prompt": "\\ud800"}\n')  # valid JSON, not encodable text
    with pytest.raises(ClpError, match=r"p.jsonl:2: the prompt is not valid UTF-8"):
        load_prompts(str(f))
    f.write_text('{"prompt": "a"}\n{"prompt": "  "}\n')
    with pytest.raises(ClpError, match=r"p.jsonl:2: the prompt is empty"):
        load_prompts(str(f))


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_refused(tmp_path, limit):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ClpError, match="--limit must be at least 1"):
        load_prompts(str(f), limit=limit)
    assert load_prompts(str(f), limit=1) == ["a"]
