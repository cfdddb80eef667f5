"""`clp bench --sweep` (evaluation/sweep.py): parsing and refusals, the curves' readings on
synthetic points, and one short sweep end to end on the tiny model."""

from __future__ import annotations

import json

import pytest

from clpdecode.errors import ClpError
from clpdecode.evaluation.sweep import (
    matched_quality,
    pareto,
    parse_sweep,
    quality_at_speed,
    speed_at_quality,
    variants,
)

from conftest import random_drafter


def test_parse_sweep_and_its_points():
    sweep = parse_sweep("clp-threshold=0.1,0.5 naive-k=1,2,2")
    assert sweep == {"clp-threshold": [0.1, 0.5], "naive-k": [1, 2]}
    from clpdecode.decoding import PolicyConfig

    v = variants(sweep, PolicyConfig(draft="all"))
    assert list(v) == ["ar", "verified", "clp@0.1", "clp@0.5", "naive@k1", "naive@k2"]
    assert v["clp@0.5"].clp_threshold == 0.5 and v["naive@k2"].max_drafts == 2 and v["verified"].draft == "all"


@pytest.mark.parametrize("text, message", [
    ("speed=1", "unknown key 'speed'"), ("clp-threshold=", "has no values"), ("clp-threshold", "has no values"),
    ("clp-threshold=0.2,1.5", "clp_threshold must be a number in [0, 1]"), ("gate-threshold=-0.1", "gate_threshold"),
    ("naive-k=0", "at least 1"), ("naive-k=two", "takes numbers"), ("clp-threshold=0.1 clp-threshold=0.2", "twice"),
    ("", "--sweep is empty"),
])
def test_parse_sweep_refusals(text, message):
    with pytest.raises(ClpError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_sweep(text)


def test_bench_refuses_a_bad_sweep_in_one_line_before_the_load(capsys, monkeypatch, tiny_llama_dir, tmp_path):
    import clpdecode.backbone as backbone_mod
    from clpdecode.cli import main

    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: pytest.fail("loaded before the check"))
    for extra, message in [(["--sweep", "bogus=1"], "unknown key"), (["--sweep", "clp-threshold=2"], "[0, 1]"),
                           (["--sweep", "naive-k=1", "--methods", "ar"], "drop --methods")]:
        code = main(["bench", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "b"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("clp: error:") and message in err and err.count("\n") == 1


def test_readings_on_synthetic_curves():
    pts = [{"label": "x@0.9", "speedup": 1.0, "nll": 1.00, "rep4": 0.1},
           {"label": "x@0.5", "speedup": 1.4, "nll": 1.10, "rep4": 0.2},
           {"label": "x@0.1", "speedup": 2.0, "nll": 1.50, "rep4": 0.5}]
    # NLL bound 1.05 lies halfway between the first two points: speedup 1.2 there.
    assert speed_at_quality(pts, 1.05) == pytest.approx(1.2)
    assert speed_at_quality(pts, 2.0) == 2.0 and speed_at_quality(pts, 0.5) is None
    assert quality_at_speed(pts, 1.7) == pytest.approx(1.3) and quality_at_speed(pts, 2.5) is None
    assert quality_at_speed(pts, 0.9) == 1.00
    worse = {"label": "y@0.5", "speedup": 1.3, "nll": 1.2, "rep4": 0.1}
    assert [p["label"] for p in pareto(pts + [worse])] == ["x@0.9", "x@0.5", "x@0.1"]
    # on rep4, y (as clean as x@0.9, and faster) pushes x@0.9 off the front
    assert [p["label"] for p in pareto(pts + [worse], "rep4")] == ["y@0.5", "x@0.5", "x@0.1"]
    methods = {"ar": {"nll": 1.0, "speedup": 1.0, "rep4": 0.1}, "verified": {"nll": 1.0, "speedup": 1.1, "rep4": 0.1},
               **{p["label"]: p for p in pts}}
    m = matched_quality(methods)
    assert m["x"]["speedup_at_nll_5pct"] == pytest.approx(1.2) and m["x"]["speedup_at_nll_20pct"] == pytest.approx(1.55)
    # 1.3x lies three quarters of the way from 1.0 to 1.4: rep4 0.1 + 0.75 * 0.1
    assert m["x"]["rep4_at_1.3x"] == pytest.approx(0.175) and m["x"]["rep4_at_1.6x"] == pytest.approx(0.3)
    assert m["x"]["nll_at_1.3x"] == pytest.approx(1.075) and m["verified"] == {"speedup": 1.1, "nll": 1.0}


def test_a_short_sweep_end_to_end(capsys, tiny_backbone, tiny_llama_dir, tmp_path):
    from clpdecode.cli import main
    from clpdecode.heads import save_drafter

    save_drafter(random_drafter(tiny_backbone, k=2), tmp_path / "h", tiny_backbone)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    out = tmp_path / "sweep"
    code = main(["bench", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--out", str(out), "--sweep", "clp-threshold=0.2,0.8", "naive-k=1,2"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["ar", "verified", "clp@0.2", "clp@0.8", "naive@k1", "naive@k2"]
    assert res["methods"]["verified"]["agreement_exact"] == 1.0
    assert set(res["matched_quality"]) == {"clp", "naive", "verified"}
    assert 0 < res["methods"]["naive@k1"]["distinct2"] <= 1
    assert (out / "sweep.png").is_file() and "Matched quality" in (out / "report.md").read_text()
    assert res["settings"]["sweep"] == "clp-threshold=0.2,0.8 naive-k=1,2"
