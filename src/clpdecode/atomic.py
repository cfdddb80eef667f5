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


PACKAGE_DIR = Path(__file__).resolve().parent  # the installed package: read-only input, never an output


def check_writable(path, flag: str, folder: bool = True) -> Path:
    """Refuse an output path that cannot be written, before anything slow runs (a long run
    must not die at its last step): the package's own folder (its assets are read-only
    input), a file where a folder is wanted or the reverse, a file in the way of a folder
    to create, and a place this process may not write. A folder (`folder`) may be created
    with its missing parents; a file's folder must exist. Nothing is created here."""
    from .errors import ClpError

    path = Path(path).expanduser()
    where = path.resolve()
    if where == PACKAGE_DIR or PACKAGE_DIR in where.parents:
        raise ClpError(f"{flag} {path} is inside the installed package ({PACKAGE_DIR}), whose files are read-only "
                       "input: name a folder outside it")
    if folder and path.exists() and not path.is_dir():
        raise ClpError(f"{flag} {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise ClpError(f"{flag} {path} is a folder, not a file")
    existing = path if path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ClpError(f"{flag} {path}: {existing} is a file, not a folder")
    if not folder and existing != path and existing != path.parent:
        raise ClpError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ClpError(f"{flag} {path}: no permission to write in {existing}")
    return path
