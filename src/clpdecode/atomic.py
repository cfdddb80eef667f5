"""Atomic writes: every artifact is written beside its target and renamed into place, so a
killed process leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; an artifact gets the mode a plain
    open()/mkdir() would have given it (0666/0777 less the umask), so others can read it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_file(path: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call write(tmp) on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        _usual_mode(Path(tmp), directory=False)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        _usual_mode(tmp, directory=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
