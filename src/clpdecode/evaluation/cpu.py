"""What the CPU offers, read from /proc/cpuinfo: recorded by every benchmark (the machines
these runs land on differ, AVX2-only to AMX), and the llama.cpp build flags `make peers` names.

    python -m clpdecode.evaluation.cpu                    # the record, as JSON
    python -m clpdecode.evaluation.cpu --ggml-cmake-args  # the flags for llama.cpp's cmake
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The instruction sets a record names (the kernels' and llama.cpp's choices turn on these);
# amx: all three of amx_tile, amx_int8 and amx_bf16.
RECORDED_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512vbmi",
                  "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")

# ggml's CPU options -> the /proc/cpuinfo flags each needs. GGML_AVX512 compiles with
# -mavx512f/cd/vl/dq/bw, so it needs all five.
GGML_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
# Always off: llama.cpp 0.3.36's AMX kernels die with SIGILL (`tilezero` in
# tinygemm_kernel_amx) on their first decode on the AMX Xeons these runs land on, which is
# what GGML_NATIVE=ON (-march=native) turned on.
GGML_OFF = ("GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def _cpuinfo_fields(path: Path = CPUINFO) -> dict[str, str]:
    """The first processor's fields (every core of one machine reports the same)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(path: Path = CPUINFO) -> set[str]:
    return set(_cpuinfo_fields(path).get("flags", "").split())


def cpu_info(path: Path = CPUINFO) -> dict:
    """The CPU a benchmark ran on, for its results: model name, logical CPUs, and whether it has
    each instruction set of RECORDED_FLAGS and AMX ({} of flags where /proc/cpuinfo is not
    readable, e.g. not Linux)."""
    fields = _cpuinfo_fields(path)
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "flags": {f: f in flags for f in RECORDED_FLAGS} | {"amx": all(f in flags for f in AMX_FLAGS)}
        if flags else {},
    }


def cpu_summary(info: dict) -> str:
    """One line for a report: the model and the instruction sets it has."""
    have = [f for f, on in info.get("flags", {}).items() if on]
    return f"{info['model']} ({info['logical_cpus']} logical CPUs; {', '.join(have) or 'flags unknown'})"


def ggml_cmake_args(flags: set[str]) -> list[str]:
    """llama.cpp's cmake options for a CPU with these flags: each instruction set named ON or OFF
    (an existing build folder's cache may hold other values), never -march=native, never AMX."""
    return ([f"-D{opt}=OFF" for opt in GGML_OFF]
            + [f"-D{opt}={'ON' if all(f in flags for f in need) else 'OFF'}" for opt, need in GGML_OPTIONS.items()])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--ggml-cmake-args"]:
        print(" ".join(ggml_cmake_args(cpu_flags())))
    elif not argv:
        print(json.dumps(cpu_info()))
    else:
        print("usage: python -m clpdecode.evaluation.cpu [--ggml-cmake-args]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
