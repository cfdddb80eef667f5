"""`clp bench-serve`: `clp serve` under load, beside llama-server on the same GGUF and prompt ids.

For each concurrency C, C clients each send R requests back to back (streamed, greedy, one
prompt each, the same prompts for every C), to a `clp serve` started here on its own port
with the flags given and, with --peers, to `llama-server --parallel N` on the GGUF file the
backbone comes from (its continuous batching is on by default). The sides take turns at each
C, so that a busy machine's drift falls on both. Per side and C: aggregate completion tokens/s
over the wall clock, per-request tokens/s, p50/p99 time to first token and latency, tokens
per forward, and the share of requests whose text equals that side's own single-stream greedy
AR text for the prompt (the references: one client, one request at a time, before the runs,
which also warm both servers up; ours with method ar).

Both sides decode the same prompt token ids: the chat template is applied here and the ids go
to llama-server's /completion. clp serve takes text prompts only (its /v1/completions has no
token-id prompts), so it gets the chat messages and applies the same template itself; the
prompt_tokens it reports are checked against the ids' count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from ..errors import ClpError
from .peers import REQUEST_S, LlamaServerPeer, ServerProcess, _free_port

DEFAULT_CONCURRENCY = "1,2,4,8,16"
OURS, PEER = "clp_serve", "llama_server"
# --also: our other settings, measured beside the main one at every concurrency.
OURS_AR, OURS_OFF = "clp_serve_ar", "clp_serve_off"
LABELS = {OURS: "clp serve", OURS_AR: "clp serve, method ar", OURS_OFF: "clp serve, --spec-budget off",
          PEER: "llama-server"}
ALSO = {"ar": OURS_AR, "off": OURS_OFF}
SIDE_ORDER = (OURS, OURS_AR, OURS_OFF, PEER)

# A first `clp serve` on a machine builds the q4 kernels (~1 min on 2 cores) and may convert
# the GGUF before it listens.
CLP_SERVE_START_S = 900.0


def parse_also(text: str, method: str, budget: str) -> list[str]:
    """--also 'ar,off' -> the sides it adds, refused where one would measure the main side again."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    for v in names:
        if v not in ALSO:
            raise ClpError(f"--also takes ar and/or off, got {v!r}")
    if "ar" in names and method == "ar":
        raise ClpError("--also ar: the main side already runs --method ar")
    if "off" in names and (method != "verified" or budget == "off"):
        raise ClpError("--also off: the row budget only changes --method verified with --spec-budget auto")
    return [ALSO[v] for v in dict.fromkeys(names)]


def _row_order(row: dict) -> tuple[int, int]:
    """Report order: by concurrency, then the sides as SIDE_ORDER lists them."""
    return row["concurrency"], SIDE_ORDER.index(row["side"])


def status(msg: str) -> None:
    print(f"clp bench-serve: {msg}", file=sys.stderr, flush=True)


# ---- statistics ------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of xs, linear between the closest ranks (numpy's default); None
    for no values."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


@dataclass
class Reply:
    """One streamed answer, timed from sending the request."""

    ttft: float | None  # the first chunk that carried text (ours) or tokens (llama-server)
    latency: float
    tokens: int
    text: str
    forwards: int | None = None  # the forwards its tokens took (ours: the `clp` extension)
    prompt_tokens: int | None = None


@dataclass
class RequestRun:
    client: int
    prompt: int  # index into the side's prompts
    start: float  # seconds after the run began
    reply: Reply | None = None
    error: str | None = None


