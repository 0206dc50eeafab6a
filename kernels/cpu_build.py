"""Builds and loads the CPU kernels' library (kernels/cpu/*.cpp) with the machine's C++ compiler.

Compiled on first use with `CXX` (default g++) plus any `VLLM_HSR_CXXFLAGS` (a few seconds, no torch
headers) into a per-user cache (`VLLM_HSR_BUILD_DIR`, default ~/.cache/vllm_hsr) keyed by the sources,
the flags and the CPU, and loaded with ctypes. Each launcher checks the library's argument structs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

DIRECTORY = Path(__file__).parent / "cpu"
SOURCES = (DIRECTORY / "hsr_decode.cpp", DIRECTORY / "summary_update.cpp")
HEADERS = (DIRECTORY / "common.h",)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # DType in common.h
# -fassociative-math (with the two flags it needs) lets dot products vectorize; it only reorders sums,
# which the bounds' rounding margins already cover. No -ffast-math: the bounds rely on inf and NaN.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")


class NativeBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


def _cpu_signature() -> bytes:
    """What -march=native depends on: the machine and its CPU flags."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return (platform.machine() + flags).encode()


def _build_dir() -> Path:
    configured = os.environ.get("VLLM_HSR_BUILD_DIR")
    if configured:
        return Path(configured)
    home = Path.home() / ".cache" / "vllm_hsr"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / "vllm_hsr"


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel (built once per source, flags and CPU). Raises NativeBuildError."""
    compiler = os.environ.get("CXX", "g++")
    flags = (*FLAGS, *os.environ.get("VLLM_HSR_CXXFLAGS", "").split())
    try:
        text = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    except OSError as error:
        raise NativeBuildError(f"cannot read the CPU kernels' sources: {error}") from error
    key = hashlib.sha256(text + " ".join((compiler, *flags)).encode() + _cpu_signature())
    directory = _build_dir()
    path = directory / f"hsr_cpu-{key.hexdigest()[:16]}.so"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(partial)], capture_output=True,
                                    text=True)
        except OSError as error:
            raise NativeBuildError(f"cannot run the C++ compiler {compiler!r} (set CXX): {error}") from error
        if result.returncode:
            raise NativeBuildError(f"{compiler} failed to build the CPU kernels:\n{result.stderr[-4000:]}")
        os.replace(partial, path)    # atomic: a concurrent process loads a whole library or builds its own
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeBuildError(f"cannot load {path}: {error}") from error
    return lib
