"""The peers `clp bench --hf-generate` times beside our methods, on the same prompts.

One class per peer, one interface (Peer): `time(ids, max_new_tokens)` decodes greedily from
the prompt's token ids and returns a PeerRun (new tokens, end-to-end seconds, and what the
peer also reports); `warm_up` pays for first-call costs before anything is timed; `close`
frees what the peer holds (a server process). `open_peers` builds every peer that can run
here and says on stderr, one line each, why a peer has no row.

- hf_generate, hf_prompt_lookup: transformers' greedy generate() on our very model and
  numerics, and its prompt-lookup decoding (lossless drafts copied from n-grams of the
  prompt and the text so far; no training).
- llama_cpp: llama.cpp in process (llama-cpp-python, `make peers`) on the GGUF file the
  backbone was converted from, greedy, with as many threads as torch uses: the engine a CPU
  user would otherwise pick. It computes with the GGUF's quantised weights, so its text may
  differ from ours.
- llama_server_*: llama.cpp's own server (`llama-server`, built by `make peers` from the
  same sources) on that GGUF, one process per mode: plain AR and its n-gram speculative
  decodings (--spec-type ngram-simple, ngram-mod, ngram-map-k: lossless drafts from the
  token history, no draft model). Each request sends our prompt's token ids to /completion,
  so both sides decode the very same input; the server reports its own decode timings and
  how many drafted tokens it accepted.

ServerProcess (a child HTTP server on a free port) also runs `clp bench-serve`'s servers
(evaluation/load.py). `python -m clpdecode.evaluation.peers --check-server BIN | --check-llama-cpp`
is the check `make peers` runs before keeping a build: it must decode the embedded GGUF.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ClpError


@dataclass
class PeerRun:
    """One greedy decode by a peer. Fields a peer does not report stay None."""

    new_tokens: int
    seconds: float  # end to end, prefill included, as our loop's
    token_ids: list[int] | None = None
    decode_tokens: int | None = None  # tokens after the prefill's own (the peer's own timings)
    decode_seconds: float | None = None
    draft_n: int | None = None  # tokens drafted by speculative decoding ...
    draft_accepted: int | None = None  # ... and of those, accepted

    def as_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, rec) -> "PeerRun":
        """A record of results.json: a dict (as_record), or the [new tokens, seconds(, token
        ids)] list that files written before this class hold."""
        if isinstance(rec, dict):
            return cls(**rec)
        return cls(int(rec[0]), float(rec[1]), list(rec[2]) if len(rec) > 2 else None)


class Peer:
    """A decoder timed beside ours: greedy, same prompt token ids, same max_new_tokens."""

    name: str
    # True: it computes with its own weights or kernels (the GGUF's), so its tokens are
    # compared with our AR's; False: our very model and numerics.
    own_numerics = True

    def time(self, ids: list[int], max_new_tokens: int) -> PeerRun:
        raise NotImplementedError

    def warm_up(self, ids: list[int], max_new_tokens: int) -> None:
        self.time(ids, max_new_tokens)

    def close(self) -> None:
        pass


class HFGeneratePeer(Peer):
    """transformers' greedy generate() on our model, with `extra` generate() arguments."""

    own_numerics = False

    def __init__(self, backbone, name: str, **extra):
        self.backbone, self.name, self.extra = backbone, name, extra

    def warm_up(self, ids, max_new_tokens) -> None:
        pass  # it runs the torch model our methods have just warmed up

    @torch.inference_mode()
    def time(self, ids, max_new_tokens) -> PeerRun:
        x = torch.tensor([ids])
        t = time.perf_counter()
        out = self.backbone.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                           max_new_tokens=max_new_tokens,
                                           pad_token_id=next(iter(self.backbone.eos_ids), 0), **self.extra)
        return PeerRun(out.shape[1] - len(ids), time.perf_counter() - t)


# The transformers peers: name -> extra generate() arguments.
HF_PEERS = {"hf_generate": {}, "hf_prompt_lookup": {"prompt_lookup_num_tokens": 10}}


