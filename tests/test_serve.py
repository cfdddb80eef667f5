"""`clp serve`: the real server (uvicorn on 127.0.0.1, a free port) on a tiny random model,
talked to with the official `openai` client and raw HTTP for what a client would not send."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn

from clpdecode.decoding import PolicyConfig

from conftest import random_drafter

PROMPTS = ["Hello there", "Name three rivers.", "abc", "What is 2+2?"]


@contextlib.contextmanager
def running(app, **config):
    """Serve `app` with uvicorn in a background thread on 127.0.0.1; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def heads_dir(tiny_backbone, tmp_path_factory):
    from clpdecode.heads import save_drafter

    path = tmp_path_factory.mktemp("serve-heads") / "k2"
    save_drafter(random_drafter(tiny_backbone, k=2), path, tiny_backbone)
    return path


@pytest.fixture(scope="module")
def drafter(tiny_backbone, heads_dir):
    from clpdecode import default_drafter

    return default_drafter(tiny_backbone, folder=heads_dir)  # as `clp serve --heads DIR` loads it


@pytest.fixture(scope="module")
def served(tiny_backbone, drafter):
    from clpdecode.serve import create_app

    app = create_app(tiny_backbone, drafter, policy=PolicyConfig(method="verified"), max_body_bytes=64 * 1024)
    with running(app) as url:
        yield url, app.state.server


def client(url, model=None, api_key="none"):
    """The official client (no retries), remembering the served model id for chat()."""
    c = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=30)
    c.served_model = model
    return c


