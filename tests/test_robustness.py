"""Bad inputs and interruptions: clear one-line errors (exit 2), nothing measured is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    assert done["settings"]["cpu"]["model"] and "CPU: " in (out / "report.md").read_text()  # the machine, recorded


def test_bench_resume_refuses_other_prompts(capsys, tmp_path, tiny_llama_dir, heads_dir, prompts_file):
    out = tmp_path / "b"
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--limit", "1"))
    assert code == 0, err
    prompts_file.write_text('{"prompt": "something else"}\n')  # same file name, other prompts
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--resume"))
    assert code == 2 and "prompt 1 differs" in err


def test_bench_resume_keeps_what_was_measured_and_refuses_hand_edits(capsys, tmp_path, tiny_llama_dir, heads_dir,
                                                                      prompts_file):
    """Issue 27: --limit 1 --resume over 2 measured prompts rewrote results.json with 1 run;
    a hand-edited file ("runs": [1], a run without "methods") was a traceback."""
    out = tmp_path / "b"
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--limit", "2"))
    assert code == 0, err
    path = out / "results.json"
    before = path.read_text()
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--limit", "1", "--resume"))
    assert code == 2 and "holds 2 measured prompts" in err and "--limit 2" in err and err.count("\n") == 1
    assert path.read_text() == before
    results = json.loads(before)
    for edit, what in [(lambda r: r.__setitem__("runs", [1]), "run 1 is not a measured prompt"),
                       (lambda r: r["runs"][1].pop("methods"), 'run 2 has no "methods"'),
                       (lambda r: r["runs"][0]["methods"]["ar"].pop("token_ids"), "method ar: token_ids"),
                       (lambda r: r.__setitem__("settings", []), '"settings" is not an object')]:
        edited = json.loads(before)
        edit(edited)
        path.write_text(json.dumps(edited))
        code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--resume"))
        assert code == 2 and err.startswith("clp: error: cannot resume") and what in err and err.count("\n") == 1
    assert results["n_prompts_done"] == 2


def test_bench_resumes_results_written_before_raw_and_lookup(capsys, tmp_path, tiny_llama_dir, heads_dir,
                                                               prompts_file):
    """A results.json from before --raw and --no-lookup lacks both settings: it was measured
    with raw=False and without lookup, so it resumes under --no-lookup and only then."""
    out = tmp_path / "b"
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--limit", "1",
                                           "--no-lookup"))
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    for key in ("raw", "lookup"):  # as the older code wrote it
        del results["settings"][key]
    (out / "results.json").write_text(json.dumps(results))

    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--resume"))
    assert code == 2 and "(lookup)" in err  # lookup on would mix two methods in one result
    code, _, err = run(capsys, *bench_argv(tiny_llama_dir, heads_dir, prompts_file, out, "--resume",
                                           "--no-lookup"))
    assert code == 0, err
    done = json.loads((out / "results.json").read_text())
    assert done["n_prompts_done"] == 3 and done["runs"][:1] == results["runs"]
    assert done["settings"]["raw"] is False and done["settings"]["lookup"] is False


# ---- the model cache ------------------------------------------------------------------
def _cache_builder(calls):
    from conftest import save_tiny_model

    def build(tmp):
        calls.append(tmp)
        save_tiny_model(tmp)

    return build


def _loads(folder):
    from safetensors.torch import load_file

    return len(load_file(str(folder / "model.safetensors"))) > 0


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_corrupt_cache_of_the_same_size_is_rebuilt(tmp_path, keep_mtime):
    import os

    from clpdecode.backbone.loading import cached_folder

    calls = []
    folder = tmp_path / "models" / "tiny"
    build = _cache_builder(calls)
    assert cached_folder(folder, "src", build) == folder and len(calls) == 1
    assert cached_folder(folder, "src", build) == folder and len(calls) == 1  # cached
    f = folder / "model.safetensors"
    st = f.stat()
    with open(f, "r+b") as fh:  # the reproduction: same size, first 8 bytes overwritten
        fh.write(b"\xff" * 8)
    if keep_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    cached_folder(folder, "src", build)
    assert len(calls) == 2 and _loads(folder)


def test_corrupt_tensor_data_is_caught_by_the_checksum(tmp_path):
    from clpdecode.backbone.loading import cached_folder

    calls = []
    folder = tmp_path / "tiny"
    build = _cache_builder(calls)
    cached_folder(folder, "src", build)
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100:-90] = bytes(10)  # the header stays valid; only the content differs
    f.write_bytes(bytes(data))
    cached_folder(folder, "src", build)
    assert len(calls) == 2 and _loads(folder)
    cached_folder(folder, "other-source", build)  # another GGUF: rebuilt as before
    assert len(calls) == 3


def test_killed_conversion_leftovers_are_removed(tmp_path):
    from clpdecode.backbone.loading import cached_folder

    folder = tmp_path / "tiny"
    stale = tmp_path / ".tiny-abc123"  # what atomic_folder leaves when the process is killed
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".other-abc123"  # another model's build: not ours to remove
    other.mkdir()
    calls = []
    cached_folder(folder, "src", _cache_builder(calls))
    assert len(calls) == 1 and not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [".other-abc123", "tiny"]


def test_format_1_marker_is_upgraded_not_rebuilt(tmp_path):
    from clpdecode.backbone.loading import _DONE_MARKER, cached_folder

    calls = []
    folder = tmp_path / "tiny"
    build = _cache_builder(calls)
    cached_folder(folder, "src", build)
    marker = folder / _DONE_MARKER
    info = json.loads(marker.read_text())
    old = {"format": 1, "source": "src", "files": {n: m["size"] for n, m in info["files"].items()}}
    marker.write_text(json.dumps(old))
    cached_folder(folder, "src", build)
    assert len(calls) == 1
    assert json.loads(marker.read_text())["files"] == info["files"]


def fake_gguf(path, content=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64 + content)
    return path


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """A fresh cache in tmp_path/cache, and GGUF "conversions" (the GGUF paths, listed in
    the returned list) that write the tiny random model."""
    from clpdecode.backbone import loading

    from conftest import save_tiny_model

    calls = []

    def convert(path, name, tmp):
        calls.append(path)
        save_tiny_model(tmp)

    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return calls


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch, conversions):
    """The embedded backbone as a tiny stand-in: a fake GGUF file converted to the tiny model."""
    from clpdecode.backbone import loading

    gguf = fake_gguf(tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: gguf)
    return gguf, conversions


def test_conversion_status_goes_to_stderr(capsys, fake_embedded):
    """A first run's `clp: converting ...` line must not corrupt --json output."""
    _, calls = fake_embedded
    code, out, err = run(capsys, "info", "--json", "--numerics", "fp32")  # the fake GGUF has no blocks
    assert code == 0, err
    assert json.loads(out)["backbone"]["name"] == "SmolLM2-135M-Instruct"
    assert len(calls) == 1 and "clp: converting" in err and "converting" not in out
    code, out, err = run(capsys, "info", "--json", "--numerics", "fp32")  # cached: no status line at all
    assert code == 0 and len(calls) == 1 and "converting" not in err and json.loads(out)


