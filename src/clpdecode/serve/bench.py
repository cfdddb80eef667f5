"""Load a `clp serve` that is already running with concurrent clients; print one JSON object.

    python -m clpdecode.serve.bench --url http://127.0.0.1:8000 --clients 16 --requests 4 --max-tokens 64

Each client sends its requests one after another (streamed, greedy). The object holds p50/p99
end-to-end latency, p50/p99 time to first token, completion tokens per second over the whole
run and the requests' tokens per forward. `clp bench-serve` is the full benchmark: it starts
its own servers, runs each concurrency, compares llama-server on the same ids and writes a
report; this measures a server someone else started, with the same clients and statistics
(clpdecode.evaluation.load).
"""

from __future__ import annotations

import argparse
import json
import sys

PROMPTS = [
    "Give me three tips for sleeping well.",
    "Name three rivers in Europe.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn.",
]


def run(url: str, clients: int = 16, requests: int = 4, max_tokens: int = 64, method: str | None = None,
        api_key: str = "none", model: str | None = None) -> dict:
    from ..evaluation.load import ClpServeClient, run_clients, summarize

    client = ClpServeClient(url, model or "", PROMPTS, max_tokens, method=method, api_key=api_key)
    client.model = model or client.served_model()
    runs, wall = run_clients(client.request, clients, requests, lambda c, j: (c + j) % len(PROMPTS))
    s = summarize(runs, wall)
    return {"url": url, "model": client.model, "method": method or "(server default)", "clients": clients,
            "requests": s["requests"], "errors": s["errors"], "first_error": s.get("first_error"),
            "seconds": s["seconds"], "completion_tokens": s["completion_tokens"],
            "tokens_per_second": s["tokens_per_s"],
            **{k: s[k] for k in ("latency_p50", "latency_p99", "ttft_p50", "ttft_p99", "tokens_per_forward")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clpdecode.serve.bench", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    p.add_argument("--method", default=None, help="the method field of each request (default: the server's)")
    p.add_argument("--api-key", default="none", help="the server's --api-key, if any")
    args = p.parse_args(argv)
    for name in ("clients", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        out = run(args.url, args.clients, args.requests, args.max_tokens, args.method, args.api_key)
    except Exception as e:  # noqa: BLE001 - the server is not there, or refuses us
        print(f"bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
