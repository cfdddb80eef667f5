"""An OpenAI-compatible HTTP server over the project's one decoding loop.

Endpoints: ``POST /v1/chat/completions`` (chat template), ``POST /v1/completions`` (plain
prompt), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Every method of ``make_policy`` is served;
a request may pick its own with the extension fields ``method`` and ``clp_threshold``.

Concurrency: continuous batching (decoding/scheduler.py). Up to ``parallel`` requests
decode together, one backbone forward a step for all of them, each in its own cache slot;
requests join and leave at step boundaries, and each keeps its own settings (method,
thresholds, sampling, stop strings, max tokens). A request's text is the same as it would
be alone (the batched step's rows are independent). Greedy verified requests draft within
the rows CLP's budget grants them (``spec_budget``). Requests beyond the slots wait in FIFO
order; when ``max_queue`` already wait, the next one is answered 503 with Retry-After.
One worker thread runs the steps; tokens travel from a request's ``on_tokens`` callback to
its asyncio queue and out as server-sent events. A client that goes away cancels its
request, which leaves its slot at the next step boundary (one that waits never starts).

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad value (the project's ClpError checks), 401 for a missing or wrong API key, 404 for an
unknown model or route, 413 for a body over the size limit, 422 for a body that does not
fit the request schema (a missing field, a wrong type), 503 for a full queue. A generation
that fails answers 500 for that request only; the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..decoding import GenerationConfig, PolicyConfig, SamplingConfig, make_policy
from ..decoding.scheduler import DEFAULT_MAX_PREFILL_ROWS, DEFAULT_MAX_ROWS, DEFAULT_SLOTS, Scheduler
from ..decoding.scheduler import Request as SchedRequest
from ..decoding.stream import StreamDecoder
from ..errors import ClpError, check_context, check_positive_int, check_prompt, check_text

log = logging.getLogger("clpdecode.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a small model's window
DEFAULT_MAX_TOKENS = 256  # when a request names none (and the window has room)
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
HEADER_TIMEOUT_S = 30.0  # a connection whose request headers are not complete by then is closed
BODY_TIMEOUT_S = 60.0  # a request body not complete by then is answered 408
ROLES = ("system", "developer", "user", "assistant", "tool")


# ---- errors ---------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Settings whose JSON field differs from the library's name (ClpError.param).
API_NAMES = {"max_new_tokens": "max_tokens"}


def _clp_error(e: ClpError, param: str | None = None) -> ApiError:
    """A library error as a 400: the setting it names (e.param) by its JSON field."""
    field_name = API_NAMES.get(e.param, e.param) if e.param else None
    return ApiError(400, e.named(field_name) if field_name else str(e), param=param or field_name)


# ---- request schemas ------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (user, ...)

    model: str | None = None
    max_tokens: StrictInt | None = None  # strict: true or 1.5 is a mistake, not a number
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt | None = None
    # extensions
    method: str | None = None
    clp_threshold: float | None = None
    gate_threshold: float | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # the newer name of max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None  # with logprobs: the likeliest tokens at each position


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: StrictInt | None = None  # the legacy API: the number of likeliest tokens to list


# OpenAI fields this server does not implement, refused (as OpenAI refuses what a model does
# not support) rather than dropped: field -> the values that mean "not used".
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None,),
               "echo": (None, False), "suffix": (None,), "best_of": (None, 1)}


def _parse(schema: type[BaseModel], data: dict) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(422, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc,
                       code="invalid_value" if err["type"] != "missing" else "missing_required_parameter")


# ---- jobs and the worker --------------------------------------------------------------
class Outbox:
    """Events from the scheduler's thread to the event loop, handed over once per step.

    Waking the event loop costs a write to its self-pipe and, on a 2-core machine whose
    cores the step's kernels keep busy, a thread switch: once per request and step it was
    ~3% of the stepping thread's time at 8 clients (py-spy: `_write_to_self`). The steps'
    thread sends into the box and flushes it after each step: one wake-up a step."""

    def __init__(self):
        self._events: list[tuple["Job", str, Any]] = []
        self._lock = threading.Lock()

    def send(self, job: "Job", kind: str, payload: Any) -> None:
        with self._lock:
            self._events.append((job, kind, payload))

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for event in events:  # one loop in a server; an app may be run by several in turn (tests)
            by_loop.setdefault(event[0].loop, []).append(event)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the event loop is gone (server shutting down)
                for job, _, _ in batch:
                    job.request.cancel()

    @staticmethod
    def _deliver(events) -> None:
        for job, kind, payload in events:
            job.events.put_nowait((kind, payload))


@dataclass
class Job:
    """One HTTP request's generation: the scheduler's Request and the events it sends back
    to the request's handler on the event loop (tokens, then done or error)."""

    request: SchedRequest
    stops: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    outbox: Outbox
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def cfg(self) -> GenerationConfig:
        return self.request.cfg

    def send(self, kind: str, payload: Any) -> None:
        self.outbox.send(self, kind, payload)

    def cancel(self) -> None:
        self.request.cancel()


