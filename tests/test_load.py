"""`clp bench-serve`: its statistics, its refusals, and short runs against a real `clp serve`
subprocess on the tiny model (alone, and beside a stand-in llama-server); a real llama-server
is only used where one is built (`make peers`)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from clpdecode.cli import main
from clpdecode.evaluation.load import Reply, RequestRun, median_rows, percentile, scheduler_delta, summarize

from conftest import random_drafter


def bench_serve(capsys, model, prompts, *argv):
    """`clp bench-serve` on `model` and the prompt file: (status, stdout, stderr)."""
    code = main(["bench-serve", "--model", str(model), "--prompts", str(prompts), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello there", "What is 2+2?", "abc"]))
    return path


@pytest.fixture(scope="module")
def heads_dir(tiny_backbone, tmp_path_factory):
    from clpdecode.heads import save_drafter

    path = tmp_path_factory.mktemp("load-heads") / "k2"
    save_drafter(random_drafter(tiny_backbone, k=2), path, tiny_backbone)
    return path


# ---- statistics ------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5  # unsorted in, numpy's linear rule
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)
    assert percentile(list(range(101)), 0.99) == pytest.approx(99.0)


def test_summarize_aggregates_over_the_wall_clock():
    def ok(prompt, latency, tokens, text, forwards=None, ttft=0.1):
        return RequestRun(0, prompt, 0.0, Reply(ttft, latency, tokens, text, forwards))

    runs = [ok(0, 1.0, 10, "a", forwards=5), ok(1, 2.0, 20, "b", forwards=20, ttft=0.3), ok(0, 4.0, 10, "x"),
            RequestRun(1, 1, 0.5, error="RequestFailed: HTTP 503")]
    s = summarize(runs, wall=4.0, references={0: "a", 1: "b"})
    assert s["requests"] == 4 and s["errors"] == 1 and s["first_error"] == "RequestFailed: HTTP 503"
    assert s["completion_tokens"] == 40 and s["tokens_per_s"] == 10.0  # 40 tokens over 4 s of wall clock
    assert s["request_tokens_per_s_p50"] == 10.0 and s["request_tokens_per_s_mean"] == 7.5  # 10, 10 and 2.5
    assert s["latency_p50"] == 2.0 and s["latency_p99"] == pytest.approx(3.96)
    assert s["ttft_p50"] == 0.1
    assert s["tokens_per_forward"] == pytest.approx(30 / 25)  # only the requests that report forwards
    assert s["same_as_single_stream_ar"] == 0.6667 and s["same_as_single_stream_ar_count"] == [2, 3]
    assert "same_as_single_stream_ar" not in summarize(runs, 4.0)
    empty = summarize([RequestRun(0, 0, 0.0, error="e")], 1.0, references={})
    assert empty["tokens_per_s"] == 0 and empty["latency_p50"] is None and empty["same_as_single_stream_ar"] is None


def test_scheduler_delta_recovers_rows_from_the_running_mean():
    before = {"steps": 10, "rows_per_step": 2.0, "drafted": 4, "kept": 2}
    after = {"steps": 30, "rows_per_step": 3.0, "drafted": 14, "kept": 8}
    assert scheduler_delta(before, after) == {"steps": 20, "rows_per_step": 3.5, "drafted": 10, "kept": 6,
                                              "kept_share": 0.6}


def test_median_rows_over_rounds():
    """--repeats: per side and concurrency, the median of each figure, counts summed, every
    round's tokens/s kept; the scheduler's rows per step weighted by its steps."""
    def run(side, tps, ttft, same, steps, rows, drafted, rss):
        return {"side": side, "concurrency": 8, "round": 0, "requests": 16, "errors": 0, "completion_tokens": 2000,
                "tokens_per_s": tps, "ttft_p50": ttft, "ttft_p99": None, "same_as_single_stream_ar_count": [same, 16],
                "server_rss_mb": rss, "scheduler": {"steps": steps, "rows_per_step": rows, "drafted": drafted,
                                                    "kept": drafted // 2, "kept_share": 0.5}}

    runs = [run("a", 200.0, 0.3, 16, 100, 8.0, 10, 900.0), run("b", 90.0, 1.0, 8, 1, 1.0, 0, None),
            run("a", 260.0, 0.1, 16, 300, 12.0, 30, 950.0), run("a", 230.0, 0.2, 15, 200, 10.0, 0, 940.0)]
    a, b = median_rows(runs)
    assert (a["side"], a["rounds"], a["tokens_per_s"], a["ttft_p50"], a["ttft_p99"]) == ("a", 3, 230.0, 0.2, None)
    assert a["tokens_per_s_rounds"] == [200.0, 260.0, 230.0] and a["requests"] == 48 and a["server_rss_mb"] == 950.0
    assert a["same_as_single_stream_ar_count"] == [47, 48] and a["same_as_single_stream_ar"] == round(47 / 48, 4)
    assert a["scheduler"] == {"steps": 600, "rows_per_step": round((800 + 3600 + 2000) / 600, 3), "drafted": 40,
                              "kept": 20, "kept_share": 0.5}
    assert b["rounds"] == 1 and b["tokens_per_s"] == 90.0 and b["server_rss_mb"] is None


# ---- the CPU record and llama.cpp's flags ---------------------------------------------
CPUINFO = """processor\t: 0
model name\t: Test Xeon
flags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni \
amx_tile amx_int8 amx_bf16

