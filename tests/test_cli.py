"""The `clp` command: JSON outputs, streaming, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clpdecode.cli import main
from clpdecode.heads import save_drafter

from conftest import random_drafter


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json(capsys, tiny_llama_dir):
    code, out, _ = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-new-tokens", "7",
                       "--json")
    assert code == 0
    res = json.loads(out)
    assert set(res) >= {"method", "text", "token_ids", "new_tokens", "forward_passes", "seconds",
                        "accepted_per_step", "tokens_per_forward"}
    assert res["method"] == "ar" and res["new_tokens"] == len(res["token_ids"]) <= 7


def test_all_methods_from_cli(capsys, tmp_path, tiny_backbone, tiny_llama_dir):
    save_drafter(random_drafter(tiny_backbone, k=2), tmp_path / "h", tiny_backbone)
    outs = {}
    for m in ["ar", "naive", "gate", "clp", "verified", "competing"]:
        code, out, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"),
                             "--method", m, "--prompt", "abc", "--max-new-tokens", "12", "--json")
        assert code == 0, err
        outs[m] = json.loads(out)
    assert outs["verified"]["token_ids"] == outs["ar"]["token_ids"]
    code, out, _ = run(capsys, "info", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), "--json")
    info = json.loads(out)
    assert info["backbone"]["hidden_size"] == 32
    assert info["heads"]["k"] == 2 and info["clp"]["params"] == 32 * 3 + 3 and info["gate"]["params"] > 0


def test_streaming_prints_text(capsys, tiny_llama_dir):
    code, out, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-new-tokens", "5")
    assert code == 0 and "tokens in" in err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "   "], "empty"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "at least 1"),
    (["generate", "--prompt", "x", "--model", "/no/such/model"], "does not exist"),
    (["generate", "--prompt", "x", "--method", "clp", "--heads", "/no/such/heads"], "does not exist"),
    (["bench", "--prompts", "/no/such.jsonl", "--methods", "ar"], "does not exist"),
    (["bench", "--methods", "ar,turbo"], "unknown method"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "--prompt", "x", "--temperature", "1", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["generate", "--prompt", "x", "--threads", "-1"], "--threads must be at least 1"),
    (["generate", "--prompt", "x", "--threads", "0"], "--threads must be at least 1"),
    (["generate", "--prompt", "x", "--stop", ""], "--stop must not be empty"),
    (["generate", "--prompt", "x", "--method", "clp", "--clp-threshold", "2"], "--clp-threshold must be"),
    (["generate", "--prompt", "x", "--method", "clp", "--clp-threshold", "nan"], "--clp-threshold must be"),
    (["generate", "--prompt", "x", "--method", "gate", "--gate-threshold", "-1"], "--gate-threshold must be"),
    (["bench", "--methods", "ar", "--clp-threshold", "1.5"], "--clp-threshold must be"),
    (["bench", "--methods", "ar", "--limit", "0"], "--limit must be at least 1"),
    (["bench", "--methods", "ar", "--limit", "-1"], "--limit must be at least 1"),
    (["generate", "--prompt", b"caf\xe9 \xff".decode("utf-8", "surrogateescape")], "not valid UTF-8 (byte 0xe9"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "250"], "context window of 256; use --max-new-tokens"),
])
def test_errors_are_one_line_exit_2(capsys, tiny_llama_dir, argv, message):
    if "--model" not in argv:
        argv = argv + ["--model", str(tiny_llama_dir)]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("clp: error:") and message in err and err.count("\n") == 1


def test_prompts_folder_is_named_a_directory(capsys, tmp_path, tiny_llama_dir):
    code, _, err = run(capsys, "bench", "--model", str(tiny_llama_dir), "--methods", "ar", "--prompts", str(tmp_path))
    assert code == 2 and err.count("\n") == 1
    assert f"prompt file {str(tmp_path)!r} is a directory, not a file" in err and "does not exist" not in err


@pytest.fixture
def no_load(monkeypatch):
    """Any backbone load fails the test: what it guards is checked before the load."""
    import clpdecode.backbone

    def must_not_load(*a, **k):
        raise AssertionError("loaded the backbone before checking the options")

    monkeypatch.setattr(clpdecode.backbone, "load_backbone", must_not_load)


@pytest.mark.parametrize("argv, message", [
    # The embedded backbone ships heads for k = 2 and 4: another k is refused whatever the
    # method (with ar it used to be ignored) and by every command that takes --k.
    (["generate", "--prompt", "x", "--method", "verified", "--k", "0"], "--k must be at least 1, got 0"),
    (["generate", "--prompt", "x", "--method", "verified", "--k", "3"], "with k=3: use --k 2 or 4"),
    (["generate", "--prompt", "x", "--method", "ar", "--k", "0"], "--k must be at least 1, got 0"),
    (["generate", "--prompt", "x", "--method", "ar", "--k", "3"], "with k=3: use --k 2 or 4"),
    (["info", "--k", "3"], "with k=3"),
    (["bench", "--methods", "ar", "--k", "-1"], "--k must be at least 1"),
    (["profile", "--k", "5"], "with k=5"),
    (["eval-heads", "--k", "3"], "with k=3"),
    (["eval-heads", "--k", "4", "--baseline", "--model", "gemma3-270m"], "with k=4: use --k 2"),
    (["serve", "--k", "3", "--port", "0"], "with k=3"),
    (["train", "--k", "0", "--out", "x"], "--k must be at least 1"),
    # A model without shipped heads: a method that needs them is refused before the load.
    (["generate", "--prompt", "x", "--method", "clp", "--model", "TINY"], "no heads are shipped for 'tiny-llama"),
    (["serve", "--model", "TINY", "--port", "0"], "no heads are shipped"),
])
def test_k_is_checked_before_the_load(capsys, tiny_llama_dir, no_load, argv, message):
    argv = [str(tiny_llama_dir) if a == "TINY" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("clp: error:") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize("command", [["generate", "--prompt", "x", "--method", "verified"],
                                     ["generate", "--prompt", "x"], ["info"], ["eval-heads"],
                                     ["profile", "--context", "16"],
                                     ["bench", "--methods", "ar,clp"], ["serve", "--port", "0"]])
@pytest.mark.parametrize("heads, message", [("empty", "is not a heads folder (needs config.json and "
                                                       "model.safetensors)"),
                                            ("file", "is a file; give the folder"),
                                            ("missing", "does not exist")])
def test_heads_folder_is_checked_before_the_load(capsys, tmp_path, tiny_llama_dir, no_load, command, heads,
                                                 message):
    """`clp serve --heads /tmp` failed after loading the model (27 s), `eval-heads --heads
    EMPTY_DIR` after 6 s: a --heads that is no heads folder is refused at once, everywhere."""
    folder = tmp_path / heads
    if heads == "empty":
        folder.mkdir()
    elif heads == "file":
        folder.write_text("{}")
    code, out, err = run(capsys, *command, "--model", str(tiny_llama_dir), "--heads", str(folder))
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_k_with_a_heads_folder_and_without_shipped_heads(capsys, tmp_path, tiny_backbone, tiny_llama_dir):
    """A --heads folder has its own k (--k is not used); a backbone without shipped heads runs
    ar whatever --k says (there is nothing --k could select)."""
    save_drafter(random_drafter(tiny_backbone, k=3), tmp_path / "h", tiny_backbone)
    code, out, err = run(capsys, "info", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), "--json")
    assert code == 0 and json.loads(out)["heads"]["k"] == 3, err
    code, out, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--k", "3",
                         "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["method"] == "ar", err


def test_interrupted_on_its_own_line(capsys, monkeypatch, tiny_llama_dir):
    import clpdecode

    def partial_then_ctrl_c(backbone, prompt_ids, policy, cfg, on_tokens=None):
        on_tokens(backbone.tokenizer("abc")["input_ids"], False)
        raise KeyboardInterrupt

    monkeypatch.setattr(clpdecode.decoding, "generate", partial_then_ctrl_c)
    code, out, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "hi")
    assert code == 130 and out == "abc\n" and err == "clp: interrupted\n"


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_broken_pipe_is_quiet(tiny_llama_dir, extra):
    """`clp generate ... | head -c 20`: no traceback, status 141 as SIGPIPE'd tools give."""
    cmd = [sys.executable, "-m", "clpdecode.cli", "generate", "--model", str(tiny_llama_dir), "--prompt", "Write",
           "--max-new-tokens", "200", *extra]
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write: every write hits EPIPE
    try:
        proc = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_prompt_longer_than_context(capsys, tiny_llama_dir):
    code, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "y" * 500)
    assert code == 2 and "context window" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "clpdecode.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--methods" in out.stdout and "--out" in out.stdout


