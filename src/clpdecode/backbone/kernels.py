"""The q4 path's C++ kernels (csrc/kernels.cpp): built once per machine and cache, then loaded.

Seven torch ops in the `clp` namespace: `q4_linear` and `q8_linear` (4- and 8-bit weights x
activations quantised per row and group of 32, with an RMSNorm or a gated activation fused in
front and a residual behind), `rms_norm`, `rope_store` (rotary, Gemma's q/k norms and the
fp16 cache write), `decode_attention` (chunked grouped-query attention over the static cache)
`layers_forward` (a whole step's decoder layers in one call) and `layers_forward_rows` (the
same over rows of many sequences, each in its own cache slot: batched serving). Every one is
row-invariant, which keeps verified decoding identical to AR and a request's output
independent of what shares its step. They are registered with fake
(shape-only) implementations, so torch.compile traces through them.

They are compiled with the machine's C++ compiler for its own CPU (-march=native) into
$CLP_CACHE/kernels/<key> the first time q4 runs (~1 min); later runs load the built library
in well under a second, without writing (a read-only cache works). The build goes through
loading.cached_folder, as the model conversion does: under an flock the OS releases when its
holder dies, into a temporary folder renamed into place, with a marker of every file's size
and hash. So a run killed mid-build leaves nothing that blocks or fools the next run: torch's
own build lock (a `lock` file that stays when its holder is killed, and on which every later
torch build of that folder waits forever) only ever sits in a fresh temporary folder.

Where no compiler is found, `load()` returns None and says why once; q4 then runs torch's
own int4 kernel and attention (slower, and rows of a step are no longer bit-identical).
A cache that cannot be written, with the kernels not built in it yet, is the user's error
(ClpError), as it is for the model conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from ..errors import ClpError

_SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"] + [f"-D{v}" for v in ("CLP_ACT8", "CLP_HADD")
                                                                     if os.environ.get(v)]
_lock = threading.Lock()
_state: dict = {}


def _build_dir() -> tuple[Path, str]:
    """The folder of the kernels built from this source with these flags for this torch,
    CPU and Python, and its key."""
    from .loading import cache_dir

    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode()
                         + platform.machine().encode() + sys.version.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / key, key


def _compile(folder: Path, name: str) -> ModuleType | None:
    """Build the extension `name` in `folder` (an empty temporary folder) and import it (None:
    import it from the finished folder instead)."""
    from torch.utils import cpp_extension

    return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                              build_directory=str(folder), verbose=False)


def _import(library: Path, name: str) -> ModuleType:
    """Import a built extension by its path (torch's own loader would take its build lock)."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(quiet: bool = False):
    """The built extension module, or None (with the reason in `why_unavailable()`).

    quiet: no status line when the kernels are built now.
    """
    with _lock:
        if "module" in _state:
            return _state["module"]
        from torch.utils.cpp_extension import LIB_EXT

        from .loading import cached_folder

        folder, key = _build_dir()
        name = f"clp_kernels_{key}"
        built: list[ModuleType | None] = []
        message = None if quiet else f"clp: building the q4 CPU kernels in {folder} (once, ~1 min)..."
        module = None
        try:
            cached_folder(folder, key, lambda tmp: built.append(_compile(tmp, name)), message)
            # The module imported by this process's build, else the one built earlier.
            module = (built[0] if built else None) or _import(folder / f"{name}{LIB_EXT}", name)
            if not _state.get("fakes"):
                _register_fakes()
                _state["fakes"] = True
        except ClpError:  # the cache cannot hold the build: the user's to fix, not a fallback
            raise
        except Exception as e:  # no compiler, no ninja, a compile error: fall back, say why once
            _state["why"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
            print(f"clp: warning: the q4 CPU kernels could not be built ({_state['why']}); q4 runs torch's "
                  "int4 kernel instead (slower; verified may differ from AR)", file=sys.stderr, flush=True)
        _state["module"] = module
        return module


def wide_q4() -> bool:
    """Whether the built kernels take q4 weights in tiles of 16 features (AVX512_VNNI machines:
    quant.pack_tiles16); the 4-feature tiles (quant.pack_tiles) work everywhere."""
    module = load(quiet=True)
    return bool(module is not None and module.has_wide_q4())


def amx_prompts() -> bool:
    """Whether prompt rows run on AMX-BF16 tiles here (clp::dense_linear): the CPU has them,
    Linux grants the tile state, and CLP_NO_AMX is unset."""
    module = load(quiet=True)
    return bool(module is not None and module.has_amx_bf16())


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
          n_heads, scale, act, final_norm, final_eps, aux_layers, dense, dense_from):
        return [x.new_empty(x.shape) for _ in range(1 + len(aux_layers))]

    @torch.library.register_fake("clp::layers_forward_rows")
    def _(x, parts, kinds, op_parts, norms, eps, k_caches, v_caches, cos, sin, rope, windows, row_slot, row_write,
          row_prefix, step_mask, n_heads, scale, act, final_norm, final_eps, aux_layers, dense, dense_from):
        return [x.new_empty(x.shape) for _ in range(1 + len(aux_layers))]

    @torch.library.register_fake("clp::dense_linear")
    def _(x, w, bias, norm, eps, act, residual):
        return x.new_empty((x.shape[0], w.shape[0] * 16))

    @torch.library.register_fake("clp::rope_store")
    def _(qkv, cos, sin, k_cache, v_cache, start, n_heads, q_norm=None, k_norm=None, eps=0.0):
        return qkv.new_empty((qkv.shape[0], n_heads, k_cache.shape[-1]))

    @torch.library.register_fake("clp::decode_attention")
    def _(q, k, v, L, step_mask, scale, window=0):
        return q.new_empty(q.shape)