class _TextStream:
    """Token ids in, text pieces out, cut before the first stop string (as OpenAI does).

    The last (longest stop - 1) characters are held back until the next piece, so a stop
    string split over two pieces is never half sent.
    """

    def __init__(self, decode, stops: tuple[str, ...]):
        self.decoder = StreamDecoder(decode)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        return self._feed(self.decoder.push(ids), final=False)

    def finish(self) -> str:
        return self._feed(self.decoder.finish(), final=True)

    def _feed(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        self.buf += new
        cut = _stop_index(self.buf, self.stops)
        if cut >= 0:
            self.stopped = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = 0 if final else min(self.hold, len(self.buf))
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out


def _stop_index(text: str, stops: tuple[str, ...]) -> int:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class Server:
    """The backbone, the drafter, the scheduler and the one thread that steps it: a worker
    thread of its own (start()), or, with `steps_in_caller`, the thread that calls work()
    (`clp serve`: the main thread, which loaded the model; see work())."""

    def __init__(self, backbone, drafter=None, *, model_id: str | None = None, aliases: tuple[str, ...] = (),
                 policy: PolicyConfig = PolicyConfig(method="verified"), api_key: str | None = None,
                 max_queue: int = 64, max_body_bytes: int = MAX_BODY_BYTES, parallel: int = DEFAULT_SLOTS,
                 spec_budget: str = "auto", context: int | None = None, max_rows: int = DEFAULT_MAX_ROWS,
                 max_prefill_rows: int = DEFAULT_MAX_PREFILL_ROWS, steps_in_caller: bool = False):
        self.backbone, self.drafter = backbone, drafter
        self.steps_in_caller = steps_in_caller
        self.model_id = model_id or Path(str(backbone.name)).name or str(backbone.name)
        self.aliases = {self.model_id, str(backbone.name), *aliases}
        # The server's defaults (a request's fields override some of them); whether they can
        # run on this drafter is checked as a request's are, before any request.
        make_policy(policy, backbone, drafter)
        self.policy = policy
        self.api_key = api_key
        self.max_queue = check_positive_int("--max-queue", max_queue)
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.scheduler = Scheduler(backbone, slots=parallel, capacity=context, max_rows=max_rows,
                                   max_prefill_rows=max_prefill_rows, budget=spec_budget)
        self._lock = threading.Lock()
        self.rejected = 0
        self._mean_seconds = 1.0  # a request's time, for Retry-After
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()  # shutdown: cancel what runs and waits
        self.outbox = Outbox()  # the jobs' events, flushed to the event loop after each step

    # -- worker ------------------------------------------------------------------------
    def start(self) -> None:
        """Start stepping requests (the app's startup): on a worker thread, unless the caller
        steps them (steps_in_caller: its work() is already running or about to)."""
        if self._worker is None and not self.steps_in_caller:
            self._closing.clear()
            self._worker = threading.Thread(target=self.work, name="clp-serve-worker", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        self._closing.set()
        self.scheduler.wake()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None

    def submit(self, job: Job) -> None:
        sched = self.scheduler
        with self._lock:
            if sched.waiting >= self.max_queue:
                self.rejected += 1
                # A slot frees about every (request time / slots); the line ahead needs this many.
                retry = max(1, round(self._mean_seconds * (sched.waiting + 1) / sched.slots))
                raise ApiError(503, f"the server is busy: {sched.waiting} requests wait already "
                                    f"(--max-queue {self.max_queue}); retry after {retry} s",
                               type="server_busy", code="queue_full", headers={"Retry-After": str(retry)})
            sched.submit(job.request)

    def work(self) -> None:
        """Step requests on the calling thread until stop(): the worker thread's loop, or with
        steps_in_caller the caller's.

        Why the caller: torch's CPU kernels run on OpenMP (libgomp), and each thread that
        starts parallel work gets a team of its own. Once a process has more team threads
        than cores, libgomp stops spinning between parallel regions and every region wakes
        its threads from sleep. Loading and calibrating the model on the main thread and then
        stepping on a worker thread made two teams, and each batched step took ~15% longer
        (22.0 -> 25.2 ms for 8 decode rows on the 2-core Xeon, scripts/thread_teams.py; 313
        against 368 tokens/s for 16 requests over 8 slots; docs/design.md, "One thread for
        the kernels"). So `clp serve` steps on the thread that loaded the model and runs the
        HTTP server on another, which never starts kernels."""
        sched = self.scheduler
        while not self._closing.is_set():
            if not sched.wait_for_work(timeout=0.5):
                continue
            try:
                sched.step()
            except BaseException:  # noqa: BLE001 - the worker must outlive any one step
                log.exception("clp serve: a step failed; its requests end with an error")
                for req in list(sched.running):
                    sched.fail(req, RuntimeError("the batched step failed"))
            self.outbox.flush()
        sched.drain()  # shutdown: nobody will read what would follow
        for req in list(sched.running):
            req.cancel()
        sched.step()  # retires them
        self.outbox.flush()

    def make_request(self, prompt_ids: list[int], policy, cfg: GenerationConfig, stops) -> Job:
        job: Job | None = None
        t0 = time.perf_counter()

        def on_tokens(ids, from_heads):
            job.send("tokens", list(ids))

        def on_done(result, error):
            if result is not None:
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - t0)
                job.send("done", result)
            elif isinstance(error, ClpError):
                job.send("error", _clp_error(error))
            elif error is not None:
                log.error("clp serve: generation failed: %s: %s", type(error).__name__, error)
                job.send("error", ApiError(500, f"generation failed: {type(error).__name__}: {error}",
                                           type="server_error"))

        job = Job(SchedRequest(prompt_ids, policy, cfg, on_tokens=on_tokens, on_done=on_done), tuple(stops),
                  asyncio.get_running_loop(), self.outbox)
        return job

    # -- request handling --------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(401, "no API key: send 'Authorization: Bearer KEY' with the key given to "
                                "clp serve --api-key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "wrong API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        too_big = ApiError(413, f"the request body is over {self.max_body_bytes} bytes",
                           code="request_too_large")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    raise too_big
            except ValueError:
                raise ApiError(400, "a malformed Content-Length header") from None
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):  # a half-sent body must not hold the connection
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:  # an expected event, not an error of ours: one line, no traceback
            log.info("clp serve: a client went away while sending its request")
            raise ApiError(499, "the client went away", code="client_closed") from None
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:  # a small body can nest arrays deeper than the parser recurses
            raise ApiError(400, "the request body nests JSON arrays or objects too deeply",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise ApiError(404, f"the model {model!r} does not exist here; this server serves "
                                f"{self.model_id!r} (GET /v1/models)", param="model", code="model_not_found")

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise ApiError(400, "messages is empty: send at least one message", param="messages")
        msgs = []
        for i, m in enumerate(messages):
            name = f"messages[{i}]"
            if m.role not in ROLES:
                raise ApiError(400, f"{name}.role must be one of {', '.join(ROLES)}, got {m.role!r}",
                               param=f"{name}.role")
            content = m.content
            if isinstance(content, list):  # content parts: text only
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"{name}.content: only text parts are supported",
                                       param=f"{name}.content")
                    texts.append(part["text"])
                content = "".join(texts)
            content = content or ""
            try:
                check_text(f"{name}.content", content)
            except ClpError as e:
                raise _clp_error(e, f"{name}.content") from None
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        if not any(m["content"].strip() for m in msgs):
            raise ApiError(400, "the messages are empty: no message has any content", param="messages")
        if not self.backbone.has_chat:
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            return self.backbone.encode_chat(msgs)
        except ClpError as e:  # the template's refusal, or a prompt past the context window
            raise _clp_error(e, "messages") from None

    def completion_prompt(self, prompt: str | list[str]) -> list[int]:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: send one prompt per request (a list of one string at most)",
                               param="prompt")
            prompt = prompt[0]
        try:
            check_prompt(prompt, "prompt")
            return self.backbone.encode_prompt(prompt, chat=False)
        except ClpError as e:
            raise _clp_error(e, "prompt") from None

    # A request's fields that override the server's PolicyConfig (extensions to the OpenAI API).
    POLICY_FIELDS = ("method", "clp_threshold", "gate_threshold")

    def make_job(self, req: _Request, prompt_ids: list[int], max_tokens: int | None,
                 prompt_param: str) -> Job:
        if req.n not in (None, 1):
            raise ApiError(400, f"n must be 1 (one choice per request), got {req.n}", param="n")
        for name, unused in UNSUPPORTED.items():
            if (req.model_extra or {}).get(name) not in unused:
                raise ApiError(400, f"{name} is not supported by this server (clp serve)", param=name,
                               code="unsupported_parameter")
        if isinstance(req, ChatRequest):
            if req.top_logprobs is not None and not req.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            top = (req.top_logprobs or 0) if req.logprobs else None
        else:
            top = req.logprobs
        overrides = {f: getattr(req, f) for f in self.POLICY_FIELDS if getattr(req, f) is not None}
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        window = self.scheduler.capacity  # a request slot's positions (at most the model's window)
        if max_tokens is None:  # as much as fits, up to the default
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, window - len(prompt_ids)) if window else DEFAULT_MAX_TOKENS)
        try:
            config = replace(self.policy, **overrides)
            cfg = GenerationConfig(max_new_tokens=max_tokens, stop=stops, logprobs=top, sampling=SamplingConfig(
                temperature=0.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, seed=0 if req.seed is None else req.seed))
            policy = make_policy(config, self.backbone, self.drafter)
        except ClpError as e:
            if e.param == "top_logprobs" and not isinstance(req, ChatRequest):  # the legacy API's name for it
                raise ApiError(400, str(e).replace("top_logprobs", "logprobs"), param="logprobs") from None
            raise _clp_error(e, None if e.param else "method") from None
        try:
            check_context(len(prompt_ids), max_tokens, window, limit="the positions of a request slot (clp serve "
                          "--context, at most the model's window)" if window < (self.backbone.max_positions or 0)
                          else "the model's context window")
        except ClpError as e:
            too_long = window and len(prompt_ids) >= window  # no max_tokens would fit
            raise _clp_error(e, prompt_param if too_long else "max_tokens") from None
        return self.make_request(prompt_ids, policy, cfg, stops)

    async def events(self, request: Request, job: Job) -> AsyncIterator[tuple[str, Any]]:
        """The job's events until it ends; cancels the job when the client goes away."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    kind = payload = None
                if loop.time() >= next_check:  # tokens or not, look at the connection now and then
                    next_check = loop.time() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return
                if kind is None:
                    continue
                yield kind, payload
                if kind != "tokens":
                    return
        finally:
            job.cancel()  # no-op once the job is done

    def extension(self, res) -> dict:
        acc = res.accepted_per_step
        hist: dict[str, int] = {}
        for a in sorted(acc):
            hist[str(a)] = hist.get(str(a), 0) + 1
        return {
            "method": res.method,
            "forward_passes": res.forward_passes,
            "tokens_per_forward": round(res.tokens_per_forward, 4),
            "accepted_per_step": {"steps": len(acc), "mean": round(sum(acc) / len(acc), 4) if acc else 0.0,
                                  "histogram": hist},
            "seconds": round(res.seconds, 4),
        }

    def logprobs(self, res, chat: bool) -> dict | None:
        """OpenAI's logprobs object of a result (None when not asked): chat's `content` list,
        or the legacy completions' parallel lists. A token's logprob is null where the backbone
        never read its position (an unverified head token emitted last)."""
        if res.logprobs is None:
            return None

        def text(t: int) -> str:
            return self.backbone.decode([t])

        toks = [text(t) for t in res.token_ids]
        if chat:
            return {"content": [{"token": tok, "logprob": e.logprob if e else None, "bytes": list(tok.encode()),
                                 "top_logprobs": [{"token": text(i), "logprob": lp, "bytes": list(text(i).encode())}
                                                  for i, lp in (e.top if e else ())]}
                                for tok, e in zip(toks, res.logprobs)]}
        offsets = [sum(len(t) for t in toks[:j]) for j in range(len(toks))]
        return {"tokens": toks, "token_logprobs": [e.logprob if e else None for e in res.logprobs],
                "top_logprobs": [{text(i): lp for i, lp in e.top} if e else None for e in res.logprobs],
                "text_offset": offsets}

    def usage(self, res) -> dict:
        n_prompt, n_new = len(res.prompt_ids), res.new_tokens
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    def finish_reason(self, res, job: Job, stopped: bool) -> str:
        ids = res.token_ids
        if stopped or (ids and ids[-1] in self.backbone.eos_ids):
            return "stop"
        return "length" if len(ids) >= job.cfg.max_new_tokens else "stop"

    async def respond(self, request: Request, req: _Request, job: Job, chat: bool) -> Response:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        self.submit(job)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(request, job, chat, rid, created, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        res = None
        async for kind, payload in self.events(request, job):
            if kind == "error":
                raise payload
            if kind == "done":
                res = payload
        if res is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        cut = _stop_index(res.text, job.stops)
        text = res.text[:cut] if cut >= 0 else res.text
        finish = self.finish_reason(res, job, cut >= 0)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self.logprobs(res, chat), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(res, chat), "finish_reason": finish}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.model_id, "choices": [choice],
                             "usage": self.usage(res), "clp": self.extension(res)})

    async def _stream(self, request: Request, job: Job, chat: bool, rid: str, created: int,
                      include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None = None, logprobs=None, **extra) -> str:
            if chat:
                delta = {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                         "choices": [choice], **extra})

        text = _TextStream(self.backbone.decode, job.stops)
        try:
            if chat:
                yield _sse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
            async for kind, payload in self.events(request, job):
                if kind == "tokens":
                    piece = text.push(payload)
                    if piece:
                        yield chunk(piece)
                elif kind == "error":
                    yield _sse(payload.body())
                    break
                else:
                    res = payload
                    piece = text.finish()
                    if piece:
                        yield chunk(piece)
                    # Log-probabilities, when asked, come whole with the last chunk (a step's tokens
                    # reach the text stream before an unverified head token's are known).
                    yield chunk(None, self.finish_reason(res, job, text.stopped), logprobs=self.logprobs(res, chat),
                                clp=self.extension(res))
                    if include_usage:
                        yield _sse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                                    "choices": [], "usage": self.usage(res)})
        finally:
            job.cancel()  # at once, not when the inner generator is collected (no-op once done)
        yield "data: [DONE]\n\n"

    def health(self) -> dict:
        sched = self.scheduler.health()
        return {"status": "ok", "model": self.model_id, "method": self.policy.method,
                "queue_length": sched.pop("waiting"), "max_queue": self.max_queue, "rejected": self.rejected, **sched}


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are not complete
    within HEADER_TIMEOUT_S (uvicorn has no such limit: a client that sends part of its headers
    would hold a connection forever, which matters once --host is not local)."""

    _headers_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._headers_timer is None and self._between_requests():  # a keep-alive's next request
            self._arm()
        super().data_received(data)
        if not self._between_requests() and self._headers_timer is not None:  # its headers are in
            self._headers_timer.cancel()
            self._headers_timer = None

    def connection_lost(self, exc) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._headers_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_timed_out)

    def _headers_timed_out(self) -> None:
        self._headers_timer = None
        if self._between_requests() and not self.transport.is_closing():
            log.info("clp serve: closed a connection whose request headers took over %g s", HEADER_TIMEOUT_S)
            self.transport.close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(backbone, drafter=None, **options) -> FastAPI:
    """The FastAPI app serving `backbone` (+ `drafter`); options as for Server."""
    server = Server(backbone, drafter, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="clp-decode", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return ApiError(exc.status_code, msg, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        log.exception("clp serve: unexpected error")
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/metrics")
    async def metrics():
        """The scheduler's counters in Prometheus' text format (clp_ prefix)."""
        lines = []
        for key, value in server.health().items():
            if isinstance(value, dict):
                lines += [f"clp_{key}_{k} {v}" for k, v in value.items() if isinstance(v, (int, float))]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"clp_{key} {value}")
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "clp-decode"}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.check_auth(request)
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_auth(request)
        req = _parse(ChatRequest, await server.read_json(request))
        server.check_model(req.model)
        prompt_ids = server.chat_prompt(req.messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = server.make_job(req, prompt_ids, max_tokens, "messages")
        return await server.respond(request, req, job, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_auth(request)
        req = _parse(CompletionRequest, await server.read_json(request))
        server.check_model(req.model)
        prompt_ids = server.completion_prompt(req.prompt)
        job = server.make_job(req, prompt_ids, req.max_tokens, "prompt")
        return await server.respond(request, req, job, chat=False)

    return app
