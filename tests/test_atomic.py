"""Atomic writes: a failed write leaves the previous artifact untouched and no debris."""

from __future__ import annotations

import pytest

from clpdecode.atomic import atomic_file, atomic_folder, atomic_write_text


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")

    def crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_file(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    with atomic_folder(tmp_path / "h") as tmp:
        (tmp / "config.json").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "h") as tmp:
            (tmp / "config.json").write_text("v2")
            raise RuntimeError("killed")
    assert (tmp_path / "h" / "config.json").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["h"]


def test_artifacts_get_the_usual_permissions_not_private_ones(tmp_path):
    """mkstemp/mkdtemp would make 0600/0700 entries; a written artifact must be readable as a plain
    open()/mkdir() would have left it (0644/0755 under the usual umask 022)."""
    import os

    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_folder(tmp_path / "bundle") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755