def summarize(runs: list[RequestRun], wall: float, references: dict[int, str] | None = None) -> dict:
    """A run's figures: aggregate completion tokens/s over `wall`, per-request tokens/s, p50/p99
    time to first token and latency, tokens per forward (where the side reports forwards) and,
    with `references` (prompt index -> text), the share of answers equal to their reference."""
    ok = [r for r in runs if r.reply is not None]
    replies = [r.reply for r in ok]
    tokens = sum(r.tokens for r in replies)
    latency = [r.latency for r in replies]
    ttft = [r.ttft for r in replies if r.ttft is not None]
    per_request = [r.tokens / r.latency for r in replies if r.latency > 0]
    counted = [r for r in replies if r.forwards]
    out = {
        "requests": len(runs), "errors": len(runs) - len(ok), "seconds": _r(wall, 3), "completion_tokens": tokens,
        "tokens_per_s": _r(tokens / wall, 2) if wall > 0 else None,
        "request_tokens_per_s_p50": _r(percentile(per_request, 0.5), 2),
        "request_tokens_per_s_mean": _r(sum(per_request) / len(per_request), 2) if per_request else None,
        "ttft_p50": _r(percentile(ttft, 0.5)), "ttft_p99": _r(percentile(ttft, 0.99)),
        "latency_p50": _r(percentile(latency, 0.5)), "latency_p99": _r(percentile(latency, 0.99)),
        "tokens_per_forward": _r(sum(r.tokens for r in counted) / sum(r.forwards for r in counted))
        if counted else None,
    }
    errors = [r.error for r in runs if r.error is not None]
    if errors:
        out["first_error"] = errors[0]
    if references is not None:
        judged = [r for r in ok if r.prompt in references]
        same = sum(r.reply.text == references[r.prompt] for r in judged)
        out["same_as_single_stream_ar"] = _r(same / len(judged)) if judged else None
        out["same_as_single_stream_ar_count"] = [same, len(judged)]
    return out


# ---- clients ---------------------------------------------------------------------------
class RequestFailed(Exception):
    """A request answered with an error status or an error event."""


def post_events(url: str, path: str, body: dict, headers: dict | None = None,
                timeout: float = REQUEST_S) -> Iterator[dict]:
    """POST a streamed request; yield each server-sent event's JSON until [DONE] or the end."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", parts.path.rstrip("/") + path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RequestFailed(f"HTTP {resp.status}: {resp.read()[:200].decode(errors='replace')}")
        for line in resp:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                raise RequestFailed(err.get("message", str(err)) if isinstance(err, dict) else str(err))
            yield event
    finally:
        conn.close()


def get_json(url: str, path: str, headers: dict | None = None, timeout: float = 30) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + path, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RequestFailed(f"GET {path}: HTTP {resp.status}: {raw[:200].decode(errors='replace')}")
        return json.loads(raw)
    finally:
        conn.close()


class ClpServeClient:
    """Streamed greedy requests to a `clp serve` at `url`: chat messages (the template applied
    by the server), or plain-text prompts for a backbone without a chat template."""

    def __init__(self, url: str, model: str, prompts: list[str], max_new_tokens: int, chat: bool = True,
                 method: str | None = None, api_key: str | None = None):
        self.url, self.model, self.prompts, self.max_new_tokens = url, model, prompts, max_new_tokens
        self.chat, self.method = chat, method
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def request(self, i: int, method: str | None = None) -> Reply:
        prompt = ({"messages": [{"role": "user", "content": self.prompts[i]}]} if self.chat
                  else {"prompt": self.prompts[i]})
        method = method or self.method
        body = {"model": self.model, **prompt, "max_tokens": self.max_new_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}, **({"method": method} if method else {})}
        t0 = time.perf_counter()
        ttft, pieces, tokens, forwards, prompt_tokens = None, [], 0, None, None
        for event in post_events(self.url, "/v1/chat/completions" if self.chat else "/v1/completions", body,
                                 self.headers):
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    pieces.append(piece)
            if event.get("clp"):
                forwards = event["clp"]["forward_passes"]
            if event.get("usage"):
                tokens, prompt_tokens = event["usage"]["completion_tokens"], event["usage"]["prompt_tokens"]
        return Reply(ttft, time.perf_counter() - t0, tokens, "".join(pieces), forwards, prompt_tokens)

    def reference(self, i: int) -> Reply:
        return self.request(i, method="ar")

    def counters(self) -> dict:
        return get_json(self.url, "/health", self.headers)

    def served_model(self) -> str:
        return get_json(self.url, "/v1/models", self.headers)["data"][0]["id"]


class LlamaServerClient:
    """Streamed greedy requests to llama-server's /completion with the prompts' token ids."""

    def __init__(self, url: str, ids: list[list[int]], max_new_tokens: int):
        self.url, self.ids, self.max_new_tokens = url, ids, max_new_tokens

    def request(self, i: int) -> Reply:
        body = LlamaServerPeer.completion_body(self.ids[i], self.max_new_tokens, stream=True)
        t0 = time.perf_counter()
        ttft, pieces, tokens = None, [], []
        for event in post_events(self.url, "/completion", body):
            new, piece = event.get("tokens") or [], event.get("content") or ""
            if (new or piece) and ttft is None:
                ttft = time.perf_counter() - t0
            tokens += new
            pieces.append(piece)
        n = min(len(tokens), self.max_new_tokens)  # it may run over by a partial character
        # Its plain AR decoding: one forward per token.
        return Reply(ttft, time.perf_counter() - t0, n, "".join(pieces), forwards=n)

    reference = request

    def counters(self) -> None:
        return None


def run_clients(request: Callable[[int], Reply], clients: int, per_client: int,
                prompt_of: Callable[[int, int], int]) -> tuple[list[RequestRun], float]:
    """`clients` threads, each sending `per_client` requests back to back (request j of client
    c asks prompt_of(c, j)); every request's run, and the wall clock of the whole."""
    t0 = time.perf_counter()

    def client(c: int) -> list[RequestRun]:
        runs = []
        for j in range(per_client):
            run = RequestRun(c, prompt_of(c, j), time.perf_counter() - t0)
            try:
                run.reply = request(run.prompt)
            except (OSError, http.client.HTTPException, RequestFailed, ValueError) as e:
                run.error = f"{type(e).__name__}: {e}"
            runs.append(run)
        return runs

    with ThreadPoolExecutor(clients) as pool:
        runs = [r for rs in pool.map(client, range(clients)) for r in rs]
    return runs, time.perf_counter() - t0