processor\t: 1
model name\t: Test Xeon
flags\t\t: fpu
"""


def test_cpu_info_and_ggml_flags(tmp_path):
    from clpdecode.evaluation.cpu import cpu_flags, cpu_info, cpu_summary, ggml_cmake_args

    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = cpu_info(path)
    assert info["model"] == "Test Xeon"
    assert info["flags"]["avx512_vnni"] and info["flags"]["amx"] and not info["flags"]["avx_vnni"]
    assert "Test Xeon" in cpu_summary(info) and "amx" in cpu_summary(info)
    args = ggml_cmake_args(cpu_flags(path))
    # Named one by one, AMX and -march=native never; AVX-512 only with all five of its sets.
    for on in ("GGML_AVX2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_FMA", "GGML_BMI2"):
        assert f"-D{on}=ON" in args
    for off in ("GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_AVX_VNNI",
                "GGML_AVX512_BF16"):
        assert f"-D{off}=OFF" in args
    assert "-DGGML_AVX512=OFF" in ggml_cmake_args({"avx512f", "avx2"})
    assert cpu_info(tmp_path / "absent")["flags"] == {}


# ---- refusals --------------------------------------------------------------------------
@pytest.mark.parametrize("extra, msg", [
    (["--concurrency", "1,x"], "--concurrency takes comma-separated whole numbers"),
    (["--concurrency", "0,2"], "--concurrency takes comma-separated numbers >= 1"),
    (["--concurrency", ","], "--concurrency takes comma-separated numbers >= 1"),
    (["--requests", "0"], "--requests must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompts", "nope"], "unknown prompt set 'nope'"),
    (["--peers"], "--peers: "),  # the tiny model has no GGUF for llama-server
    (["--also", "ar,nope"], "--also takes ar and/or off, got 'nope'"),
    (["--also", "ar"], "--also ar: the main side already runs --method ar"),
    (["--also", "off"], "--also off: the row budget only changes --method verified"),
    (["--same-prompts", "--concurrency", "2,3", "--requests", "1"], "2 clients cannot share them evenly"),
])
def test_refusals_are_one_line_before_anything_starts(capsys, tmp_path, tiny_llama_dir, prompts_file, extra, msg):
    code, out, err = bench_serve(capsys, tiny_llama_dir, prompts_file, "--method", "ar", "--out", str(tmp_path / "o"),
                                 *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clp: error:") and msg in lines[0], err


def test_out_that_is_a_file_is_refused(capsys, tmp_path, tiny_llama_dir, prompts_file):
    out_file = tmp_path / "results"
    out_file.write_text("")
    code, out, err = bench_serve(capsys, tiny_llama_dir, prompts_file, "--method", "ar", "--out", str(out_file))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"clp: error: --out {str(out_file)!r} is a file; give a folder for the results"]


# ---- runs against a real `clp serve` ---------------------------------------------------
def test_end_to_end_on_the_tiny_model(capsys, tmp_path, tiny_llama_dir, heads_dir, prompts_file):
    """`clp serve` started as a subprocess (verified with random heads): every request's text is
    its single-stream AR text; stdout holds the table only; the report, plot and JSON are written."""
    out_dir = tmp_path / "bs"
    code, out, err = bench_serve(capsys, tiny_llama_dir, prompts_file, "--heads", str(heads_dir), "--numerics", "fp32",
                                 "--parallel", "2", "--concurrency", "1,2", "--requests", "2", "--max-new-tokens", "6",
                                 "--also", "ar,off", "--repeats", "2", "--out", str(out_dir))
    assert code == 0, err
    assert all(ln.startswith(("|", "report:")) for ln in out.splitlines() if ln.strip())
    assert "clp bench-serve: starting clp serve" in err and "some twice" in err  # 3 prompts for 4 requests
    res = json.loads((out_dir / "results.json").read_text())
    # --also: batched AR on the same server and a second server without the row budget, each
    # right after the main side at every concurrency, judged against the main side's references
    sides = ("clp_serve", "clp_serve_ar", "clp_serve_off")
    assert [(r["side"], r["concurrency"]) for r in res["rows"]] == [(side, c) for c in (1, 2) for side in sides]
    # --repeats 2: two rounds at each concurrency, the second in reverse order; rows are their medians
    assert [(r["side"], r["concurrency"], r["round"]) for r in res["runs"]] == [
        x for c in (1, 2) for x in [(side, c, 0) for side in sides] + [(side, c, 1) for side in sides[::-1]]]
    off = res["servers"]["clp_serve_off"]["argv"]
    assert off[off.index("--spec-budget") + 1] == "off" and set(res["references"]) == {"clp_serve"}
    assert all(r["tokens_per_forward"] == 1 for r in res["rows"] if r["side"] == "clp_serve_ar")
    for r in res["rows"]:
        assert r["errors"] == 0 and r["requests"] == 2 * 2 * r["concurrency"] and r["rounds"] == 2
        assert len(r["tokens_per_s_rounds"]) == 2 and min(r["tokens_per_s_rounds"]) <= r["tokens_per_s"]
        assert r["same_as_single_stream_ar"] == 1.0 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50"] <= r["latency_p99"] and r["tokens_per_forward"] >= 1
        assert r["scheduler"]["steps"] > 0
    assert res["references"]["clp_serve"]["requests"] == 3
    argv = res["servers"]["clp_serve"]["argv"]
    assert argv[argv.index("--parallel") + 1] == "2" and argv[argv.index("--method") + 1] == "verified"
    assert argv[argv.index("--threads") + 1] == "auto"  # clp serve keeps its own governor
    assert "model" in res["cpu"] and res["settings"]["concurrency"] == [1, 2]
    report = (out_dir / "report.md").read_text()
    assert "| clp serve | 2 |" in report and "| clp serve, method ar | 2 |" in report
    assert "(load.png)" in report and "CPU: " in report and "2 rounds at each concurrency" in report
    assert (out_dir / "load.png").read_bytes()[:4] == b"\x89PNG"


# A stand-in llama-server: the flags, /health, and a streamed /completion of token 7 (text "x")
# up to n_predict, one event a token, then the final event (unstreamed: the text alone); it logs
# its argv and bodies; with $FAKE_SIGILL it dies on its first decode as a bad build does.
FAKE_SERVER = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
log = open(os.environ["FAKE_LOG"], "a")
log.write(json.dumps({"argv": argv, "pid": os.getpid()}) + "\n")
log.flush()


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({"body": body}) + "\n")
        log.flush()
        if os.environ.get("FAKE_SIGILL"):  # as llama.cpp 0.3.36 built with GGML_NATIVE=ON on an AMX Xeon
            os.kill(os.getpid(), 4)
            time.sleep(60)  # the signal may land a moment later: never answer
        if not body.get("stream"):
            data = json.dumps({"content": "x" * body["n_predict"]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(body["n_predict"]):
            self.wfile.write(b'data: {"content": "x", "tokens": [7], "stop": false}\n\n')
        self.wfile.write(b'data: {"content": "", "tokens": [], "stop": true, "tokens_predicted": 1}\n\n')


ThreadingHTTPServer(("127.0.0.1", int(argv[argv.index("--port") + 1])), H).serve_forever()
'''


@pytest.fixture
def fake_llama_server(tmp_path, monkeypatch):
    exe = tmp_path / "llama-server"
    exe.write_text(f"#!{sys.executable}\n" + FAKE_SERVER)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "fake.jsonl"))
    return exe


def test_peers_beside_a_stand_in_llama_server(capsys, tmp_path, tiny_llama_dir, prompts_file, monkeypatch,
                                              fake_llama_server):
    """With --peers the sides take turns at each concurrency; llama-server gets --parallel N, N
    slots' context, the threads, and the very prompt ids clp serve encodes, greedy, streamed."""
    import torch

    import clpdecode.backbone.loading as loading
    import clpdecode.backbone.model as model

    fake_gguf = tmp_path / "model.gguf"
    monkeypatch.setattr(model, "source_gguf", lambda name: fake_gguf)
    monkeypatch.setattr(loading, "source_gguf", lambda name: fake_gguf)
    log = tmp_path / "fake.jsonl"
    monkeypatch.setenv("CLP_LLAMA_SERVER", str(fake_llama_server))
    out_dir = tmp_path / "bs"
    code, out, err = bench_serve(capsys, tiny_llama_dir, prompts_file, "--numerics", "fp32", "--method", "ar",
                                 "--parallel", "3", "--concurrency", "2,1", "--requests", "1", "--max-new-tokens", "5",
                                 "--peers", "--out", str(out_dir))
    assert code == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    assert [(r["side"], r["concurrency"]) for r in res["rows"]] == [
        ("clp_serve", 2), ("llama_server", 2), ("clp_serve", 1), ("llama_server", 1)]
    peer = [r for r in res["rows"] if r["side"] == "llama_server"]
    assert all(r["completion_tokens"] == 5 * r["concurrency"] and r["same_as_single_stream_ar"] == 1.0
               and r["tokens_per_forward"] == 1.0 for r in peer)
    assert "| clp serve | 1 |" in out and "x |" in out.split("| clp serve | 1 |")[1].splitlines()[0]

    entries = [json.loads(ln) for ln in log.read_text().splitlines()]
    (start,), bodies = [e["argv"] for e in entries if "argv" in e], [e["body"] for e in entries if "body" in e]
    context = res["settings"]["context_per_slot"]
    assert start[start.index("-np") + 1] == "3" and start[start.index("-c") + 1] == str(3 * context)
    assert start[start.index("-t") + 1] == start[start.index("-tb") + 1] == str(torch.get_num_threads())
    assert start[start.index("-m") + 1] == str(fake_gguf)
    assert len(bodies) == 2 + 2 + 1  # the references (2 prompts), then 2 clients, then 1
    assert all(b["stream"] and b["temperature"] == 0 and b["cache_prompt"] is False and b["n_predict"] == 5
               for b in bodies)
    from clpdecode.backbone import load_backbone

    tiny = load_backbone(str(tiny_llama_dir), numerics="fp32")
    assert bodies[0]["prompt"] == tiny.encode_prompt("hello there")  # the ids clp serve decodes too
    with pytest.raises(ProcessLookupError):  # no server outlives the bench
        os.kill(json.loads(log.read_text().splitlines()[0])["pid"], 0)


