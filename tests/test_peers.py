"""`clp bench --hf-generate`'s llama-server rows, against a stand-in server (no llama.cpp here)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch

from clpdecode.cli import main

# A stand-in for llama-server: the flags the bench passes, /health, and /completion answering
# token 7 up to n_predict with llama-server's `timings` (drafts in a --spec-type mode). It
# logs its argv and every request body to $FAKE_LOG; with --spec-type ngram-map-k it fails
# to start, as a llama-server that does not know a mode would.
FAKE_SERVER = r'''
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
spec = argv[argv.index("--spec-type") + 1] if "--spec-type" in argv else None
log = open(os.environ["FAKE_LOG"], "a")
log.write(json.dumps({"argv": argv, "pid": os.getpid(), "ld": os.environ.get("LD_LIBRARY_PATH", "")}) + "\n")
log.flush()
if spec == "ngram-map-k":
    print("error: invalid argument: --spec-type ngram-map-k")
    sys.exit(1)


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, {"status": "ok"}) if self.path == "/health" else self.answer(404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({"spec": spec, "body": body}) + "\n")
        log.flush()
        n = body["n_predict"]
        timings = {"prompt_n": len(body["prompt"]), "prompt_ms": 1.0, "predicted_n": n, "predicted_ms": 2.0 * n}
        if spec:
            timings.update(draft_n=n, draft_n_accepted=n - 2)
        self.answer(200, {"content": "", "tokens": [7] * n, "stop_type": "limit", "timings": timings})


HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def bench_argv(tmp_path, tiny_llama_dir, monkeypatch):
    """A tiny bench with the peers, on a backbone that claims a GGUF source; no llama.cpp
    anywhere (no $CLP_LLAMA_SERVER, no `make peers` build, an empty PATH, no llama-cpp-python:
    its in-process row would load the GGUF, which does not exist)."""
    import clpdecode.backbone.model as model
    import clpdecode.evaluation.peers as peers

    monkeypatch.setattr(model, "source_gguf", lambda name: tmp_path / "model.gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    monkeypatch.delenv("CLP_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(peers, "PROJECT_ROOT", tmp_path / "project")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt": "and again"}\n')
    return ["bench", "--model", str(tiny_llama_dir), "--methods", "ar", "--hf-generate", "--prompts", str(prompts),
            "--max-new-tokens", "6", "--numerics", "fp16"]  # the fake GGUF has no blocks for q4 to read


def test_llama_server_rows(capsys, tmp_path, bench_argv, monkeypatch):
    """One server per mode on a free port, sent our prompt ids greedily with no prompt cache;
    per mode: rates end to end and from its timings, token identity, drafts accepted; a mode
    whose server does not start is skipped with one line; every server is stopped after."""
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text(f"#!{sys.executable}\n" + FAKE_SERVER)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "fake.jsonl"
    monkeypatch.setenv("CLP_LLAMA_SERVER", str(exe))
    monkeypatch.setenv("FAKE_LOG", str(log))

    code, out, err = run(capsys, *bench_argv, "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert "| llama_server" not in out  # stdout: the results table only
    skips = [ln for ln in err.splitlines() if ln.startswith("clp bench: no llama_server") or "llama-server" in ln]
    assert len(skips) == 3 and "no llama_server_eagle3 row: no drafter" in skips[0]  # `--methods ar`: no drafter
    assert "no llama_server_ngram_map_k row: llama-server exited with status 1" in skips[1]
    assert "no llama_server_ngram_map_k_n3 row" in skips[2] and all("invalid argument" in s for s in skips[1:])

    res = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = res["peers"]
    running = ("llama_server_ar", "llama_server_ngram_simple", "llama_server_ngram_mod", "llama_server_ngram_simple_n3")
    assert set(running) <= set(rows)
    assert "llama_server_ngram_map_k" not in rows and "llama_server_ngram_map_k_n3" not in rows
    for name in running:
        row = rows[name]
        assert row["n_prompts"] == 2 and row["tokens_per_s_e2e"] > 0 and row["speedup_vs_ar"] > 0
        # (6 - 1) tokens over 12 ms, as its timings say
        assert row["tokens_per_s"] == pytest.approx(5 / 0.012, abs=1e-3)
        assert row["same_tokens_as_ar"] in (0.0, 0.5, 1.0)
    assert "draft_n" not in rows["llama_server_ar"]
    spec = rows["llama_server_ngram_mod"]
    assert spec["draft_n"] == 12 and spec["draft_accepted"] == 8 and spec["draft_acceptance"] == 0.6667
    assert spec["same_tokens_as_llama_server_ar"] == 1.0
    assert res["runs"][0]["llama_server_ar"]["token_ids"] == [7] * 6

    entries = [json.loads(ln) for ln in log.read_text().splitlines()]
    starts = [e for e in entries if "argv" in e]
    assert len(starts) == 6
    for e in starts:
        a = e["argv"]
        assert a[a.index("-m") + 1] == str(tmp_path / "model.gguf")
        threads = str(torch.get_num_threads())
        assert a[a.index("-t") + 1] == a[a.index("-tb") + 1] == threads and a[a.index("-np") + 1] == "1"
        assert e["ld"].split(os.pathsep)[0] == str(exe.parent.resolve())
    assert len({e["argv"][e["argv"].index("--port") + 1] for e in starts}) == 6
    n3 = [e["argv"] for e in starts if "3" in e["argv"] and "--spec-ngram-simple-size-n" in e["argv"]]
    assert n3 and n3[0][n3[0].index("--spec-ngram-simple-size-m") + 1] == "4"
    requests = [e for e in entries if "body" in e]
    assert len(requests) == 3 * 4  # warm-up + 2 prompts, per running mode
    for e in requests:
        b = e["body"]
        assert all(isinstance(t, int) for t in b["prompt"]) and b["cache_prompt"] is False
        assert b["temperature"] == 0 and b["top_k"] == 1 and b["repeat_penalty"] == 1.0
    warm, timed = requests[0]["body"], [e["body"] for e in requests if e["spec"] is None][1:]
    assert warm["n_predict"] == 16 and all(b["n_predict"] == 6 for b in timed)
    assert warm["prompt"] not in [b["prompt"] for b in timed]  # ngram-mod must not see a bench prompt early
    first = res["runs"][0]["prompt_key"]
    from clpdecode.evaluation.bench import _prompt_key

    assert _prompt_key(timed[0]["prompt"]) == first  # exactly our prompt's token ids

    report = (tmp_path / "b" / "report.md").read_text()
    assert "| llama_server_ngram_mod |" in report and "8 of 12" in report

    for e in starts:  # no server outlives the bench
        with pytest.raises(ProcessLookupError):
            os.kill(e["pid"], 0)


def test_no_llama_server_one_line(capsys, tmp_path, bench_argv):
    """Without a llama-server anywhere the rows are skipped with one line on stderr."""
    code, out, err = run(capsys, *bench_argv, "--out", str(tmp_path / "a"))
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("clp bench:") and "llama-server" in ln]
    assert lines == ["clp bench: no llama-server rows: llama-server not found (`make peers` builds it, ~20 min; "
                     "or set $CLP_LLAMA_SERVER or put it on PATH)"]
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert not any(name.startswith("llama_server") for name in res["peers"])
    assert "hf_generate" in res["peers"]


def test_bad_clp_llama_server_is_one_line_exit_2(capsys, tmp_path, bench_argv, monkeypatch):
    monkeypatch.setenv("CLP_LLAMA_SERVER", str(tmp_path / "nothing-here"))
    code, out, err = run(capsys, *bench_argv, "--out", str(tmp_path / "c"))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"clp: error: $CLP_LLAMA_SERVER '{tmp_path / 'nothing-here'}' is not an "
                                        "executable file; point it at llama-server or unset it"]


def test_old_peer_records_still_summarize():
    """results.json files from before PeerRun hold [new tokens, seconds(, ids)] lists."""
    from clpdecode.evaluation.peers import PeerRun

    assert PeerRun.from_record([4, 0.5]) == PeerRun(4, 0.5)
    assert PeerRun.from_record([2, 0.1, [1, 2]]).token_ids == [1, 2]
    run = PeerRun(3, 0.2, [1, 2, 3], decode_tokens=2, decode_seconds=0.1)
    assert PeerRun.from_record(run.as_record()) == run