class LlamaCppPeer(Peer):
    """llama.cpp in process (llama-cpp-python) on the backbone's own GGUF file, timed like
    our loop (prefill included)."""

    name = "llama_cpp"

    def __init__(self, llm, eos_ids: set[int]):
        self.llm, self.eos_ids = llm, eos_ids

    @classmethod
    def open(cls, backbone) -> tuple["LlamaCppPeer | None", str | None]:
        """(peer, None), or (None, why there is no llama.cpp row)."""
        if getattr(backbone, "gguf", None) is None:
            return None, f"{backbone.name} was not converted from a GGUF file"
        try:
            import llama_cpp
        except ImportError:
            return None, "llama-cpp-python is not installed (`make peers` builds it, ~10 min)"
        window = backbone.max_positions or 2048
        llm = llama_cpp.Llama(model_path=str(backbone.gguf), n_ctx=min(window, 4096), n_threads=torch.get_num_threads(),
                              n_threads_batch=torch.get_num_threads(), verbose=False)
        return cls(llm, backbone.eos_ids), None

    def time(self, ids, max_new_tokens) -> PeerRun:
        self.llm.reset()  # no prefix reuse across prompts: our loop prefills every prompt too
        t = time.perf_counter()
        out: list[int] = []
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if tok in self.eos_ids or len(out) >= max_new_tokens:
                break
        return PeerRun(len(out), time.perf_counter() - t, out)


# ---- llama-server ----------------------------------------------------------------------
# Where `make peers` builds it (relative to the project root), and the override.
SERVER_ENV = "CLP_LLAMA_SERVER"
PROJECT_ROOT = Path(__file__).resolve().parents[3]
SERVER_GLOB = "build/peers/*/vendor/llama.cpp/build/bin/llama-server"

# Modes: peer name -> llama-server arguments. Each mode runs in its own server process, with
# llama.cpp's defaults for the mode (ngram-simple and ngram-map-k: 12-token keys, drafts of
# up to 48 tokens; ngram-mod: 24-token keys, a hash pool shared by all requests of that
# server, so later prompts may draft from earlier answers, as under real traffic).
SERVER_MODES = {
    "llama_server_ar": [],
    "llama_server_ngram_simple": ["--spec-type", "ngram-simple"],
    "llama_server_ngram_mod": ["--spec-type", "ngram-mod"],
    "llama_server_ngram_map_k": ["--spec-type", "ngram-map-k"],
    # The same lookups with short keys and drafts, as our lookup drafts (3-token keys, 4 drafts):
    # llama.cpp's defaults (12-token keys, 48 drafts) rarely fire on fresh chat answers.
    "llama_server_ngram_simple_n3": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                     "--spec-ngram-simple-size-m", "4"],
    "llama_server_ngram_map_k_n3": ["--spec-type", "ngram-map-k", "--spec-ngram-map-k-size-n", "3",
                                    "--spec-ngram-map-k-size-m", "4"],
    # Our EAGLE-3 drafter in llama.cpp: exported (`clp export`), converted with the sdist's own
    # convert_hf_to_gguf.py, given with -md (only when the bench's drafter is EAGLE-3).
    "llama_server_eagle3": ["--spec-type", "draft-eagle3"],
}
DRAFTER_MODES = {"llama_server_eagle3"}
SERVER_START_S = 180.0  # model load and the server's own warm-up
REQUEST_S = 900.0


