"""The drafter bundle: MTP heads + CLP + gates + competing heads for one backbone and k.

On disk a bundle is a folder with ``config.json`` and ``model.safetensors`` (weights in
fp16 to keep shipped files small; loaded back as fp32). ``config.json`` records the
backbone's name, hidden size, vocab size and a fingerprint of its LM head, so a bundle
loaded onto another backbone fails with a clear error instead of drafting garbage.
Writes go to a temporary folder that is renamed into place: a killed save never leaves a
half-written bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..atomic import atomic_folder
from ..errors import ClpError, check_positive_int
from ..predictors.modules import CLP, Gates, PredictorConfig
from .chained import ChainConfig, ChainedHeads
from .eagle3 import Eagle3Config, Eagle3Drafter
from .modules import HeadsConfig, MTPHeads

FORMAT = "clp-decode-drafter/1"


@dataclass
class Drafter:
    """Everything a multi-token policy needs besides the backbone."""

    heads: MTPHeads | ChainedHeads | Eagle3Drafter  # independent heads, a chain, or EAGLE-3 (the default)
    clp: CLP | None = None
    gates: Gates | None = None
    competing: MTPHeads | None = None
    meta: dict = field(default_factory=dict)  # backbone identity, training notes

    @property
    def k(self) -> int:
        return self.heads.cfg.k

    @property
    def design(self) -> str:
        return self.heads.cfg.design

    @property
    def aux_layers(self) -> tuple[int, ...]:
        """Backbone layers whose inputs the drafter reads (EAGLE-3), or () for the last state."""
        return tuple(getattr(self.heads, "aux_layers", ()))

    def attach(self, backbone) -> "Drafter":
        check_backbone(self.meta, backbone)
        for h in (self.heads, self.competing):
            if isinstance(h, (ChainedHeads, Eagle3Drafter)):
                h.attach(backbone.lm_head_weight, backbone.model.get_input_embeddings().weight)
                # Under reduced backbone numerics the chain drafts with 8-bit weights (q4: groups
                # of 32 on the C++ kernels; fp16/int8: fbgemm's dynamic int8): drafts only
                # propose, verification keeps the output exact, and 8-bit drafting costs a few
                # kept drafts for much less time (measured in docs/design.md, "Drafting on CPU").
                numerics = backbone.info.numerics
                h.prepare_inference(dtype={"fp32": None, "q4": "q8"}.get(numerics, torch.qint8))
            elif h is not None:
                h.attach(backbone.lm_head_weight)
        return self

    def session(self, backbone):
        """Per-generation drafting state with observe(rows, tokens) / propose(hidden, token, m)."""
        if isinstance(self.heads, (ChainedHeads, Eagle3Drafter)):
            return self.heads.session()
        return self.heads.session(backbone.embed)

    def sizes(self) -> dict:
        out = {"heads": {"k": self.k, "params": self.heads.num_params, "design": self.design,
                         "draft_vocab": int(self.heads.draft_ids.numel())}}
        if self.clp is not None:
            out["clp"] = {"params": self.clp.num_params}
        if self.gates is not None:
            out["gate"] = {"params": self.gates.num_params, "params_at_d1536": Gates.params_at(1536, self.k)}
        if self.competing is not None:
            out["competing"] = {"params": self.competing.num_params}
        return out


def stored_tensors(module, prefix: str = "") -> dict:
    """A module's state as shipped: index buffers as int32, weights as fp16."""
    return {prefix + name: (t.detach().cpu().to(torch.int32) if t.dtype == torch.long
                            else t.detach().cpu().to(torch.float16)).contiguous()
            for name, t in module.state_dict().items()}


def loaded_tensors(tensors: dict) -> dict:
    """Stored tensors back to working dtypes: int32 -> long, the rest fp32."""
    return {k: (v.long() if v.dtype == torch.int32 else v.float()) for k, v in tensors.items()}


def backbone_meta(backbone) -> dict:
    return {
        "name": backbone.name,
        "hidden_size": backbone.info.hidden_size,
        "vocab_size": backbone.info.vocab_size,
        "lm_head_fingerprint": backbone.fingerprint,
    }