def raw(url, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
    finally:
        conn.close()


def chat(c, prompt, stream=False, **kw):
    """The answer text (streamed pieces joined when stream) and the final object/chunks."""
    msgs = [{"role": "user", "content": prompt}]
    kw.setdefault("temperature", 0)
    if not stream:
        r = c.chat.completions.create(model=kw.pop("model", c.served_model), messages=msgs, **kw)
        return r.choices[0].message.content, r
    chunks = list(c.chat.completions.create(model=kw.pop("model", c.served_model), messages=msgs, stream=True, **kw))
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks


# ---- the basics -----------------------------------------------------------------------
def test_models_and_health(served):
    url, server = served
    models = client(url).models.list().data
    assert [m.id for m in models] == [server.model_id]
    assert client(url).models.retrieve(server.model_id).id == server.model_id
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-17")
    status, _, body = raw(url, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["queue_length"] == 0 and body["model"] == server.model_id


def test_chat_and_completion(served, tiny_backbone):
    url, server = served
    c = client(url, server.model_id)
    text, r = chat(c, PROMPTS[1], max_tokens=20)
    assert isinstance(text, str) and r.object == "chat.completion" and r.model == server.model_id
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    prompt_ids = tiny_backbone.encode_prompt(PROMPTS[1])
    assert u.prompt_tokens == len(prompt_ids) and 1 <= u.completion_tokens <= 20
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    ext = r.to_dict()["clp"]
    assert ext["method"] == "verified" and ext["forward_passes"] >= 1 and ext["tokens_per_forward"] > 0
    assert ext["accepted_per_step"]["steps"] == sum(ext["accepted_per_step"]["histogram"].values())

    comp = c.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert comp.object == "text_completion" and isinstance(comp.choices[0].text, str)
    assert comp.usage.prompt_tokens == len(tiny_backbone.encode_prompt("Once upon a time", chat=False))
    assert comp.usage.completion_tokens <= 12
    # The chat answer is what the library gives for the same prompt.
    import clpdecode as clp

    ref = clp.generate_text(tiny_backbone, PROMPTS[1], method="ar", max_new_tokens=20)
    assert text == ref.text and u.completion_tokens == ref.new_tokens


def test_stream_equals_non_stream(served):
    url, server = served
    c = client(url, server.model_id)
    for prompt in PROMPTS[:2]:
        full, r = chat(c, prompt, max_tokens=40)
        streamed, chunks = chat(c, prompt, stream=True, max_tokens=40, stream_options={"include_usage": True})
        assert streamed == full
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
        assert finals[0].to_dict()["clp"]["forward_passes"] == r.to_dict()["clp"]["forward_passes"]
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    comp = c.completions.create(model=server.model_id, prompt="The sea", max_tokens=30, temperature=0)
    pieces = c.completions.create(model=server.model_id, prompt="The sea", max_tokens=30, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == comp.choices[0].text


def test_verified_token_identical_to_ar(served):
    url, server = served
    c = client(url, server.model_id)
    for prompt in PROMPTS:
        outs = {m: chat(c, prompt, max_tokens=48, extra_body={"method": m})[1] for m in ("ar", "verified")}
        ar, ver = outs["ar"], outs["verified"]
        assert ver.choices[0].message.content == ar.choices[0].message.content
        assert ver.usage.completion_tokens == ar.usage.completion_tokens
        assert ar.to_dict()["clp"]["method"] == "ar" and ver.to_dict()["clp"]["method"] == "verified"
        assert ver.to_dict()["clp"]["forward_passes"] <= ar.to_dict()["clp"]["forward_passes"]
    # Other methods and a per-request threshold are served too.
    r = chat(c, PROMPTS[0], max_tokens=16, extra_body={"method": "clp", "clp_threshold": 0.2})[1]
    assert r.to_dict()["clp"]["method"] == "clp"


def test_stop_strings_cut_like_openai(served):
    url, server = served
    c = client(url, server.model_id)
    full, _ = chat(c, PROMPTS[1], max_tokens=40)
    stop = full[6:8]
    assert len(stop) == 2
    want = full[: full.find(stop)]
    text, r = chat(c, PROMPTS[1], max_tokens=40, stop=[stop, "\x00never"])
    assert text == want and r.choices[0].finish_reason == "stop"
    streamed, _ = chat(c, PROMPTS[1], stream=True, max_tokens=40, stop=stop)
    assert streamed == want


def test_extreme_sampling_settings_are_greedy(served):
    """A tiny temperature or top_p leaves only the argmax (no nan, no 500)."""
    url, server = served
    c = client(url, server.model_id)
    greedy, _ = chat(c, PROMPTS[3], max_tokens=24)
    assert chat(c, PROMPTS[3], max_tokens=24, temperature=1e-30, seed=5)[0] == greedy
    assert chat(c, PROMPTS[3], max_tokens=24, temperature=1e-300, seed=5)[0] == greedy  # 0 in float32: was a 500
    assert chat(c, PROMPTS[3], max_tokens=24, temperature=1.0, top_p=1e-300, seed=5)[0] == greedy
    sampled = chat(c, PROMPTS[3], max_tokens=24, temperature=1.0, seed=2**64 - 1,
                   extra_body={"method": "verified"})[1]
    assert sampled.usage.completion_tokens >= 1


# ---- errors ---------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,status,param", [
    (CHAT, {"max_tokens": 4}, 422, "messages"),  # missing messages
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": MSG, "max_tokens": "many"}, 422, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": True}, 422, "max_tokens"),
    (CHAT, {"messages": "hi"}, 422, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, 422, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),  # prompt > window
    (CHAT, {"messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 100}, 400, "max_tokens"),
    (COMP, {"prompt": ""}, 400, "prompt"),
    (COMP, {"prompt": "x" * 300}, 400, "prompt"),  # over the window
    (COMP, {"prompt": ["a", "b"]}, 400, "prompt"),
    (COMP, {}, 422, "prompt"),
    (CHAT, {"messages": MSG, "method": "telepathy"}, 400, "method"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 100000}, 400, "max_tokens"),  # over the 256-token window
    (COMP, {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "temperature": -1}, 400, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": MSG, "clp_threshold": 2}, 400, "clp_threshold"),
    (CHAT, {"messages": MSG, "seed": 2**70, "temperature": 1}, 400, "seed"),
    (CHAT, {"messages": MSG, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": MSG, "n": 3}, 400, "n"),
    (CHAT, {"messages": MSG, "model": "gpt-17"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(served, path, body, status, param):
    url, _ = served
    got, _, resp = raw(url, "POST", path, body)
    assert got == status, resp
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_a_chat_templates_refusal_is_a_bad_request(served, monkeypatch):
    """A template that raises (jinja's raise_exception, e.g. roles out of order) is the
    request's fault: 400 on messages, with the template's words (Backbone.encode_chat)."""
    url, server = served

    def refuse(*a, **kw):
        raise ValueError("Conversation roles must alternate user/assistant")

    monkeypatch.setattr(server.backbone.tokenizer, "apply_chat_template", refuse)
    got, _, resp = raw(url, "POST", CHAT, {"messages": MSG})
    assert got == 400 and resp["error"]["param"] == "messages"
    assert "chat template refused" in resp["error"]["message"] and "must alternate" in resp["error"]["message"]


def test_bad_bodies_and_routes(served):
    url, server = served
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe\x00", 400), (b"", 400),
                         (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
                         (json.dumps({"messages": MSG, "pad": "x" * 70_000}).encode(), 413)]:
        got, _, resp = raw(url, "POST", CHAT, body)
        assert got == status and resp["error"]["type"], (body[:20], resp)
    got, _, resp = raw(url, "GET", "/v1/nothing-here")
    assert got == 404 and "error" in resp
    got, _, resp = raw(url, "GET", CHAT)
    assert got == 405 and "error" in resp
    # The openai client maps them to its own exceptions.
    c = client(url, server.model_id)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-17", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=server.model_id, messages=MSG, temperature=float("-1"))
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=server.model_id, prompt="", max_tokens=3)


def test_deeply_nested_json_is_a_bad_request(served):
    """~2 KB of nested arrays: 400 like other bad JSON (not a 500 from a RecursionError),
    and the keep-alive connection goes on serving."""
    url, server = served
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for key in ("messages", "user"):
            deep = b"[" * 1000 + b"]" * 1000
            body = b'{"%s": %s' % (key.encode(), deep) + (b"}" if key == "messages" else b', "messages": []}')
            conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            err = json.loads(resp.read())["error"]
            assert resp.status == 400 and err["code"] == "invalid_json", err
            assert set(err) == {"message", "type", "param", "code"}
            conn.request("POST", CHAT, body=json.dumps({"messages": MSG, "max_tokens": 2}).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()  # the same connection
            assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] >= 1
    finally:
        conn.close()


def test_api_key(tiny_backbone, drafter):
    from clpdecode.serve import create_app

    app = create_app(tiny_backbone, drafter, api_key="s3cret")
    with running(app) as url:
        model = app.state.server.model_id
        for key in ("wrong", "s3cre", "s3cret2"):
            with pytest.raises(openai.AuthenticationError):
                client(url, model, api_key=key).chat.completions.create(model=model, messages=MSG, max_tokens=2)
        for headers in ({}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}):
            got, _, resp = raw(url, "GET", "/v1/models", headers=headers)
            assert got == 401 and resp["error"]["code"] == "invalid_api_key"
        assert raw(url, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        got, _, resp = raw(url, "POST", CHAT, b"not even json")  # the key is checked first
        assert got == 401
        r = client(url, model, api_key="s3cret").chat.completions.create(model=model, messages=MSG, max_tokens=2)
        assert r.usage.completion_tokens >= 1
        assert raw(url, "GET", "/health")[0] == 200  # health needs no key


# ---- queue, cancellation, failures ---------------------------------------------------
def slow_steps(monkeypatch, delay):
    """Every step of every scheduler takes `delay` seconds more."""
    from clpdecode.decoding.scheduler import Scheduler

    real = Scheduler.step

    def step(self):
        time.sleep(delay)
        return real(self)

    monkeypatch.setattr(Scheduler, "step", step)


def wait_for(url, pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = raw(url, "GET", "/health")[2]
        if pred(health):
            return health
        time.sleep(0.02)
    raise AssertionError(f"timed out; /health: {health}")


def test_full_queue_503_and_disconnect_cancels(tiny_backbone, drafter, monkeypatch):
    from clpdecode.serve import create_app

    slow_steps(monkeypatch, 0.04)
    app = create_app(tiny_backbone, drafter, policy=PolicyConfig(method="ar"), max_queue=1, parallel=1)
    with running(app) as url:
        model = app.state.server.model_id
        c = client(url, model)
        # A: a long streamed answer, running; B: waits in the queue; C: refused.
        stream = c.chat.completions.create(model=model, messages=MSG, max_tokens=200, stream=True, temperature=0)
        it = iter(stream)
        next(it)
        next(it)
        wait_for(url, lambda h: h["running"])
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(c.chat.completions.create, model=model, messages=MSG, max_tokens=2)
            wait_for(url, lambda h: h["queue_length"] == 1)
            status, headers, resp = raw(url, "POST", CHAT, {"messages": MSG, "max_tokens": 2})
            assert status == 503 and int(headers["retry-after"]) >= 1 and resp["error"]["code"] == "queue_full"
            with pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(model=model, messages=MSG, max_tokens=2)
            assert e.value.status_code == 503
            # A's client goes away: its generation ends at once, and B runs.
            t0 = time.time()
            stream.close()
            health = wait_for(url, lambda h: h["cancelled"] == 1 and h["completed"] == 1)
            assert time.time() - t0 < 5  # A alone would take 200 x 40 ms
            assert b.result(timeout=10).usage.completion_tokens >= 1
        assert health["rejected"] == 2 and health["queue_length"] == 0 and not health["running"]
        # A non-streaming client that goes away is noticed too (its response is never read).
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"messages": MSG, "max_tokens": 200}).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(url, lambda h: h["running"])
        health = wait_for(url, lambda h: h["cancelled"] == 2 and not h["running"], timeout=5)
        assert health["completed"] == 1


def test_failing_generation_does_not_kill_the_server(served, monkeypatch):
    from clpdecode.decoding.loop import Decoder

    url, server = served
    c = client(url, server.model_id)

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(Decoder, "propose", broken)
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model=server.model_id, messages=MSG, max_tokens=4)
    assert "boom" in e.value.message
    with pytest.raises(openai.APIError):
        list(c.chat.completions.create(model=server.model_id, messages=MSG, max_tokens=4, stream=True))
    monkeypatch.undo()
    r = c.chat.completions.create(model=server.model_id, messages=MSG, max_tokens=4)
    assert r.usage.completion_tokens >= 1
    assert raw(url, "GET", "/health")[2]["failed"] >= 2


# ---- load -------------------------------------------------------------------------------
def test_load_16_clients(served):
    """16 concurrent clients x 4 requests, streaming and not: all complete, none mixed."""
    url, server = served
    c = client(url, server.model_id)
    want = {p: chat(c, p, max_tokens=16)[0] for p in PROMPTS}

    def one_client(i):
        got = []
        for j in range(4):
            p = PROMPTS[(i + j) % len(PROMPTS)]
            got.append((p, chat(c, p, stream=(i + j) % 2 == 0, max_tokens=16)[0]))
        return got

    t0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(one_client, range(16)) for r in rs]
    assert len(results) == 64 and all(text == want[p] for p, text in results)
    assert time.time() - t0 < 120  # bounded: a hang fails, not a slow machine
    health = raw(url, "GET", "/health")[2]
    assert health["queue_length"] == 0 and not health["running"]


def test_bench_script(served):
    from clpdecode.serve.bench import run

    url, server = served
    out = run(url, clients=4, requests=2, max_tokens=8)
    assert out["requests"] == 8 and out["errors"] == 0 and out["model"] == server.model_id
    assert out["completion_tokens"] >= 8 and out["tokens_per_second"] > 0
    assert 0 < out["latency_p50"] <= out["latency_p99"] and out["ttft_p50"] is not None
    assert out["tokens_per_forward"] >= 1


# ---- the command ------------------------------------------------------------------------
def test_clp_serve_command(tiny_llama_dir, heads_dir, tmp_path, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # Options a user can fix are refused in one line (status 2) before anything slow is loaded.
    from clpdecode.cli import main

    for argv, msg in [(["--port", str(port)], "cannot listen"), (["--max-queue", "0"], "--max-queue"),
                      (["--api-key", " "], "--api-key"), (["--port", "70000"], "--port"),
                      (["--host", "no-such-host.invalid"], "--host")]:
        assert main(["serve", *argv]) == 2
        assert msg in capsys.readouterr().err
    sock.close()
    # --port 0: the OS picks a free port, and the status line (stderr) names the one bound.
    cmd = [sys.executable, "-m", "clpdecode.cli", "serve", "--model", str(tiny_llama_dir), "--heads", str(heads_dir),
           "--numerics", "fp32", "--port", "0", "--api-key", "k", "--max-queue", "4"]
    log, out = open(tmp_path / "serve.log", "w"), open(tmp_path / "stdout.log", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            status = re.search(r"^clp serve: .*: http://127\.0\.0\.1:(\d+)/v1$", (tmp_path / "serve.log").read_text(),
                               re.M)
            if status:
                break
            assert time.time() < deadline, "clp serve did not start"
            time.sleep(0.2)
        port = int(status.group(1))
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        assert raw(url, "GET", "/health")[0] == 200  # listening once the line is printed
        status, _, resp = raw(url, "POST", CHAT, {"model": str(tiny_llama_dir), "messages": MSG, "max_tokens": 5},
                              headers={"Authorization": "Bearer k"})
        assert status == 200 and resp["clp"]["method"] == "verified", resp
        assert raw(url, "GET", "/health")[2]["max_queue"] == 4
        # Ctrl-C reaches uvicorn's graceful shutdown (the HTTP server runs on a thread of its
        # own; the steps run on the main thread, serve/cli.py _run), and the command ends with 0.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
        log.close()
        out.close()
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    # Status and access log lines go to stderr; the server has no result for stdout.
    assert "POST /v1/chat/completions" in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "stdout.log").read_text() == ""


# ---- continuous batching -----------------------------------------------------------------
def test_concurrent_requests_with_their_own_settings_get_their_texts_alone(tmp_path_factory):
    """The batched step (q4 kernels): 12 requests at once, each with its own method, sampling,
    stop strings and budget, get exactly the text each gets alone (generate()); /metrics and
    /health report the scheduler."""
    from clpdecode.backbone import kernels, load_backbone
    from clpdecode.decoding import GenerationConfig, SamplingConfig, generate, make_policy
    from clpdecode.serve import create_app

    from conftest import save_tiny_model

    if kernels.load(quiet=True) is None:
        pytest.skip("no C++ kernels")
    path = save_tiny_model(tmp_path_factory.mktemp("serve-q4"), "llama", seed=2, hidden_size=128, heads=2, kv_heads=1)
    bb = load_backbone(str(path), numerics="q4")
    drafter = random_drafter(bb, k=3, design="chained", seed=5)
    app = create_app(bb, drafter, policy=PolicyConfig(method="verified"), parallel=4)
    assert app.state.server.scheduler.batched
    jobs = [(PROMPTS[i % 4], m, t, seed) for i, (m, t, seed) in enumerate(
        [("verified", 0, 0), ("ar", 0, 0), ("clp", 0, 0), ("verified", 1.0, 3), ("naive", 0, 0), ("ar", 0.8, 9)] * 2)]

    def alone(prompt, method, temperature, seed):
        ids = bb.encode_chat([{"role": "user", "content": prompt}])
        cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingConfig(temperature=temperature, seed=seed))
        return bb.decode(generate(bb, ids, make_policy(method, bb, drafter), cfg).token_ids)

    with running(app) as url:
        c = client(url, app.state.server.model_id)
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda j: chat(c, j[0], max_tokens=24, temperature=j[2], seed=j[3],
                                              extra_body={"method": j[1]})[0], jobs))
        assert got == [alone(*j) for j in jobs]
        health = raw(url, "GET", "/health")[2]
        assert health["completed"] == 12 and health["slots"] == 4 and health["rows_per_step"] > 1
        status, _, text = raw(url, "GET", "/metrics")
        assert status == 200 and "clp_completed 12" in text and "clp_rows_per_step" in text


def test_logprobs_and_unsupported_fields(served, tiny_backbone, drafter):
    """Issue 27: logprobs were answered null; tools, echo, suffix, best_of were dropped silently."""
    from clpdecode.decoding import GenerationConfig, generate, make_policy

    url, server = served
    c = client(url, server.model_id)
    r = c.chat.completions.create(model=server.model_id, messages=MSG, max_tokens=12, temperature=0,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = tiny_backbone.encode_chat(MSG)
    alone = generate(tiny_backbone, ids, make_policy("ar"), GenerationConfig(max_new_tokens=12, logprobs=3))
    assert len(content) == r.usage.completion_tokens == len(alone.token_ids)
    for got, want in zip(content, alone.logprobs):  # verified's log-probabilities are AR's (float noise aside)
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4) and len(got.top_logprobs) == 3
        assert got.top_logprobs[0].logprob >= got.logprob - 1e-4  # greedy: the token is the likeliest
    chunks = list(c.chat.completions.create(model=server.model_id, messages=MSG, max_tokens=12, temperature=0,
                                            logprobs=True, stream=True))
    last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][0]
    assert [x.logprob for x in last.choices[0].logprobs.content] == [x.logprob for x in content]
    comp = c.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=6, temperature=0,
                                logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert c.chat.completions.create(model=server.model_id, messages=MSG, max_tokens=4).choices[0].logprobs is None
    for body, field in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                        ({"tool_choice": "auto"}, "tool_choice"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"logprobs": True, "top_logprobs": 99}, "top_logprobs")]:
        status, _, resp = raw(url, "POST", CHAT, {"messages": MSG, "max_tokens": 2, **body})
        assert status == 400 and resp["error"]["param"] == field, (body, resp)
    for body, field in [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                        ({"logprobs": -1}, "logprobs")]:
        status, _, resp = raw(url, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
        assert status == 400 and resp["error"]["param"] == field, (body, resp)
    status, _, _ = raw(url, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": False, "best_of": 1})
    assert status == 200


def test_stopping_mid_batch_cancels_every_request_cleanly(tiny_backbone, drafter, monkeypatch):
    """Ctrl-C (uvicorn's shutdown: the app's lifespan ends, Server.stop) while requests run and
    wait: the worker ends at once, running and waiting requests are cancelled (no 500s, nothing
    left in the scheduler), and the clients see their streams end."""
    from clpdecode.serve import create_app

    slow_steps(monkeypatch, 0.1)  # a 200-token answer takes 20 s
    app = create_app(tiny_backbone, drafter, policy=PolicyConfig(method="verified"), parallel=2)
    server = app.state.server
    results = []
    with running(app) as url:
        c = client(url, server.model_id)

        def one(i):
            try:
                return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                    model=server.model_id, messages=MSG, max_tokens=200, stream=True, temperature=0)
                    if ch.choices)
            except Exception as e:  # noqa: BLE001 - a connection cut by the shutdown
                return e

        pool = ThreadPoolExecutor(4)
        futures = [pool.submit(one, i) for i in range(4)]
        wait_for(url, lambda h: h["running"] == 2 and h["queue_length"] == 2)
        t0 = time.time()
    assert time.time() - t0 < 8  # the shutdown did not wait for the answers
    results = [f.result(timeout=30) for f in futures]
    pool.shutdown()
    sched = server.scheduler
    assert not sched.running and not sched.waiting and sorted(sched.free) == [0, 1]
    assert sched.stats["failed"] == 0 and sched.stats["cancelled"] == 4
    assert len(results) == 4


