"""Load a running `clp serve` with concurrent OpenAI clients; report latency and throughput.

    python -m clpdecode.serve.bench --url http://127.0.0.1:8000 --clients 16 --requests 4 --max-tokens 64

Each client sends its requests one after another, alternating streamed and plain ones.
Prints one JSON object: p50/p99 end-to-end latency, p50/p99 time to first token (streamed
requests), completion tokens per second over the whole run, and the server's mean
tokens per forward. Needs the `openai` package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = [
    "Give me three tips for sleeping well.",
    "Name three rivers in Europe.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn.",
]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 4)


def run(url: str, clients: int = 16, requests: int = 4, max_tokens: int = 64, method: str | None = None,
        api_key: str = "none", model: str | None = None) -> dict:
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600)
    model = model or client.models.list().data[0].id
    extra = {"method": method} if method else {}

    def one(i: int, j: int) -> dict:
        msgs = [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}]
        t0 = time.perf_counter()
        try:
            if (i + j) % 2 == 0:
                first, tokens, tpf = None, 0, None
                for ch in client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                                         temperature=0, stream=True, extra_body=extra,
                                                         stream_options={"include_usage": True}):
                    if first is None and ch.choices and ch.choices[0].delta.content:
                        first = time.perf_counter() - t0
                    if ch.usage:
                        tokens = ch.usage.completion_tokens
                    ext = (ch.model_extra or {}).get("clp")
                    if ext:
                        tpf = ext["tokens_per_forward"]
                return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens, "tpf": tpf}
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0,
                                               extra_body=extra)
            return {"latency": time.perf_counter() - t0, "ttft": None, "tokens": r.usage.completion_tokens,
                    "tpf": r.model_extra["clp"]["tokens_per_forward"]}
        except openai.APIError as e:
            return {"error": f"{type(e).__name__}: {e}"}

    def client_loop(i: int) -> list[dict]:
        return [one(i, j) for j in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    tpf = [r["tpf"] for r in ok if r["tpf"] is not None]
    return {
        "url": url, "model": model, "method": method or "(server default)", "clients": clients,
        "requests": len(results), "errors": len(results) - len(ok),
        "first_error": next((r["error"] for r in results if "error" in r), None),
        "seconds": round(wall, 3), "completion_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        "latency_p50": _pct(lat, 0.5), "latency_p99": _pct(lat, 0.99),
        "ttft_p50": _pct(ttft, 0.5), "ttft_p99": _pct(ttft, 0.99),
        "tokens_per_forward": round(statistics.mean(tpf), 4) if tpf else None,
    }


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