def test_same_prompts_at_every_concurrency(capsys, tmp_path, tiny_llama_dir, prompts_file, monkeypatch,
                                           fake_llama_server):
    """--same-prompts: every concurrency answers the same (most clients x --requests) prompts,
    split over its clients; 1 client sends them all back to back."""
    import clpdecode.backbone.loading as loading
    import clpdecode.backbone.model as model
    from clpdecode.backbone import load_backbone

    fake_gguf = tmp_path / "model.gguf"
    monkeypatch.setattr(model, "source_gguf", lambda name: fake_gguf)
    monkeypatch.setattr(loading, "source_gguf", lambda name: fake_gguf)
    monkeypatch.setenv("CLP_LLAMA_SERVER", str(fake_llama_server))
    out_dir = tmp_path / "bs"
    code, out, err = bench_serve(capsys, tiny_llama_dir, prompts_file, "--numerics", "fp32", "--method", "ar",
                                 "--concurrency", "2,1", "--requests", "1", "--max-new-tokens", "3", "--peers",
                                 "--same-prompts", "--out", str(out_dir))
    assert code == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    assert [(r["side"], r["concurrency"], r["requests"]) for r in res["rows"]] == [
        ("clp_serve", 2, 2), ("llama_server", 2, 2), ("clp_serve", 1, 2), ("llama_server", 1, 2)]
    assert res["settings"]["same_prompts"] and "the same 2 requests at every concurrency" in (
        out_dir / "report.md").read_text()
    bodies = [json.loads(ln)["body"] for ln in (tmp_path / "fake.jsonl").read_text().splitlines() if "body" in ln]
    tiny = load_backbone(str(tiny_llama_dir), numerics="fp32")
    ids = [tiny.encode_prompt(p) for p in ("hello there", "What is 2+2?")]
    assert [b["prompt"] for b in bodies[4:]] == ids  # the 1-client run: both prompts, in order


