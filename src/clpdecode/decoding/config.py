"""The decoding policy's settings: one frozen object, validated once.

The CLI (its flags), the server (a request's fields over the server's defaults), the bench
and the Python API (keyword arguments) each build a PolicyConfig and hand that one object
to make_policy(); nothing else checks these settings. Field names are the Python API's and
the server's names; the CLI's flags are the same with dashes (`clp_threshold` ->
`--clp-threshold`), and error messages name the field (ClpError.param), which each front
end renames its own way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..errors import ClpError, check_unit_interval
from .tree import DEFAULT_TREE, TreeConfig, parse_tree

METHODS = ("ar", "naive", "gate", "clp", "verified", "competing")
DRAFTS = ("clp", "all")

# The CLP threshold of verified and clp decoding by default: the best of 0.3 / 0.5 for both
# shipped drafters on MT-Bench (scripts/sweep_drafts.py; docs/design.md, "Verified settings").
DEFAULT_CLP_THRESHOLD = 0.3


@dataclass(frozen=True)
class PolicyConfig:
    method: str = "ar"  # one of METHODS (policies.py has the table)
    clp_threshold: float = DEFAULT_CLP_THRESHOLD  # clp / verified: the largest m with P(length >= m) >= this
    gate_threshold: float = 0.5  # gate: accept head tokens while P(correct) >= this
    draft: str = "clp"  # verified: span from CLP ("clp") or always k ("all")
    lookup: bool = True  # verified: n-gram lookup drafts where the text's tail occurred before
    lookup_tokens: int = 0  # verified: most tokens a lookup draft copies (0: the drafter's k)
    tree: str | int | TreeConfig = DEFAULT_TREE  # verified: "chain", or a tree of up to N draft nodes
    max_drafts: int = 0  # at most this many head tokens a step, whatever the method (0: no cap; naive at k' < k)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ClpError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}", param="method")
        check_unit_interval("clp_threshold", self.clp_threshold)
        check_unit_interval("gate_threshold", self.gate_threshold)
        if self.draft not in DRAFTS:
            raise ClpError(f"draft must be one of {', '.join(DRAFTS)}, got {self.draft!r}", param="draft")
        if not isinstance(self.lookup, bool):
            raise ClpError(f"lookup must be true or false, got {self.lookup!r}", param="lookup")
        n = self.lookup_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ClpError(f"lookup_tokens must be a whole number >= 0 (0: k), got {n!r}", param="lookup_tokens")
        parse_tree(self.tree)  # 'chain' or a size >= 1, whatever the method
        n = self.max_drafts
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ClpError(f"max_drafts must be a whole number >= 0 (0: no cap), got {n!r}", param="max_drafts")

    @property
    def tree_config(self) -> TreeConfig | None:
        """The draft tree of verified decoding (None: a chain)."""
        return parse_tree(self.tree)

    @property
    def needs_drafter(self) -> bool:
        return self.method != "ar"

    def with_method(self, method: str) -> "PolicyConfig":
        return replace(self, method=method)

    @classmethod
    def from_namespace(cls, ns, **overrides) -> "PolicyConfig":
        """The config from any object carrying some of its fields as attributes (an argparse
        namespace): missing ones keep their defaults; `overrides` win."""
        found = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        return cls(**{**found, **overrides})

    def as_record(self) -> dict:
        """The settings as results files record them (method apart: a bench runs several)."""
        return {f.name: (str(getattr(self, f.name)) if f.name == "tree" else getattr(self, f.name))
                for f in fields(self) if f.name != "method"}