def find_llama_server() -> tuple[Path | None, str | None]:
    """(the llama-server binary, None), or (None, why there is none). $CLP_LLAMA_SERVER wins
    (a ClpError where it names no executable file: the user asked for that one), then the
    build of `make peers` under the project root, then PATH."""
    env = os.environ.get(SERVER_ENV)
    if env:
        p = Path(env).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ClpError(f"${SERVER_ENV} {env!r} is not an executable file; point it at llama-server or unset it")
        return p, None
    built = sorted(PROJECT_ROOT.glob(SERVER_GLOB))
    for p in built:
        if p.is_file() and os.access(p, os.X_OK):
            return p, None
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path), None
    return None, (f"llama-server not found (`make peers` builds it, ~20 min; or set ${SERVER_ENV} "
                  "or put it on PATH)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """An HTTP server run as a child process on 127.0.0.1 (llama-server, `clp serve`), its log in
    a temporary file (stdout carries results only); ready once GET /health answers 200."""

    what = "server"  # how messages name it

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, argv: list[str]):
        self.proc, self.port, self.log_path, self.argv = proc, port, log_path, argv

    @staticmethod
    def spawn(argv: list[str], label: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        fd, log = tempfile.mkstemp(prefix=f"clp-{label}-", suffix=".log")
        with os.fdopen(fd, "wb") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=env)
        return proc, Path(log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = SERVER_START_S) -> str | None:
        """None once /health answers 200; else why not (and the process is stopped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = f"{self.what} exited with {_signal_name(self.proc.returncode)}: {self._last_log_line()}"
                self.close()
                return why
            try:
                status, _ = self._request("GET", "/health", None, timeout=5)
                if status == 200:
                    return None
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        self.close()
        return f"{self.what} did not answer /health within {timeout:.0f} s"

    def _last_log_line(self) -> str:
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        return lines[-1][:200] if lines else "(empty log)"

    def _request(self, method: str, path: str, body: dict | None, timeout: float = REQUEST_S):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.log_path.unlink()
        except OSError:
            pass


def _signal_name(returncode: int) -> str:
    """'status 1', or 'signal SIGILL' for a process a signal ended (Popen's negative codes)."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


class LlamaServerPeer(ServerProcess, Peer):
    """One llama-server process (one mode) on the backbone's GGUF, started on a free port.

    A request is timed from sending it to reading the whole answer (wall clock, prefill
    included, like our loop); its `timings` give the decode time alone and, in a speculative
    mode, the drafted and accepted token counts. Greedy (temperature 0, top-k 1), no
    repetition penalty, no prompt cache (every prompt is prefilled, as ours), stop on the
    GGUF's end-of-generation tokens or at max_new_tokens.
    """

    what = "llama-server"

    def __init__(self, name: str, proc: subprocess.Popen, port: int, log_path: Path, argv: list[str]):
        super().__init__(proc, port, log_path, argv)
        self.name = name

    @classmethod
    def start(cls, binary: Path, name: str, gguf: Path, threads: int, n_ctx: int,
              draft: Path | None = None, parallel: int = 1) -> "LlamaServerPeer":
        """n_ctx: the context of all `parallel` slots together (each gets n_ctx / parallel);
        llama.cpp batches the slots' requests continuously (its default)."""
        port = _free_port()
        argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(n_ctx), "--no-webui",
                *SERVER_MODES[name], *(["-md", str(draft)] if draft is not None else [])]
        env = dict(os.environ)
        lib = str(binary.resolve().parent)  # its shared libraries (libllama, libggml) sit beside it
        env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        proc, log = cls.spawn(argv, name, env)
        return cls(name, proc, port, log, argv)

    @staticmethod
    def completion_body(ids: list[int], max_new_tokens: int, stream: bool = False) -> dict:
        """A /completion request for greedy decoding of these prompt ids: no repetition
        penalty or DRY, no prompt cache (every prompt is prefilled, as ours), its tokens back."""
        return {"prompt": list(map(int, ids)), "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "dry_multiplier": 0.0, "seed": 0,
                "cache_prompt": False, "return_tokens": True, "stream": stream}

    def time(self, ids, max_new_tokens) -> PeerRun:
        body = self.completion_body(ids, max_new_tokens)
        t = time.perf_counter()
        try:
            status, raw = self._request("POST", "/completion", body)
        except (OSError, http.client.HTTPException) as e:
            raise ClpError(f"{self.name}: no answer from llama-server ({e}); its log ends: "
                           f"{self._last_log_line()}") from None
        seconds = time.perf_counter() - t
        if status != 200:
            raise ClpError(f"{self.name}: llama-server answered {status}: {raw[:200].decode(errors='replace')}")
        res = json.loads(raw)
        toks = [int(x) for x in res.get("tokens") or []][:max_new_tokens]  # it may run over by a partial character
        tm = res.get("timings") or {}
        run = PeerRun(len(toks), seconds, toks)
        if "predicted_n" in tm and "predicted_ms" in tm:
            # Its decode rate: tokens after the first (which comes from the prompt's logits)
            # over the time after the prompt, as our `decode_tokens` and prefill split.
            run.decode_tokens = max(0, min(int(tm["predicted_n"]), len(toks)) - 1)
            run.decode_seconds = float(tm["predicted_ms"]) / 1000
        if "draft_n" in tm:
            run.draft_n, run.draft_accepted = int(tm["draft_n"]), int(tm.get("draft_n_accepted", 0))
        elif SERVER_MODES[self.name]:
            run.draft_n, run.draft_accepted = 0, 0  # a speculative mode that drafted nothing
        return run


def eagle3_gguf(drafter, backbone, binary: Path) -> tuple[Path | None, str | None]:
    """Our EAGLE-3 drafter as a GGUF for llama-server (-md), converted once with the
    convert_hf_to_gguf.py of the llama.cpp tree the binary was built from and cached by the
    drafter's content; (None, why not) when that is not possible."""
    import hashlib

    from ..backbone.loading import cache_dir, resolve_model
    from ..heads.eagle3 import Eagle3Drafter
    from ..heads.export import eagle3_state, export_eagle3

    heads = getattr(drafter, "heads", None)
    if not isinstance(heads, Eagle3Drafter):
        return None, "the drafter is not an EAGLE-3 drafter"
    tree = next((p for p in binary.resolve().parents if (p / "convert_hf_to_gguf.py").is_file()), None)
    if tree is None:
        return None, f"no convert_hf_to_gguf.py in the llama.cpp tree of {binary}"
    h = hashlib.sha256()
    for name, t in sorted(eagle3_state(heads).items()):
        h.update(name.encode() + t.numpy().tobytes())
    out = cache_dir() / "eagle3-gguf" / f"{h.hexdigest()[:16]}.gguf"
    if out.is_file():
        return out, None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = export_eagle3(drafter, Path(tmp) / "eagle3")
        target = resolve_model(backbone_source(backbone))[1]
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(".part")
        res = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(ckpt), "--target-model-dir",
                              target, "--outtype", "f16", "--outfile", str(part)], capture_output=True, text=True,
                             env=env)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["?"])[-1][:200]
            return None, f"convert_hf_to_gguf.py failed: {tail}"
        os.replace(part, out)
    return out, None