def test_identical_ggufs_share_one_conversion(tmp_path, conversions):
    """Two installs (two virtualenvs) hold byte-identical GGUFs with different mtimes: both
    use the one cached conversion instead of rebuilding it in turn."""
    import os

    from clpdecode.backbone.loading import converted_gguf_folder

    a = fake_gguf(tmp_path / "venv-a" / "m.gguf")
    b = fake_gguf(tmp_path / "venv-b" / "m.gguf")
    os.utime(a, (1_600_000_000, 1_600_000_000))
    os.utime(b, (1_700_000_000, 1_700_000_000))
    folder = converted_gguf_folder(a, "tiny", progress=False)
    for gguf in (b, a, b):
        assert converted_gguf_folder(gguf, "tiny", progress=False) == folder
    assert conversions == [a] and _loads(folder)
    other = fake_gguf(tmp_path / "venv-c" / "m.gguf", b"other weights")
    converted_gguf_folder(other, "tiny", progress=False)  # another file: converted
    assert conversions == [a, other]


def test_gguf_hash_is_computed_once_per_file(tmp_path, monkeypatch, conversions):
    import os

    from clpdecode.backbone import loading

    gguf = fake_gguf(tmp_path / "venv" / "m.gguf")
    hashed = []
    real = loading._sha256
    monkeypatch.setattr(loading, "_sha256", lambda p: hashed.append(Path(p)) or real(p))
    loading.converted_gguf_folder(gguf, "tiny", progress=False)
    assert hashed.count(gguf) == 1
    for _ in range(3):
        loading.converted_gguf_folder(gguf, "tiny", progress=False)
    assert hashed.count(gguf) == 1  # remembered in the cache's file-hashes.json
    os.utime(gguf, (1_600_000_000, 1_600_000_000))  # touched (same content): hashed again, not rebuilt
    loading.converted_gguf_folder(gguf, "tiny", progress=False)
    assert hashed.count(gguf) == 2 and conversions == [gguf]
    fake_gguf(gguf, b"new weights")  # the same path with other content: converted again
    loading.converted_gguf_folder(gguf, "tiny", progress=False)
    assert conversions == [gguf, gguf]