def test_bench_on_user_file(capsys, tmp_path, tiny_backbone, tiny_llama_dir):
    save_drafter(random_drafter(tiny_backbone, k=2), tmp_path / "h", tiny_backbone)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "what is up"}\n')
    code, out, err = run(capsys, "bench", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"),
                         "--prompts", str(prompts), "--max-new-tokens", "10", "--out", str(tmp_path / "b"))
    assert code == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(res["methods"]) == {"ar", "naive", "gate", "clp", "verified", "competing"}
    assert res["methods"]["ar"]["speedup"] == 1.0
    assert res["methods"]["verified"]["agreement_exact"] == 1.0
    for key in ("speedup", "speedup_e2e", "tokens_per_s", "tokens_per_forward", "rep4", "rep3", "rep2",
                "agreement_exact", "common_prefix_mean", "nll", "n_prompts"):
        assert key in res["methods"]["clp"]
    assert (tmp_path / "b" / "report.md").read_text().startswith("# clp-decode benchmark")
    assert (tmp_path / "b" / "speedup_vs_repetition.png").exists()


def test_bench_skips_the_competing_row_of_a_drafter_without_its_heads(capsys, tmp_path, tiny_backbone,
                                                                      tiny_llama_dir):
    """The default methods run on a drafter trained with --no-competing (one line on stderr);
    asked for by name, `competing` fails with its reason."""
    drafter = random_drafter(tiny_backbone, k=2)
    drafter.competing = None
    save_drafter(drafter, tmp_path / "h", tiny_backbone)
    argv = ["bench", "--model", str(tiny_llama_dir), "--heads", str(tmp_path / "h"), "--limit", "1",
            "--max-new-tokens", "4", "--out", str(tmp_path / "b")]
    code, _, err = run(capsys, *argv)
    assert code == 0 and "no competing row" in err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(res["methods"]) == {"ar", "naive", "gate", "clp", "verified"}
    code, _, err = run(capsys, *argv[:-1], str(tmp_path / "c"), "--methods", "ar,competing")
    assert code == 2 and "no competing-ablation heads" in err


