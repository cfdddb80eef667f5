"""`clp serve`: load the backbone and drafter once, then answer OpenAI API requests."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from ..decoding.scheduler import BUDGETS, DEFAULT_MAX_PREFILL_ROWS, DEFAULT_MAX_ROWS, DEFAULT_SLOTS
from ..errors import ClpError, check_positive_int


def add_serve_command(sub, add_model_args, add_drafter_args, add_policy_args) -> None:
    from ..decoding import METHODS

    s = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat, completions, streaming)",
        description="Serve the backbone over the OpenAI API: POST /v1/chat/completions, POST /v1/completions, "
                    "GET /v1/models, GET /health, GET /metrics. Up to --parallel requests decode together "
                    "(continuous batching: one forward a step for all, each request's text the same as alone); "
                    "others wait in a queue. A request may choose its own method, clp_threshold and "
                    "gate_threshold (extension fields).")
    add_model_args(s)
    add_drafter_args(s)
    s.add_argument("--method", default="verified", choices=METHODS,
                   help="method of requests that name none (default: verified, identical to ar)")
    add_policy_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--api-key", default=os.environ.get("CLP_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $CLP_API_KEY if set, "
                        "which keeps the key out of the process list; else no key)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a free slot; more get 503 with Retry-After (default: 64)")
    s.add_argument("--parallel", type=int, default=DEFAULT_SLOTS,
                   help="requests decoded together, each in its own cache slot (default: %(default)s: on a "
                        "2-core CPU the step's rows keep paying up to about 8-16)")
    s.add_argument("--spec-budget", default="auto", choices=BUDGETS,
                   help="auto: greedy verified requests draft only the rows CLP expects to pay for, weighed "
                        "against the measured cost of a row (drafting falls as load rises); off: each request "
                        "drafts as it would alone (default: auto)")
    s.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help="rows in one step at most while a request decodes: longer prompts are fed in chunks, "
                        "so that a new prompt stalls the others' next tokens briefly (default: %(default)s)")
    s.add_argument("--max-prefill-rows", type=int, default=DEFAULT_MAX_PREFILL_ROWS,
                   help="rows in one step at most while no request decodes: a burst's prompts run together "
                        "(default: %(default)s)")
    s.add_argument("--context", type=int, default=None,
                   help="positions per slot (a request's prompt + max_tokens must fit); the slots' cache is "
                        "allocated once: slots x context x (23 KB for SmolLM2) (default: the model's window, at "
                        "most 4096)")
    s.set_defaults(func=cmd_serve)


def _check_port(host: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ClpError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ClpError(f"--host {host!r} cannot be resolved: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ClpError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _stderr_logging() -> dict:
    """uvicorn's logging config with its access log on stderr too (uvicorn writes that one
    to stdout): the server's log lines are status, and stdout carries results only."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    return config


def cmd_serve(args) -> int:
    check_positive_int("--max-queue", args.max_queue)
    check_positive_int("--parallel", args.parallel)
    check_positive_int("--max-rows", args.max_rows)
    check_positive_int("--max-prefill-rows", args.max_prefill_rows)
    if args.context is not None:
        check_positive_int("--context", args.context)
    if args.api_key is not None and not args.api_key.strip():
        raise ClpError("--api-key must not be empty")
    _check_port(args.host, args.port)  # before the slow load
    from ..heads import check_drafter, resolve_drafter

    # With --method ar (and no --heads) the drafter is optional: requests may still pick
    # another method, and are refused if it needs the drafter that is missing.
    needs = args.policy.needs_drafter
    check_drafter(args.model, args.k, args.heads, required=needs)
    try:
        import uvicorn

        from .app import TimedH11Protocol, create_app
    except ImportError as e:
        raise ClpError(f"clp serve needs fastapi and uvicorn ({e}); run `make setup`") from None
    from ..backbone import load_backbone

    backbone = load_backbone(args.model, numerics=args.numerics)
    drafter = resolve_drafter(backbone, args.k, args.heads, required=needs)
    app = create_app(backbone, drafter, aliases=(args.model,), policy=args.policy, api_key=args.api_key,
                     max_queue=args.max_queue, parallel=args.parallel, spec_budget=args.spec_budget,
                     context=args.context, max_rows=args.max_rows, max_prefill_rows=args.max_prefill_rows,
                     steps_in_caller=True)
    served = app.state.server

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:  # the status line names the port bound (with --port 0, the one the OS chose)
                port = self.servers[0].sockets[0].getsockname()[1]
                host = f"[{args.host}]" if ":" in args.host else args.host
                sched = served.scheduler
                print(f"clp serve: model {served.model_id!r}, method {args.method}, numerics {backbone.info.numerics}, "
                      f"{sched.slots} slots of {sched.capacity} positions"
                      f"{'' if sched.batched else ' (one forward per request: no batched step for these numerics)'}: "
                      f"http://{host}:{port}/v1", file=sys.stderr, flush=True)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", http=TimedH11Protocol,
                                   timeout_graceful_shutdown=5, log_config=_stderr_logging()))
    return _run(server, served)


def _run(server, served) -> int:
    """The HTTP server on a thread of its own; the requests' steps on this one, the thread
    that loaded the model (Server.work says why). Ctrl-C or SIGTERM: uvicorn's graceful
    shutdown (a second Ctrl-C forces it), whose app shutdown stops the steps."""
    status = [0]

    def http() -> None:
        try:
            server.run()
        except SystemExit as e:  # a failed start: uvicorn exits with status 3
            status[0] = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - logged; the steps must still stop
            logging.getLogger("clpdecode.serve").exception("clp serve: the HTTP server failed")
            status[0] = 1
        finally:
            served.stop()

    # uvicorn listens for signals only on the main thread; here they reach its handler.
    handled = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.signal(sig, server.handle_exit) for sig in handled}
    thread = threading.Thread(target=http, name="clp-serve-http")
    try:
        thread.start()
        try:
            served.work()
        finally:  # (work() only ends on stop(); should it fail, the HTTP server must not outlive it)
            server.should_exit = True
            thread.join()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return status[0]
