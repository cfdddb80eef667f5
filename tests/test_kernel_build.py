"""The q4 kernels' build (backbone/kernels.py): a build killed at any point, or a stale lock of
torch's, never blocks a later run.

Each run is a fresh process on a fresh cache. Its compiler is replaced by a copy of the library
this test session built (or found) in its own cache: the build's locking, temporary folder and
rename are what is tested, without paying for a compile per test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clpdecode.backbone import kernels

# A run of kernels.load() whose compile step is `COMPILE` (a statement on `tmp`, `name`).
RUN = """
import shutil, sys, time
from pathlib import Path
from clpdecode.backbone import kernels

def fake_compile(tmp, name):
{compile}

kernels._compile = fake_compile
module = kernels.load()
print("levels", module.activation_levels() if module is not None else None, flush=True)
"""
COPY = "    shutil.copy(sys.argv[1], Path(tmp) / Path(sys.argv[1]).name)"
# What a killed compile leaves: torch's FileBaton `lock` in the folder, then it hangs until killed.
HANG = ("    (Path(tmp) / 'lock').touch(); (Path(tmp) / 'build.ninja').write_text('')\n"
        "    Path(sys.argv[2]).touch(); time.sleep(600)")


@pytest.fixture(scope="module")
def library() -> Path:
    """This session's built kernels (the one real build, shared with the rest of the suite)."""
    if kernels.load(quiet=True) is None:
        pytest.skip("the C++ kernels cannot be built here")
    folder, key = kernels._build_dir()
    from torch.utils.cpp_extension import LIB_EXT

    return folder / f"clp_kernels_{key}{LIB_EXT}"


def start(cache: Path, compile_: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "CLP_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", RUN.format(compile=compile_), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finishes(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The run's stdout; a run that waits on a lock fails here instead of hanging the suite."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"kernels.load() still waiting after {timeout} s: blocked by a stale lock")
    assert proc.returncode == 0, err
    return out


def test_a_build_killed_midway_does_not_block_the_next_run(tmp_path, library):
    cache, started = tmp_path / "cache", tmp_path / "started"
    first = start(cache, HANG, str(library), str(started))
    deadline = time.monotonic() + 120
    while not started.exists():
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "the first run never started its build"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # as `kill -9` on its process group
    first.communicate()
    folder = Path("kernels", kernels._build_dir()[1])
    leftovers = list((cache / folder).parent.glob(f".{folder.name}-*/lock"))
    assert leftovers, "the killed build left no torch lock: nothing tested"
    out = finishes(start(cache, COPY, str(library)))
    assert out.split() == ["levels", str(kernels.load().activation_levels())]
    assert not list((cache / folder).parent.glob(f".{folder.name}-*"))  # the killed build's folder is gone
    assert (cache / folder / library.name).is_file()


def test_a_stale_torch_lock_in_the_kernel_folder_does_not_block(tmp_path, library):
    """An earlier version built in place: a run killed then left torch's `lock` in the kernel
    folder itself, and every later run waited on it forever."""
    cache = tmp_path / "cache"
    folder = cache / "kernels" / kernels._build_dir()[1]
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    (folder / "build.ninja").write_text("")
    out = finishes(start(cache, COPY, str(library)))
    assert out.split()[0] == "levels" and out.split()[1] != "None"
    assert not (folder / "lock").exists() and (folder / library.name).is_file()
    # Built: the next run loads it without compiling (its compiler would fail).
    assert finishes(start(cache, "    raise RuntimeError('compiled again')")).split()[1] != "None"
