"""A cache that cannot be written: one `clp: error:` line naming the folder (exit 2) when
something must be built there; a complete one answers, on its built kernels, without writing.

Tests run as root here, where a chmod'ed folder stays writable, so a read-only cache is
simulated: every write below it fails as a read-only mount makes it fail (EROFS)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest

from clpdecode.backbone import cache_dir, kernels
from clpdecode.cli import main

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def read_only(monkeypatch, root: Path) -> list[str]:
    """Make every write under `root` fail with EROFS (files, folders, renames, removals);
    returns the paths something tried to write."""
    root = os.path.realpath(root)
    tried: list[str] = []

    def under(path) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.realpath(os.fsdecode(path))
        return p == root or p.startswith(root + os.sep)

    def refuse(path):
        tried.append(os.fsdecode(path))
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def guard(fn, *path_args: int, writes=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if writes(*args, **kwargs):
                for i in path_args:
                    if i < len(args) and under(args[i]):
                        refuse(args[i])
            return fn(*args, **kwargs)
        return wrapped

    def file_writes(file, mode="r", *a, **k):
        return any(c in mode for c in "wxa+")

    def flag_writes(path, flags, *a, **k):
        return bool(flags & _WRITE_FLAGS)

    monkeypatch.setattr(builtins, "open", guard(builtins.open, 0, writes=file_writes))
    monkeypatch.setattr(io, "open", guard(io.open, 0, writes=file_writes))
    monkeypatch.setattr(os, "open", guard(os.open, 0, writes=flag_writes))
    for name in ("mkdir", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0))
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0, 1))
    return tried


def forget_kernels(monkeypatch) -> None:
    """Make kernels.load() look for the kernels again, as a new process would (until the test ends)."""
    monkeypatch.setattr(kernels, "_state", {k: v for k, v in kernels._state.items() if k != "module"})


def error_line(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clp: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi", "--max-new-tokens", "2"], ["info", "--json"]])
@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only"])
def test_an_unwritable_cache_is_one_error_line(capsys, monkeypatch, tmp_path, command, kind):
    """The embedded model must be converted into the cache: that cannot happen, and says where."""
    from clpdecode.backbone.loading import embedded_gguf_path
    from clpdecode.errors import ClpError

    try:
        embedded_gguf_path()
    except ClpError:
        pytest.skip("the embedded model is not installed")
    blocker = tmp_path / "cache"
    if kind == "read-only":
        blocker.mkdir()
        read_only(monkeypatch, blocker)
        cache, why = blocker, "Read-only file system"
    else:
        blocker.write_text("not a folder")
        cache, why = (blocker if kind == "a file" else blocker / "sub"), f"{blocker} is a file"
    monkeypatch.setenv("CLP_CACHE", str(cache))
    line = error_line(capsys, *command)
    assert f"cache folder {cache / 'models'}" in line and why in line and "CLP_CACHE" in line


def test_kernels_not_built_in_a_read_only_cache_are_the_users_error(monkeypatch, tmp_path):
    """Where the kernels must be built but the cache cannot hold them: the same error (not a
    traceback, not a silent fall-back to the slower kernel)."""
    from clpdecode.errors import ClpError

    monkeypatch.setenv("CLP_CACHE", str(tmp_path))
    read_only(monkeypatch, tmp_path)
    forget_kernels(monkeypatch)
    with pytest.raises(ClpError, match=f"cache folder {tmp_path / 'kernels'} .Read-only file system"):
        kernels.load(quiet=True)


def test_a_complete_read_only_cache_answers_on_its_built_kernels(capsys, monkeypatch, tiny_llama_dir):
    """The kernels built in the cache are loaded without writing a byte there (torch's loader
    wanted to write its lock, failed, and q4 fell back to torch's int4 kernel)."""
    if kernels.load(quiet=True) is None:
        pytest.skip("no C++ kernels here")
    argv = ["generate", "--model", str(tiny_llama_dir), "--numerics", "q4", "--prompt", "hi", "--max-new-tokens",
            "8", "--json"]
    assert main(argv) == 0
    expected = json.loads(capsys.readouterr().out)["token_ids"]
    tried = read_only(monkeypatch, cache_dir())
    forget_kernels(monkeypatch)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["token_ids"] == expected
    assert kernels._state["module"] is not None and "could not be built" not in err, err
    assert tried == []
