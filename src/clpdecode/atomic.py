"""Atomic writes: every artifact is written beside its target and renamed into place, so a
killed process leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator


def _temporary_name(target: Path, sep: str, suffix: str = "") -> Path:
    """A hidden, random name beside `target`. Created with a plain exclusive open()/mkdir()
    (not mkstemp/mkdtemp, whose entries are private: 0600/0700), so the artifact gets the
    mode any file or folder gets here (0666/0777 less the umask)."""
    return target.parent / f".{target.name}{sep}{secrets.token_hex(6)}{suffix}"


def atomic_file(path: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call write(tmp) on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, ".", suffix)
    open(tmp, "x").close()
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `folder` whole."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(folder, "-")
    tmp.mkdir()
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