# Per-run figures a side's rows at one concurrency report as their median over the rounds.
MEDIAN_KEYS = ("seconds", "tokens_per_s", "request_tokens_per_s_p50", "request_tokens_per_s_mean", "ttft_p50",
               "ttft_p99", "latency_p50", "latency_p99", "tokens_per_forward")


def median_rows(runs: list[dict]) -> list[dict]:
    """One row per side and concurrency from its rounds (`clp bench-serve --repeats`): the
    median of each per-run figure, every round's aggregate tokens/s (tokens_per_s_rounds),
    counts summed (requests, errors, tokens, texts judged, the scheduler's steps, rows and
    drafts), the largest resident memory. One round: its own figures."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["side"], r["concurrency"]), []).append(r)
    rows = []
    for (side, c), rs in groups.items():
        row = {"side": side, "concurrency": c, "rounds": len(rs),
               "tokens_per_s_rounds": [r["tokens_per_s"] for r in rs]}
        for key in MEDIAN_KEYS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = _r(statistics.median(vals), 4) if vals else None
        for key in ("requests", "errors", "completion_tokens"):
            row[key] = sum(r[key] for r in rs)
        errors = [r["first_error"] for r in rs if "first_error" in r]
        if errors:
            row["first_error"] = errors[0]
        if all("same_as_single_stream_ar_count" in r for r in rs):
            same = sum(r["same_as_single_stream_ar_count"][0] for r in rs)
            judged = sum(r["same_as_single_stream_ar_count"][1] for r in rs)
            row["same_as_single_stream_ar"] = _r(same / judged) if judged else None
            row["same_as_single_stream_ar_count"] = [same, judged]
        rss = [r["server_rss_mb"] for r in rs if r.get("server_rss_mb") is not None]
        row["server_rss_mb"] = max(rss) if rss else None
        if all("scheduler" in r for r in rs):
            sched = [r["scheduler"] for r in rs]
            steps = sum(x["steps"] for x in sched)
            drafted, kept = sum(x["drafted"] for x in sched), sum(x["kept"] for x in sched)
            rows_run = sum((x["rows_per_step"] or 0) * x["steps"] for x in sched)
            row["scheduler"] = {"steps": steps, "rows_per_step": _r(rows_run / steps, 3) if steps else None,
                                "drafted": drafted, "kept": kept, "kept_share": _r(kept / drafted) if drafted else None}
        rows.append(row)
    return rows


def scheduler_delta(before: dict, after: dict) -> dict:
    """What our scheduler did between two /health snapshots: steps, rows per step, drafted and
    kept tokens (its rows_per_step is a running mean: rows are recovered from it and steps)."""
    steps = after["steps"] - before["steps"]
    rows = after["rows_per_step"] * after["steps"] - before["rows_per_step"] * before["steps"]
    drafted, kept = after["drafted"] - before["drafted"], after["kept"] - before["kept"]
    return {"steps": steps, "rows_per_step": _r(rows / steps, 3) if steps else None, "drafted": drafted,
            "kept": kept, "kept_share": _r(kept / drafted) if drafted else None}


def rss_mb(pid: int) -> float | None:
    """A process's resident memory (Linux), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---- the servers -----------------------------------------------------------------------