def test_cache_shared_with_an_earlier_version(tmp_path, conversions):
    """Earlier versions keyed the cache on the GGUF's name, size and mtime (the marker's
    "source", all they compare). A cache one of them built from this very file is kept;
    and the marker keeps that "source" beside the content "key", so that an earlier version
    in the same install (sharing the cache) keeps it too, instead of the two rebuilding it
    in turn."""
    from clpdecode.backbone import loading

    gguf = fake_gguf(tmp_path / "venv" / "m.gguf")
    st = gguf.stat()
    old_key = f"{gguf.name}:{st.st_size}:{int(st.st_mtime)}:"  # as earlier versions wrote it
    folder = loading.cache_dir() / "models" / "tiny"
    marker_file = folder / loading._DONE_MARKER
    loading.cached_folder(folder, old_key, _cache_builder([]))
    old_marker = json.loads(marker_file.read_text())
    del old_marker["key"]  # earlier versions wrote no "key"
    marker_file.write_text(json.dumps(old_marker))
    assert loading.converted_gguf_folder(gguf, "tiny", progress=False) == folder and conversions == []
    marker = json.loads(marker_file.read_text())
    assert marker["key"] == loading._content_fingerprint(gguf) and marker["source"] == old_key
    # A conversion by this version records the earlier key too.
    shutil.rmtree(folder)
    loading.converted_gguf_folder(gguf, "tiny", progress=False)
    marker = json.loads(marker_file.read_text())
    assert conversions == [gguf] and marker["source"] == old_key
    assert marker["key"] == loading._content_fingerprint(gguf)
    # A "key" decides: another file with the same name, size and mtime is not this one.
    marker["key"] = "m.gguf:0:sha256=other"
    marker_file.write_text(json.dumps(marker))
    loading.converted_gguf_folder(gguf, "tiny", progress=False)
    assert conversions == [gguf, gguf]


# ---- model names ----------------------------------------------------------------------
def test_model_folder_without_tokenizer(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "has no tokenizer" in err and err.count("\n") == 1


@pytest.mark.parametrize("offline", ["env", "unreachable"])
def test_mistyped_model_name_fails_at_once(capsys, monkeypatch, tmp_path, offline):
    import time

    from clpdecode.backbone import loading

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(loading, "_hub_reachable", lambda endpoint: False)
    t = time.perf_counter()
    code, _, err = run(capsys, "generate", "--model", "embeded", "--prompt", "hi")
    assert time.perf_counter() - t < 10
    assert code == 2 and "did you mean 'embedded'?" in err and err.count("\n") == 1
    assert ("HF_HUB_OFFLINE is set" in err) == (offline == "env")


# ---- the Python API raises the same ClpError ------------------------------------------
@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(temperature=1.0, top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan"))])
def test_sampling_config_raises_clp_error(kw):
    from clpdecode import ClpError, SamplingConfig

    with pytest.raises(ClpError):
        SamplingConfig(**kw)


def test_generate_text_sampling_checks(tiny_backbone):
    from clpdecode import ClpError, generate_text

    with pytest.raises(ClpError, match="top_p must be"):  # the API names its keyword, not the CLI flag
        generate_text(tiny_backbone, "hi", top_p=0.0, temperature=1.0)


# ---- issue 27: a tiny temperature, API errors named by the API's names --------------------
@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-39])
def test_a_temperature_below_float32s_range_is_greedy(tiny_backbone, temperature):
    """1e-300 is 0 in float32: the softmax was nan ("probability tensor contains inf, nan")."""
    from clpdecode import generate_text

    greedy = generate_text(tiny_backbone, "hi", max_new_tokens=8).token_ids
    assert generate_text(tiny_backbone, "hi", max_new_tokens=8, temperature=temperature).token_ids == greedy


def test_api_errors_name_the_api_keywords(tiny_backbone):
    from clpdecode import ClpError, generate, generate_text, make_policy

    with pytest.raises(ClpError, match=r"max_new_tokens must be a whole number >= 1, got '4'"):
        generate_text(tiny_backbone, "hi", max_new_tokens="4")
    with pytest.raises(ClpError, match="clp_threshold must be a number in"):
        make_policy("clp", tiny_backbone, None, clp_threshold=2)
    for bad in ([10**7], [-5], [3, 1.5], [True]):
        with pytest.raises(ClpError, match=r"token ids are whole numbers in \[0, "):
            generate(tiny_backbone, bad, make_policy("ar"))
    with pytest.raises(ClpError, match="the prompt is empty"):
        generate(tiny_backbone, [], make_policy("ar"))
    try:
        generate_text(tiny_backbone, "hi", max_new_tokens=0)
    except ClpError as e:
        assert "--" not in str(e) and e.param == "max_new_tokens"
        assert e.named("--max-new-tokens") == "--max-new-tokens must be at least 1, got 0"