def test_slow_and_vanishing_clients(tiny_backbone, drafter, monkeypatch, caplog):
    """Issue 27 item 9: a client that sends part of its headers or body no longer holds the
    connection (closed / 408), and one that goes away mid-body is one log line, not three
    tracebacks."""
    import logging

    import clpdecode.serve.app as app_mod
    from clpdecode.serve import create_app

    monkeypatch.setattr(app_mod, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(app_mod, "BODY_TIMEOUT_S", 0.5)
    caplog.set_level(logging.INFO, logger="clpdecode.serve")
    app = create_app(tiny_backbone, drafter, policy=PolicyConfig(method="ar"))
    with running(app, http=app_mod.TimedH11Protocol) as url:
        host, port = url.removeprefix("http://").split(":")
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as s:  # headers never finished
            s.sendall(head)
            assert s.recv(100) == b""  # closed by the server
        with socket.create_connection((host, int(port)), timeout=10) as s:  # a body that stops halfway
            s.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"messages": ')
            assert s.recv(100).startswith(b"HTTP/1.1 408")
        with socket.create_connection((host, int(port)), timeout=10) as s:  # a client that goes away mid-body
            s.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"messages": ')
        deadline = time.time() + 5
        while time.time() < deadline and not any("went away" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        # A complete request on a connection is still served in full.
        status, _, body = raw(url, "POST", CHAT, {"messages": MSG, "max_tokens": 3})
        assert status == 200, body
    messages = [r.getMessage() for r in caplog.records if r.name == "clpdecode.serve"]
    assert sum("went away" in m for m in messages) == 1 and sum("headers took" in m for m in messages) == 1
    assert not any(r.levelno >= logging.ERROR for r in caplog.records), messages