def test_make_peers_check_keeps_only_a_build_that_decodes(fake_llama_server, monkeypatch, capsys):
    """`make peers` runs this on every llama-server it would keep: a build that dies on its first
    decode is named with its signal, exit 1."""
    from clpdecode.evaluation.peers import check_llama_server
    from clpdecode.evaluation.peers import main as peers_main

    assert check_llama_server(fake_llama_server) is None
    monkeypatch.setenv("FAKE_SIGILL", "1")
    assert check_llama_server(fake_llama_server).startswith("llama-server died on its first decode (signal SIGILL)")
    assert peers_main(["--check-server", str(fake_llama_server)]) == 1
    assert "peers check: llama-server" in capsys.readouterr().err
    assert check_llama_server(fake_llama_server.parent / "absent") == "not built (no executable there)"


def test_stream_parsing_against_a_real_llama_server():
    """Where `make peers` built llama-server: the streamed client reads the same greedy tokens as
    a plain request does."""
    from clpdecode.backbone.loading import embedded_gguf_path
    from clpdecode.evaluation.load import LlamaServerClient
    from clpdecode.evaluation.peers import LlamaServerPeer, find_llama_server

    binary, why = find_llama_server()
    if binary is None:
        pytest.skip(why)
    server = LlamaServerPeer.start(binary, "llama_server_ar", embedded_gguf_path(), 2, 1024, parallel=2)
    try:
        assert server.wait_ready() is None
        ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198, 1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]
        plain = server.time(ids, 8)
        streamed = LlamaServerClient(server.url, [ids], 8).request(0)
        assert streamed.tokens == plain.new_tokens and 0 < streamed.ttft <= streamed.latency
    finally:
        server.close()