def backbone_source(backbone) -> str:
    """The model name that loads this backbone again (what `resolve_model` takes)."""
    from ..backbone.loading import EMBEDDED, GEMMA, embedded_gguf_path

    if backbone.gguf is not None and Path(backbone.gguf) == embedded_gguf_path():
        return EMBEDDED
    return GEMMA if backbone.gguf is not None else backbone.name


def open_llama_servers(backbone, n_ctx: int, drafter=None) -> tuple[list[LlamaServerPeer], list[str]]:
    """A ready server per mode, and one line per mode (or for all) that has no row."""
    if getattr(backbone, "gguf", None) is None:
        return [], [f"no llama-server rows: {backbone.name} was not converted from a GGUF file"]
    binary, why = find_llama_server()
    if binary is None:
        return [], [f"no llama-server rows: {why}"]
    threads = torch.get_num_threads()
    started, notes = [], []
    drafts = {}
    for name in DRAFTER_MODES:
        path, why = eagle3_gguf(drafter, backbone, binary) if drafter is not None else (None, "no drafter")
        if path is None:
            notes.append(f"no {name} row: {why}")
        else:
            drafts[name] = path
    try:
        # All start at once (their model loads overlap), then each is waited for.
        for name in SERVER_MODES:
            if name in DRAFTER_MODES and name not in drafts:
                continue
            started.append(LlamaServerPeer.start(binary, name, Path(backbone.gguf), threads, n_ctx, drafts.get(name)))
    except OSError as e:
        for s in started:
            s.close()
        return [], [f"no llama-server rows: cannot start {binary}: {e.strerror or e}"]
    ready = []
    try:
        for s in started:
            why = s.wait_ready()
            if why is None:
                ready.append(s)
            else:
                notes.append(f"no {s.name} row: {why}")
    except BaseException:  # interrupted while they load: none may outlive the bench
        close_peers(started)
        raise
    return ready, notes