class ClpServeProcess(ServerProcess):
    """`clp serve` as a child process of this Python on a free port."""

    what = "clp serve"

    @classmethod
    def start(cls, flags: list[str]) -> "ClpServeProcess":
        port = _free_port()
        argv = [sys.executable, "-m", "clpdecode.cli", "serve", *flags, "--port", str(port)]
        proc, log = cls.spawn(argv, "serve", {**os.environ, "PYTHONUNBUFFERED": "1"})
        return cls(proc, port, log, argv)


def serve_flags(args, context: int, max_queue: int) -> list[str]:
    """`clp serve`'s flags for the bench's settings."""
    flags = ["--model", args.model, "--numerics", args.numerics, "--threads", args.threads, "--method", args.method,
             "--parallel", str(args.parallel), "--spec-budget", args.spec_budget, "--context", str(context),
             "--max-queue", str(max_queue)]
    if args.heads is not None:
        flags += ["--heads", args.heads]
    if args.k is not None:
        flags += ["--k", str(args.k)]
    return flags


# ---- the command -----------------------------------------------------------------------
def bench_serve(args) -> int:
    import gc

    import torch

    from ..atomic import atomic_write_text
    from ..backbone import load_backbone
    from ..backbone.loading import source_gguf
    from ..decoding import PolicyConfig
    from ..errors import check_positive_int
    from ..heads import check_drafter
    from .answers import encode_each
    from .bench import prepare_out_dir
    from .cli import _int_list
    from .cpu import cpu_info
    from .peers import close_peers, find_llama_server, server_context
    from .prompts import load_prompts

    # Every check a user can fail comes before a server starts.
    concurrency = _int_list("--concurrency", args.concurrency)
    also = parse_also(getattr(args, "also", ""), args.method, args.spec_budget)
    for flag in ("--requests", "--max-new-tokens", "--parallel", "--repeats"):
        check_positive_int(flag, getattr(args, flag[2:].replace("-", "_")))
    prompts = load_prompts(args.prompts)
    check_drafter(args.model, args.k, args.heads, required=PolicyConfig(method=args.method).needs_drafter)
    binary = None
    if args.peers:
        if source_gguf(args.model) is None:
            raise ClpError(f"--peers: {args.model} was not converted from a GGUF file, which llama-server needs")
        binary, why = find_llama_server()
        if binary is None:
            raise ClpError(f"--peers: {why}")
    out_dir = prepare_out_dir(Path(args.out))
    # clp serve gets --threads as given (auto: a governor that leaves other processes' cores);
    # llama-server has no such mode, so it gets the count: --threads N, or for auto every core
    # this process may use (what auto runs on while nothing else does), as set before the command ran.
    peer_threads = torch.get_num_threads()
    total = max(concurrency) * args.requests
    if args.same_prompts:
        uneven = [c for c in concurrency if total % c]
        if uneven:
            raise ClpError(f"--same-prompts splits {total} requests (the most clients x --requests) over every "
                           f"concurrency's clients: {uneven[0]} clients cannot share them evenly")
    n = min(len(prompts), total)
    if n < total:
        status(f"{args.prompts} has {n} prompts: the requests at {max(concurrency)} clients ask some twice")
    prompts = prompts[:n]

    # The prompts' ids (our tokenizer and chat template) size both sides' slots and go to llama-server.
    status(f"encoding {n} prompts of {args.prompts}")
    backbone = load_backbone(args.model, numerics="fp32", progress=False)
    ids = encode_each(backbone, prompts, backbone.encode_prompt, "prompt", args.max_new_tokens)
    context = server_context(backbone, [len(x) for x in ids], args.max_new_tokens)
    chat, gguf, name = backbone.has_chat, backbone.gguf, backbone.name
    del backbone
    gc.collect()

    command = "clp " + " ".join(shlex.quote(a) for a in args.argv)
    results = {
        "command": command, "cpu": cpu_info(), "backbone": name,
        "settings": {"model": args.model, "numerics": args.numerics, "method": args.method,
                     "parallel": args.parallel, "spec_budget": args.spec_budget, "threads": args.threads,
                     "llama_server_threads": peer_threads if binary is not None else None,
                     "prompts": args.prompts, "n_prompts": n, "concurrency": list(concurrency),
                     "requests_per_client": args.requests, "same_prompts": bool(args.same_prompts),
                     "max_new_tokens": args.max_new_tokens,
                     "repeats": args.repeats,
                     "context_per_slot": context, "peers": bool(args.peers), "also": also},
        "servers": {}, "references": {}, "rows": [], "runs": [],
    }
    servers: list[ServerProcess] = []
    try:
        # One after another: each clp serve times its steps at startup to seed the row budget's
        # cost table, and a table timed while another server loads skews the budget for the
        # whole run (an earlier version started them together: the budget then never drafted
        # at 1 client, 2 drafted tokens in a run where it drafted 579 in-process).
        def start(server: ServerProcess) -> None:
            servers.append(server)
            status(f"starting {server.what}")
            why = server.wait_ready(CLP_SERVE_START_S)
            if why is not None:
                raise ClpError(f"{server.what} did not start: {why}")

        max_queue = max(64, max(concurrency))
        start(ClpServeProcess.start(serve_flags(args, context, max_queue)))
        if OURS_OFF in also:
            off = ClpServeProcess.start(serve_flags(argparse.Namespace(**{**vars(args), "spec_budget": "off"}),
                                                    context, max_queue))
            off.what = LABELS[OURS_OFF]  # in status lines and errors
            start(off)
        if binary is not None:
            start(LlamaServerPeer.start(binary, "llama_server_ar", Path(gguf), peer_threads,
                                        context * args.parallel, parallel=args.parallel))
        procs = {OURS: servers[0]}
        sides = {OURS: ClpServeClient(servers[0].url, args.model, prompts, args.max_new_tokens, chat=chat)}
        if OURS_AR in also:  # the same server; each request asks for method ar
            procs[OURS_AR] = servers[0]
            sides[OURS_AR] = ClpServeClient(servers[0].url, args.model, prompts, args.max_new_tokens, chat=chat,
                                            method="ar")
        if OURS_OFF in also:
            procs[OURS_OFF] = off
            sides[OURS_OFF] = ClpServeClient(off.url, args.model, prompts, args.max_new_tokens, chat=chat)
        if binary is not None:
            procs[PEER] = servers[-1]
            sides[PEER] = LlamaServerClient(servers[-1].url, ids, args.max_new_tokens)
        for side, proc in procs.items():
            results["servers"][side] = {"argv": proc.argv}

        references = {}
        for side, client in sides.items():
            if side in also:  # the same backbone and numerics: the main side's reference (below)
                continue
            status(f"{LABELS[side]}: single-stream greedy AR answers to the {n} prompts, one at a time")
            runs, wall = run_clients(client.reference, 1, n, lambda c, j: j)
            failed = [r for r in runs if r.reply is None]
            if failed:
                raise ClpError(f"{LABELS[side]}: a single-stream request failed: {failed[0].error}")
            mismatch = [r for r in runs if r.reply.prompt_tokens not in (None, len(ids[r.prompt]))]
            if mismatch:
                r = mismatch[0]
                raise ClpError(f"clp serve encoded prompt {r.prompt + 1} as {r.reply.prompt_tokens} tokens, the bench "
                               f"as {len(ids[r.prompt])}: the sides would not decode the same ids")
            references[side] = {r.prompt: r.reply.text for r in runs}
            results["references"][side] = summarize(runs, wall)
        for side in also:
            references[side] = references[OURS]

        for c in concurrency:
            # --same-prompts: every concurrency sends the same max(C) x R requests, split over its
            # clients (request j of client c asks prompt j x C + c); else each client sends R.
            per_client = total // c if args.same_prompts else args.requests
            # --repeats: rounds back to back at each concurrency, the sides' order reversed in
            # every other round, so that the machine's drift falls on every side alike.
            for rnd in range(args.repeats):
                for side in (list(sides) if rnd % 2 == 0 else list(sides)[::-1]):
                    client = sides[side]
                    before = client.counters()
                    runs, wall = run_clients(client.request, c, per_client,
                                             lambda i, j: (j * c + i if args.same_prompts else i * per_client + j) % n)
                    row = {"side": side, "concurrency": c, "round": rnd, **summarize(runs, wall, references[side]),
                           "server_rss_mb": rss_mb(procs[side].proc.pid)}
                    if before is not None:
                        row["scheduler"] = scheduler_delta(before, client.counters())
                    results["runs"].append(row)
                    of = f", round {rnd + 1} of {args.repeats}" if args.repeats > 1 else ""
                    status(f"{LABELS[side]}, {c} client(s){of}: {row['tokens_per_s']} tokens/s, p99 latency "
                           f"{row['latency_p99']} s, {row['errors']} error(s)")
                    results["rows"] = median_rows(results["runs"])
                    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    finally:
        close_peers(servers)
    written = write_load_report(results, out_dir)
    print(load_table(results))
    print(f"\nreport: {written[1]}  (results.json and {written[2].name} beside it)")
    return 0


