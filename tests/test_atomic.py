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
