"""Bad inputs and interruptions: clear one-line errors (exit 2), nothing measured is lost."""

from __future__ import annotations

import json

import pytest

from clpdecode.cli import main
from clpdecode.heads import save_drafter

from conftest import random_drafter


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello"}\n{"prompt": "what is up"}\n{"prompt": "third one"}\n')
    return f


@pytest.fixture
def heads_dir(tmp_path, tiny_backbone):
    save_drafter(random_drafter(tiny_backbone, k=2), tmp_path / "h", tiny_backbone)
    return tmp_path / "h"


def bench_argv(model, heads, prompts, out, *extra):
    return ["bench", "--model", str(model), "--heads", str(heads), "--prompts", str(prompts), "--methods",
            "ar,clp,verified", "--max-new-tokens", "6", "--out", str(out), *extra]


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_bench_out_checked_before_the_first_prompt(capsys, monkeypatch, tmp_path, tiny_llama_dir, prompts_file,
                                                   kind):
    import clpdecode.evaluation.bench as bench

    def must_not_run(*a, **k):
        raise AssertionError("measured before --out was checked")

    monkeypatch.setattr(bench, "run_bench", must_not_run)
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("x")
        message = "is a file"
    else:
        out, message = "/proc/x", "cannot write results"
    code, _, err = run(capsys, "bench", "--model", str(tiny_llama_dir), "--methods", "ar", "--prompts",
                       str(prompts_file), "--out", str(out))
    assert code == 2 and err.startswith("clp: error:") and message in err and err.count("\n") == 1


def test_bench_keeps_results_when_interrupted_and_resumes(capsys, monkeypatch, tmp_path, tiny_backbone,
                                                          tiny_llama_dir, heads_dir, prompts_file):
    import clpdecode.evaluation.bench as bench

    third = tiny_backbone.encode_prompt("third one")
    real_generate = bench.generate

    def interrupted_at_third(backbone, ids, *a, **k):
        if list(ids) == third:
            raise KeyboardInterrupt
        return real_generate(backbone, ids, *a, **k)

    monkeypatch.setattr(bench, "generate", interrupted_at_third)
    out = tmp_path / "b"
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out))
    assert code == 130 and "--resume" in err and err.endswith("clp: interrupted\n")
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and partial["n_prompts_done"] == 2
    assert partial["methods"]["verified"]["n_prompts"] == 2 and partial["methods"]["ar"]["speedup"] == 1.0
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary files left behind

    monkeypatch.setattr(bench, "generate", real_generate)
    # Other settings cannot continue these results.
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--resume",
                                           "--clp-threshold", "0.7"))
    assert code == 2 and "cannot resume" in err and "clp_threshold" in err and err.count("\n") == 1
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--resume"))
    assert code == 0, err
    done = json.loads((out / "results.json").read_text())
    assert done["complete"] is True and done["n_prompts_done"] == 3
    assert done["runs"][:2] == partial["runs"]  # measured once, kept as measured
    assert done["methods"]["verified"]["agreement_exact"] == 1.0
    assert (out / "report.md").is_file()


def test_bench_resume_refuses_other_prompts(capsys, tmp_path, tiny_llama_dir, heads_dir, prompts_file):
    out = tmp_path / "b"
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--limit", "1"))
    assert code == 0, err
    prompts_file.write_text('{"prompt": "something else"}\n')  # same file name, other prompts
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--resume"))
    assert code == 2 and "prompt 1 differs" in err