def test_bench_times_the_transformers_peers(capsys, tmp_path, tiny_llama_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n')
    code, out, err = run(capsys, "bench", "--model", str(tiny_llama_dir), "--methods", "ar", "--hf-generate",
                         "--prompts", str(prompts), "--max-new-tokens", "12", "--out", str(tmp_path / "b"))
    assert code == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(res["peers"]) == {"hf_generate", "hf_prompt_lookup"}
    for peer in res["peers"].values():
        assert peer["tokens_per_s_e2e"] > 0 and peer["speedup_vs_ar"] > 0
    assert "hf_prompt_lookup" in (tmp_path / "b" / "report.md").read_text()


def test_bench_llama_cpp_row(capsys, tmp_path, tiny_llama_dir, monkeypatch):
    """Without llama-cpp-python (or a GGUF source) the row is skipped with a note; with it, the
    peer is timed on the backbone's GGUF and its tokens compared with our AR's."""
    import sys
    import types

    import clpdecode.backbone.model as model
    import clpdecode.evaluation.peers as peers

    # No llama-server here, whatever this machine has built (tests/test_peers.py covers it).
    monkeypatch.setattr(peers, "find_llama_server", lambda: (None, "none in this test"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt": "and again"}\n')
    argv = ["bench", "--model", str(tiny_llama_dir), "--methods", "ar", "--hf-generate", "--prompts", str(prompts),
            "--max-new-tokens", "6", "--numerics", "fp16"]  # the fake GGUF below has no blocks for q4 to read
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "a"))
    assert code == 0 and "no llama.cpp row" in err
    assert "llama_cpp" not in json.loads((tmp_path / "a" / "results.json").read_text())["peers"]

    seen = {}

    class FakeLlama:  # stands for llama_cpp.Llama: proposes token 7 forever
        def __init__(self, model_path, **kw):
            seen["path"], seen["threads"] = model_path, kw["n_threads"]

        def reset(self):
            pass

        def generate(self, tokens, **kw):
            seen["prompt"] = list(tokens)
            while True:
                yield 7

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    monkeypatch.setattr(model, "source_gguf", lambda name: tmp_path / "model.gguf")
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "b"))
    assert code == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    row = res["peers"]["llama_cpp"]
    assert row["tokens_per_s_e2e"] > 0 and row["n_prompts"] == 2 and row["same_tokens_as_ar"] in (0.0, 0.5, 1.0)
    assert seen["path"] == str(tmp_path / "model.gguf") and seen["prompt"]
    assert "llama_cpp" in (tmp_path / "b" / "report.md").read_text()