def check_backbone(meta: dict, backbone) -> None:
    want = meta.get("backbone", {})
    have = backbone_meta(backbone)
    for key in ("hidden_size", "vocab_size", "lm_head_fingerprint"):
        if want.get(key) != have[key]:
            raise ClpError(
                f"these heads were trained for backbone {want.get('name')!r} "
                f"({key} {want.get(key)}), not for {have['name']!r} ({key} {have[key]})"
            )


def save_drafter(drafter: Drafter, folder: Path, backbone=None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    meta = dict(drafter.meta)
    if backbone is not None:
        meta["backbone"] = backbone_meta(backbone)
    config = {"format": FORMAT, "heads": drafter.heads.cfg.as_dict(), **meta}
    tensors = {}
    for prefix, mod in (("heads", drafter.heads), ("clp", drafter.clp), ("gates", drafter.gates),
                        ("competing", drafter.competing)):
        if mod is None:
            continue
        if prefix == "competing":
            config["competing"] = mod.cfg.as_dict()
        tensors.update(stored_tensors(mod, prefix + "."))
    config["components"] = sorted({k.split(".")[0] for k in tensors})
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def load_drafter(folder: Path, backbone=None) -> Drafter:
    """Load a bundle; with `backbone`, check it matches and attach the LM-head rows."""
    from safetensors.torch import load_file

    folder = check_heads_folder(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        tensors = load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - corrupt files of any kind
        raise ClpError(f"cannot read heads in {str(folder)!r}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ClpError(f"{str(folder)!r} is not a clp-decode heads folder (format {fmt!r})")

    def part(prefix: str) -> dict:
        return loaded_tensors({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})

    def make_heads(cfg: dict, state: dict) -> MTPHeads | ChainedHeads | Eagle3Drafter:
        design = cfg.get("design")
        if design == "eagle3":
            heads = Eagle3Drafter(Eagle3Config(**cfg))
        elif design == "chained":
            heads = ChainedHeads(ChainConfig(**cfg))
        else:
            heads = MTPHeads(HeadsConfig(**cfg))
        heads.set_draft_vocab(state["draft_ids"])  # sized by the file, so set before loading
        heads.load_state_dict(state)
        return heads

    parts = {name: part(name) for name in ("heads", "clp", "gates", "competing")}
    try:
        if not isinstance(config.get("heads"), dict):
            raise ValueError('config.json has no "heads" object')
        heads = make_heads(config["heads"], parts["heads"])
        hcfg = heads.cfg
        pcfg = PredictorConfig(k=hcfg.k, hidden_size=hcfg.hidden_size)
        clp = gates = competing = None
        if parts["clp"]:
            clp = CLP(pcfg)
            clp.load_state_dict(parts["clp"])
        if parts["gates"]:
            gates = Gates(pcfg)
            gates.load_state_dict(parts["gates"])
        if parts["competing"]:
            competing = make_heads(config["competing"], parts["competing"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ClpError(f"heads in {str(folder)!r} do not match their config.json ({msg})") from None
    meta = {k: v for k, v in config.items() if k not in ("format", "heads", "competing", "components")}
    drafter = Drafter(heads=heads, clp=clp, gates=gates, competing=competing, meta=meta)
    for m in (heads, clp, gates, competing):
        if m is not None:
            m.eval()
    return drafter.attach(backbone) if backbone is not None else drafter


def check_heads_folder(folder: str | Path) -> Path:
    """A heads folder as given (--heads): a directory holding config.json and
    model.safetensors. Checked without reading them (load_drafter reads them)."""
    path = Path(folder)
    if not path.exists():
        raise ClpError(f"heads folder {str(folder)!r} does not exist")
    if not path.is_dir():
        raise ClpError(f"heads folder {str(folder)!r} is a file; give the folder holding config.json and "
                       "model.safetensors")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ClpError(f"{str(folder)!r} is not a heads folder (needs config.json and model.safetensors)")
    return path


def shipped_ks(backbone_name: str) -> list[int]:
    """The k of every default drafter shipped for a backbone (k{k} folders), ascending."""
    root = Path(str(resources.files("clpdecode") / "assets" / "drafters" / backbone_name))
    if not root.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir()
                  if p.name[:1] == "k" and p.name[1:].isdigit() and (p / "config.json").is_file())


def default_k(backbone_name: str) -> int | None:
    """The k loaded when none is asked for: the largest shipped for this backbone (None: none)."""
    ks = shipped_ks(backbone_name)
    return max(ks) if ks else None


def drafter_folder(backbone_name: str, k: int | None = None, folder: str | Path | None = None,
                   required: bool = True) -> Path | None:
    """Where a backbone's drafter comes from, checked without loading anything (the one
    check of --heads and --k, run by every command before the backbone loads).

    `folder` (--heads): a heads folder, whose own config sets k (`k` is not used then).
    Otherwise the bundle shipped for this backbone and `k` (None: the largest shipped, see
    default_k): k must be at least 1, and one
    of the shipped k where any are shipped for this backbone. Where none are: an error if
    `required`, else None (no drafter).
    """
    if folder is not None:
        return check_heads_folder(folder)
    if k is None:
        k = default_k(backbone_name)
        if k is None:
            if required:
                raise ClpError(f"no heads are shipped for {backbone_name!r}: train some with `clp distill` and "
                               "`clp train`, then pass --heads DIR")
            return None
    check_positive_int("--k", k)
    shipped = shipped_drafter_dir(backbone_name, k)
    if shipped is not None:
        return shipped
    ks = shipped_ks(backbone_name)
    if ks:
        raise ClpError(f"no heads are shipped for {backbone_name!r} with k={k}: use --k "
                       f"{' or '.join(map(str, ks))}, or pass --heads DIR")
    if required:
        raise ClpError(f"no heads are shipped for {backbone_name!r}: train some with `clp distill` and "
                       "`clp train`, then pass --heads DIR")
    return None


def shipped_drafter_dir(backbone_name: str, k: int, baseline: bool = False, create: bool = False) -> Path | None:
    """The bundle shipped inside the package for this backbone and k, if any.

    ``k{k}``: the default drafter (a chain); ``independent-k{k}`` (baseline=True): the
    independent heads it replaced, kept for comparison (`clp eval-heads --baseline`).
    With ``create``, the path is returned even when nothing is there yet.
    """
    root = resources.files("clpdecode") / "assets" / "drafters" / backbone_name
    path = Path(str(root)) / (f"independent-k{k}" if baseline else f"k{k}")
    return path if create or (path / "config.json").is_file() else None


def shipped_head_accuracy(backbone_name: str) -> dict[str, dict]:
    """Held-out head accuracy recorded in each shipped bundle of a backbone, by k."""
    out = {}
    for k in range(1, 9):
        folder = shipped_drafter_dir(backbone_name, k)
        if folder is not None:
            heads = json.loads((folder / "config.json").read_text()).get("training", {}).get("heads")
            if heads:
                out[str(k)] = heads
    return out


def default_drafter(backbone, k: int | None = None, folder: str | Path | None = None) -> Drafter:
    """Heads from `folder` (its own k), else the ones shipped for this backbone and k (None:
    the largest shipped)."""
    return load_drafter(drafter_folder(backbone.name, k, folder), backbone)


# ---- the one resolution of --heads / --k, for every command and the server ------------------
def check_drafter(model: str, k: int | None = None, folder: str | Path | None = None,
                  required: bool = True) -> Path | None:
    """Before the backbone loads: where the drafter of `model` (as --model names it) will come
    from, with every check that needs no load (drafter_folder)."""
    from ..backbone.loading import backbone_name

    return drafter_folder(backbone_name(model), k, folder, required)


def resolve_drafter(backbone, k: int | None = None, folder: str | Path | None = None,
                    required: bool = True) -> Drafter | None:
    """After the load: the `folder` (--heads) drafter or the shipped one for this backbone and k.
    Without `required` (and without a folder), None where no shipped drafter fits the backbone:
    a command that can run without one (`clp info`, `clp serve --method ar`) then does."""
    if folder is not None or required:
        return default_drafter(backbone, k, folder)
    try:
        return default_drafter(backbone, k)
    except ClpError:
        return None