# ---- the report ------------------------------------------------------------------------
def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def load_table(results: dict) -> str:
    rows = results["rows"]
    peer = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["side"] == PEER}
    lines = ["| side | clients | tok/s (aggregate) | vs llama-server | tok/s per request (p50) | TTFT p50 / p99 s | "
             "latency p50 / p99 s | tokens/forward | = single-stream AR | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=_row_order):
        vs = peer.get(r["concurrency"]) if r["side"] != PEER else None
        ratio = f"{r['tokens_per_s'] / vs:.2f}x" if vs and r["tokens_per_s"] else "-"
        same, judged = r.get("same_as_single_stream_ar_count", [0, 0])
        rounds = r.get("tokens_per_s_rounds") or []
        spread = (f" ({min(rounds):.1f}-{max(rounds):.1f})" if len(rounds) > 1 and None not in rounds else "")
        lines.append(f"| {LABELS[r['side']]} | {r['concurrency']} | {_fmt(r['tokens_per_s'], 1)}{spread} | {ratio} | "
                     f"{_fmt(r['request_tokens_per_s_p50'], 1)} | {_fmt(r['ttft_p50'])} / {_fmt(r['ttft_p99'])} | "
                     f"{_fmt(r['latency_p50'])} / {_fmt(r['latency_p99'])} | {_fmt(r['tokens_per_forward'])} | "
                     f"{same} of {judged} | {r['errors']} |")
    return "\n".join(lines)


def _scheduler_table(rows: list[dict]) -> list[str]:
    ours = [r for r in rows if "scheduler" in r]
    if not ours:
        return []
    lines = ["clp serve's scheduler in each run (from /health):", "",
             "| side | clients | steps | rows per step | drafted | kept | kept share | resident MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(ours, key=_row_order):
        s = r["scheduler"]
        lines.append(f"| {LABELS[r['side']]} | {r['concurrency']} | {s['steps']} | {_fmt(s['rows_per_step'])} | "
                     f"{s['drafted']} | {s['kept']} | {_fmt(s['kept_share'])} | {_fmt(r['server_rss_mb'], 0)} |")
    return lines + [""]


DEFINITIONS = {
    "tok/s (aggregate)": "completion tokens of all requests of the run over its wall clock (first request sent "
                         "to last answer read)",
    "tok/s per request": "a request's completion tokens over its latency",
    "TTFT": "time to first token: from sending the request to the first streamed chunk with text (clp serve) "
            "or tokens (llama-server)",
    "latency": "from sending the request to the end of its stream",
    "tokens/forward": "completion tokens over the forwards that produced them (clp serve: the `clp` extension's "
                      "forward_passes per request; llama-server decodes plain AR, one token per forward)",
    "= single-stream AR": "requests whose text equals that side's own answer to the prompt with one client and "
                          "one request at a time (clp serve with method ar)",
}


def render_load_markdown(results: dict) -> str:
    from .cpu import cpu_summary

    s = results["settings"]
    lines = [
        "# clp serve under load", "",
        f"Command: `{results['command']}`", "",
        f"CPU: {cpu_summary(results['cpu'])}.", "",
        f"Backbone {results['backbone']}, numerics {s['numerics']}, method {s['method']}, --parallel {s['parallel']}, "
        f"--spec-budget {s['spec_budget']}, --threads {s['threads']}, prompts {s['prompts']} "
        f"(n = {s['n_prompts']}, chat template), "
        + (f"the same {max(s['concurrency']) * s['requests_per_client']} requests at every concurrency, split "
           "over its clients, each client's back to back, "
           if s.get("same_prompts") else f"{s['requests_per_client']} request(s) per client back to back, ")
        + f"{s['max_new_tokens']} new tokens at most, greedy, streamed; {s['context_per_slot']} positions per slot."
        + (f" Each side ran {s['repeats']} rounds at each concurrency, back to back, its order among the sides "
           "reversed in every other round: the table gives each figure's median over the rounds, and the "
           "rounds' lowest and highest aggregate tokens/s in brackets (counts are summed)."
           if s.get("repeats", 1) > 1 else ""), "",
        load_table(results), "",
        "![aggregate throughput and p99 latency against concurrency](load.png)", "",
        *_scheduler_table(results["rows"]),
    ]
    if PEER in results["servers"]:
        lines += [f"llama-server, with the same slots and positions per slot and {s['llama_server_threads']} "
                  "threads: "
                  f"`{shlex.join(results['servers'][PEER]['argv'])}`, sent the prompts' token ids (those clp serve "
                  "encodes from the chat messages) on /completion, greedy, without its prompt cache.", ""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_file

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(10, 4))
    for side in SIDE_ORDER:
        rows = sorted((r for r in results["rows"] if r["side"] == side), key=lambda r: r["concurrency"])
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        thr.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=LABELS[side])
        lat.plot(xs, [r["latency_p99"] for r in rows], marker="o", label=LABELS[side])
    levels = results["settings"]["concurrency"]
    for ax, label in ((thr, "aggregate completion tokens/s"), (lat, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_load_report(results: dict, out_dir: Path) -> list[Path]:
    """results.json, report.md and load.png in out_dir."""
    from ..atomic import atomic_write_text

    paths = [atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1)),
             atomic_write_text(out_dir / "report.md", render_load_markdown(results))]
    return paths + [_plot(results, out_dir / "load.png")]