def test_raw_prompts_skip_the_chat_template(capsys, tmp_path, tiny_backbone, tiny_llama_dir):
    """--raw (generate, bench) and raw=True (API): plain-text continuation for base models."""
    import clpdecode as clp

    res = clp.generate_text(tiny_backbone, "The capital of", raw=True, max_new_tokens=5)
    assert res.prompt_ids == tiny_backbone.tokenizer("The capital of")["input_ids"]
    chat = clp.generate_text(tiny_backbone, "The capital of", max_new_tokens=5)
    assert chat.prompt_ids != res.prompt_ids  # the tiny tokenizer has a chat template
    code, out, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "The capital of", "--raw",
                         "--max-new-tokens", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == res.token_ids
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The capital of"}\n')
    code, _, err = run(capsys, "bench", "--model", str(tiny_llama_dir), "--methods", "ar", "--raw", "--prompts",
                       str(prompts), "--max-new-tokens", "5", "--out", str(tmp_path / "b"))
    assert code == 0, err
    res_b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res_b["settings"]["raw"] is True


def test_profile_json(capsys, tiny_llama_dir):
    code, out, err = run(capsys, "profile", "--model", str(tiny_llama_dir), "--numerics-list", "fp32,fp16",
                         "--context", "16", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["numerics"] for r in rows] == ["fp32", "fp16"]
    for r in rows:
        assert set(r["forward_ms"]) == {"1", "2", "3", "5", "8", "tree8"} and r["engine"] == "lean"
        assert set(r["forward_ms_by_engine"]) == {"lean", "hf"}
        assert "tree8" not in r["forward_ms_by_engine"]["hf"]  # trees need the lean engine's masks
        assert r["row_max_abs_diff"] < 1e-3  # rows of a step are independent: verified stays exact


@pytest.mark.parametrize("tree", ["0", "big", "-3"])
def test_bad_tree_is_one_line(capsys, tiny_llama_dir, tree):
    code, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--tree", tree)
    assert code == 2 and "--tree" in err and "Traceback" not in err


def test_tree_flag_reaches_verified(capsys, tmp_path, tiny_backbone, tiny_llama_dir):
    save_drafter(random_drafter(tiny_backbone, k=2), tmp_path / "h", tiny_backbone)
    code, out, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--method", "verified",
                         "--heads", str(tmp_path / "h"), "--tree", "6", "--max-new-tokens", "12", "--json")
    assert code == 0, err
    _, ar, _ = run(capsys, "generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-new-tokens", "12",
                   "--json")
    assert json.loads(out)["token_ids"] == json.loads(ar)["token_ids"]