def server_context(backbone, prompt_lengths: list[int], max_new_tokens: int) -> int:
    """The context a server needs: the longest prompt + max_new_tokens + room for a draft
    (its drafts never run past the context), in steps of 256, within the backbone's window."""
    need = max(prompt_lengths) + max_new_tokens + 64
    n_ctx = max(512, -(-need // 256) * 256)
    window = backbone.max_positions
    return min(n_ctx, window) if window else n_ctx


def open_peers(backbone, prompt_lengths: list[int], max_new_tokens: int, drafter=None) -> list[Peer]:
    """Every peer that can run here, in their rows' order; one line on stderr for each that
    cannot. The caller closes them (close_peers). `drafter`: ours, for llama-server's
    draft-eagle3 mode when it is an EAGLE-3 drafter."""
    peers: list[Peer] = [HFGeneratePeer(backbone, name, **extra) for name, extra in HF_PEERS.items()]
    notes = []
    llama, why_not = LlamaCppPeer.open(backbone)
    if llama is not None:
        peers.append(llama)
    else:
        notes.append(f"no llama.cpp row: {why_not}")
    servers, server_notes = open_llama_servers(backbone, server_context(backbone, prompt_lengths, max_new_tokens),
                                               drafter)
    peers.extend(servers)
    notes.extend(server_notes)
    for note in notes:
        print(f"clp bench: {note}", file=sys.stderr)
    return peers


def close_peers(peers: list[Peer]) -> None:
    for p in peers:
        try:
            p.close()
        except Exception:  # closing one must not keep the others running
            pass


# Every peer's name, in the order of the report's rows; the speculative server modes are
# compared with llama_server_ar too (their drafts are verified: they should equal it).
PEER_NAMES = (*HF_PEERS, LlamaCppPeer.name, *SERVER_MODES)
OWN_NUMERICS = {LlamaCppPeer.name, *SERVER_MODES}


# ---- `make peers`: keep a llama.cpp build only once it has answered ----------------------
# A build that compiles may still die on its first decode (llama.cpp 0.3.36 with
# GGML_NATIVE=ON: SIGILL in its AMX kernels), which the bench would only report as rows
# skipped; `make peers` runs these checks on the embedded GGUF and removes what fails.
CHECK_PROMPT = "The three primary colours are"
CHECK_TOKENS = 4


def check_llama_server(binary: Path) -> str | None:
    """None once `binary` has decoded CHECK_TOKENS tokens on the embedded GGUF; else why not."""
    from ..backbone.loading import embedded_gguf_path

    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return "not built (no executable there)"
    server = LlamaServerPeer.start(binary, "llama_server_ar", embedded_gguf_path(), max(1, torch.get_num_threads()),
                                   512)
    try:
        why = server.wait_ready()
        if why is not None:
            return why
        body = {"prompt": CHECK_PROMPT, "n_predict": CHECK_TOKENS, "temperature": 0.0, "cache_prompt": False}
        try:
            status, raw = server._request("POST", "/completion", body, timeout=SERVER_START_S)
        except (OSError, http.client.HTTPException) as e:
            try:  # it died answering (SIGILL in a kernel the CPU lacks): say how
                code = server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                return f"no answer from llama-server ({e}): {server._last_log_line()}"
            return f"llama-server died on its first decode ({_signal_name(code)}): {server._last_log_line()}"
        if status != 200:
            return f"llama-server answered {status}: {raw[:200].decode(errors='replace')}"
        if not json.loads(raw).get("content"):
            return "llama-server answered without a token"
        return None
    finally:
        server.close()


def _llama_cpp_decode() -> None:
    """Decode CHECK_TOKENS tokens in process with llama-cpp-python (run in a child process: a
    bad build kills its process with SIGILL)."""
    import llama_cpp

    from ..backbone.loading import embedded_gguf_path

    llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), n_ctx=512, verbose=False)
    out = llm(CHECK_PROMPT, max_tokens=CHECK_TOKENS, temperature=0.0)
    if not out["choices"][0]["text"]:
        raise SystemExit("llama-cpp-python answered without a token")


def check_llama_cpp() -> str | None:
    """None once llama-cpp-python (as installed) has decoded on the embedded GGUF; else why not."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "not installed"
    res = subprocess.run([sys.executable, "-m", "clpdecode.evaluation.peers", "--decode-llama-cpp"],
                         capture_output=True, text=True)
    if res.returncode == 0:
        return None
    tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
    return f"llama-cpp-python died decoding ({_signal_name(res.returncode)}): {tail}"


def main(argv: list[str] | None = None) -> int:
    """`python -m clpdecode.evaluation.peers --check-server BINARY | --check-llama-cpp`: exit 0
    once it decoded, else 1 with one line on stderr (what `make peers` runs)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--decode-llama-cpp"]:
        _llama_cpp_decode()
        return 0
    if len(argv) == 2 and argv[0] == "--check-server":
        what, why = f"llama-server {argv[1]}", check_llama_server(Path(argv[1]))
    elif argv == ["--check-llama-cpp"]:
        what, why = "llama-cpp-python", check_llama_cpp()
    else:
        print("usage: python -m clpdecode.evaluation.peers --check-server BINARY | --check-llama-cpp",
              file=sys.stderr)
        return 2
    if why is not None:
        print(f"peers check: {what}: {why}", file=sys.stderr)
        return 1
    print(f"peers check: {what} decodes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
