"""Package layering: `evaluation` and `training` sit side by side and never import each
other (what both need lives below them, e.g. clpdecode.corpus and clpdecode.datasets)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clpdecode

PACKAGE = Path(clpdecode.__file__).parent


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of everything `source` (a module of `package`) imports, including
    imports inside functions: a lazy import is still a dependency, which sys.modules
    after an import would miss. `from a import b` yields both a and a.b (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def package_of(path: Path) -> str:
    """The dotted package a source file under clpdecode/ belongs to."""
    return ".".join(("clpdecode", *path.relative_to(PACKAGE).parent.parts))


def test_imported_modules_sees_lazy_relative_imports():
    source = "import json\nfrom ..corpus import read_corpus\ndef f():\n    from .. import evaluation\n"
    assert imported_modules(source, "clpdecode.training") == {
        "json", "clpdecode.corpus", "clpdecode.corpus.read_corpus", "clpdecode", "clpdecode.evaluation"}
    assert "clpdecode.evaluation.prompts" in imported_modules(
        "def f():\n    from ..evaluation.prompts import sharegpt\n", "clpdecode.training")


@pytest.mark.parametrize("package, forbidden", [("training", "evaluation"), ("evaluation", "training")])
def test_evaluation_and_training_do_not_import_each_other(package, forbidden):
    offenders = sorted(
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in (PACKAGE / package).rglob("*.py")
        for name in imported_modules(path.read_text(encoding="utf-8"), package_of(path))
        if name == f"clpdecode.{forbidden}" or name.startswith(f"clpdecode.{forbidden}.")
    )
    assert not offenders, f"{package} imports {forbidden}: {offenders}"


def test_nothing_imports_the_top_cli():
    """cli.py builds configs and calls the package; the sub-CLIs (evaluation/cli.py,
    serve/cli.py, training/cli.py) and everything else sit below it: nothing imports it back
    (the drafter's resolution lives in heads.artifacts for all of them)."""
    offenders = sorted(
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py") if path != PACKAGE / "cli.py"
        for name in imported_modules(path.read_text(encoding="utf-8"), package_of(path))
        if name == "clpdecode.cli" or name.startswith("clpdecode.cli.")
    )
    assert not offenders, f"these import clpdecode.cli: {offenders}"