def test_profile_takes_step_sizes_and_tree_sizes(capsys, tiny_llama_dir):
    code, out, err = run(capsys, "profile", "--model", str(tiny_llama_dir), "--numerics-list", "fp32",
                         "--context", "8", "--engines", "lean", "--tokens", "1,4", "--tree-sizes", "3,6", "--json")
    assert code == 0, err
    assert set(json.loads(out)[0]["forward_ms"]) == {"1", "4", "tree3", "tree6"}
    code, _, err = run(capsys, "profile", "--model", str(tiny_llama_dir), "--tokens", "0,2")
    assert code == 2 and "--tokens" in err


@pytest.mark.parametrize("argv, need", [(["--context", "300"], 309), (["--context", "250"], 259),
                                        (["--context", "254", "--tokens", "1", "--tree-sizes", ""], 257)])
def test_profile_context_past_the_window_fails_before_the_load(capsys, monkeypatch, tiny_llama_dir, argv, need):
    """The tiny model's window is 256 positions: --context plus the largest timed step (a
    tree of 8 drafts is 9 tokens; the row check takes 3) must fit, checked before loading."""
    import clpdecode.backbone

    def must_not_load(*a, **k):
        raise AssertionError("loaded the backbone before checking --context")

    monkeypatch.setattr(clpdecode.backbone, "load_backbone", must_not_load)
    code, out, err = run(capsys, "profile", "--model", str(tiny_llama_dir), *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"needs {need} positions > the model's context window of 256; use --context {256 - need + int(argv[1])}" \
        in err


def test_profile_context_checked_after_the_load_where_unknown_before(capsys, monkeypatch, tiny_llama_dir):
    """A model whose window only the load tells (a hub id not yet cached): checked before the prefill."""
    import clpdecode.backbone.loading as loading
    import clpdecode.evaluation.profile as profile

    monkeypatch.setattr(loading, "context_window", lambda name: None)
    monkeypatch.setattr(profile, "profile_step", lambda *a, **k: pytest.fail("profiled past the window"))
    code, _, err = run(capsys, "profile", "--model", str(tiny_llama_dir), "--context", "300")
    assert code == 2 and "context window of 256" in err


def test_context_window_without_loading(tmp_path, tiny_backbone, tiny_llama_dir):
    """The window read from a folder's config or a GGUF's header, as the loaded backbone has it."""
    import gguf

    from clpdecode.backbone.loading import context_window, gguf_context_length

    assert context_window(str(tiny_llama_dir)) == tiny_backbone.max_positions == 256
    assert context_window(str(tmp_path / "no-such-model")) is None
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "def"])
    w.add_array("llama.some_floats", [0.5, 1.5])
    w.add_context_length(1234)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert gguf_context_length(tmp_path / "m.gguf") == 1234
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    assert gguf_context_length(tmp_path / "bad.gguf") is None


def test_streamed_text_equals_the_answer(capsys, tiny_llama_dir):
    argv = ["generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-new-tokens", "40", "--color",
            "never"]
    _, streamed, _ = run(capsys, *argv)
    _, out, _ = run(capsys, *argv, "--json")
    assert streamed == json.loads(out)["text"] + "\n"


def _smollm2_tokenizer():
    from clpdecode.backbone import cache_dir

    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the embedded model has not been converted yet")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("which", ["char", "smollm2"])
def test_stream_decoder_pieces_add_up(which):
    """Incremental decoding (linear time) gives the full decode's text, multi-byte
    characters split across byte-level tokens included."""
    from clpdecode.decoding.stream import StreamDecoder

    from conftest import make_tokenizer

    tok = make_tokenizer() if which == "char" else _smollm2_tokenizer()
    text = "Hello world, two  spaces\nnew line." if which == "char" else \
        "Café ☕ naïve 日本語 — done.\n  Indented 🙂 x"
    ids = tok(text)["input_ids"]

    def decode(x):
        return tok.decode(list(x), skip_special_tokens=True)

    for step in (1, 2, 3):
        sd = StreamDecoder(decode)
        pieces = [sd.push(ids[i:i + step]) for i in range(0, len(ids), step)]
        assert "".join(pieces) + sd.finish() == decode(ids)
        assert not any("\ufffd" in p for p in pieces)
