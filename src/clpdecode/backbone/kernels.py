"""The q4 path's C++ kernels (csrc/kernels.cpp): built once per machine, then loaded.

`torch.ops.clp.q4_linear` (4-bit weights x int8-quantised activations, llama.cpp's
q4_1 x q8 arithmetic) and `torch.ops.clp.decode_attention` (chunked grouped-query
attention over the static cache). Both are row-invariant, which keeps verified decoding
identical to AR. They are compiled with the machine's C++ compiler for its own CPU
(-march=native) into the cache ($CLP_CACHE/kernels/...), the first time q4 runs (~30 s);
later runs load the built library in well under a second. Registered as torch ops with
fake (shape-only) implementations, so torch.compile traces through them.

Where no compiler is found, `load()` returns None and says why once; q4 then runs torch's
own int4 kernel and attention (slower, and rows of a step are no longer bit-identical).
"""

from __future__ import annotations

import hashlib
import platform
import sys
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"] + [f"-D{v}" for v in ("CLP_ACT8", "CLP_HADD") if __import__("os").environ.get(v)]
_lock = threading.Lock()
_state: dict = {}


def _build_dir() -> Path:
    from .loading import cache_dir

    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode()
                         + platform.machine().encode() + sys.version.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / key, key


def load(quiet: bool = False):
    """The built extension module, or None (with the reason in `why_unavailable()`)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        try:
            from torch.utils import cpp_extension

            folder, key = _build_dir()
            folder.mkdir(parents=True, exist_ok=True)
            built = any(folder.glob("*.so"))
            if not built and not quiet:
                print(f"clp: building the q4 CPU kernels in {folder} (once, ~30 s)...", file=sys.stderr, flush=True)
            module = cpp_extension.load(name=f"clp_kernels_{key}", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                                        extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
            _register_fakes()
        except Exception as e:  # no compiler, no ninja, a compile error: fall back, say why once
            _state["why"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
            print(f"clp: warning: the q4 CPU kernels could not be built ({_state['why']}); q4 runs torch's "
                  "int4 kernel instead (slower; verified may differ from AR)", file=sys.stderr, flush=True)
        _state["module"] = module
        return module


def why_unavailable() -> str | None:
    return _state.get("why")


def _register_fakes() -> None:
    @torch.library.register_fake("clp::q4_linear")
    def _(x, qs, d, mn, bias, norm, eps, act, residual):
        return x.new_empty((x.shape[0], qs.shape[0] * 4))

    @torch.library.register_fake("clp::q8_linear")
    def _(x, qs, d, bias, norm, eps, act, residual):
        return x.new_empty((x.shape[0], qs.shape[0] * 4))

    @torch.library.register_fake("clp::rms_norm")
    def _(x, weight, eps, residual=None):
        return x.new_empty(x.shape)

    @torch.library.register_fake("clp::layers_forward")
    def _(x, parts, kinds, op_parts, norms, eps, k_caches, v_caches, cos, sin, rope, windows, start, step_mask,
          n_heads, scale, act, final_norm, final_eps, aux_layers):
        return [x.new_empty(x.shape) for _ in range(1 + len(aux_layers))]

    @torch.library.register_fake("clp::rope_store")
    def _(qkv, cos, sin, k_cache, v_cache, start, n_heads, q_norm=None, k_norm=None, eps=0.0):
        return qkv.new_empty((qkv.shape[0], n_heads, k_cache.shape[-1]))

    @torch.library.register_fake("clp::decode_attention")
    def _(q, k, v, L, step_mask, scale, window=0):
        return q.new_empty(q.shape)
