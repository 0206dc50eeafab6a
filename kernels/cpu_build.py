"""Builds and loads the CPU kernels' library (kernels/cpu/*.cpp) with the machine's C++ compiler.

Compiled on first use with `CXX` (default g++) plus any HSR_CXXFLAGS (a few seconds, no torch headers)
into a private per-user cache (HSR_BUILD_DIR, default $XDG_CACHE_HOME/vllm_hsr or ~/.cache/vllm_hsr),
keyed by the sources, the compiler's version, the flags and the CPU, and loaded with ctypes. The
directory is created with mode 0700 and refused unless it belongs to the user and no one else can
write to it (a library loaded from a directory others can write runs their code). Processes that start
together (vLLM's workers) build once: the build holds a file lock. Every failure, OSErrors included,
is a NativeBuildError naming its cause. Each launcher checks the library's argument structs.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

from vllm_hsr import envs
from vllm_hsr.log import init_logger, warning_once

logger = init_logger(__name__)
DIRECTORY = Path(__file__).parent / "cpu"
SOURCES = (DIRECTORY / "hsr_decode.cpp", DIRECTORY / "summary_update.cpp")
HEADERS = tuple(sorted(DIRECTORY.glob("*.h")))   # every header the sources include
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # DType in common.h
# -fassociative-math (with the two flags it needs) lets dot products vectorize; it only reorders sums,
# which the bounds' rounding margins already cover. No -ffast-math: the bounds rely on inf and NaN.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")


class NativeBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


def cpu_flags_line() -> str:
    """The CPU's flags line of /proc/cpuinfo ("" where there is none)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _cpu_signature() -> bytes:
    """What -march=native depends on: the machine and its CPU flags."""
    return (platform.machine() + cpu_flags_line()).encode()


def _default_build_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "vllm_hsr"


def private_directory(directory: Path) -> Path:
    """`directory`, created with mode 0700 if missing, checked to belong to this user and to be writable by
    no one else. Raises NativeBuildError naming what is wrong."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as error:
        raise NativeBuildError(f"cannot create the kernel cache directory {directory}: {error}") from error
    if not stat.S_ISDIR(info.st_mode):
        raise NativeBuildError(f"the kernel cache {directory} is not a directory")
    if info.st_uid != os.getuid():
        raise NativeBuildError(f"the kernel cache {directory} belongs to uid {info.st_uid}, not to this user "
                               f"({os.getuid()}): set HSR_BUILD_DIR to a directory of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(f"the kernel cache {directory} is writable by other users (mode "
                               f"{stat.S_IMODE(info.st_mode):o}): chmod 700 it or set HSR_BUILD_DIR")
    return directory


def _build_dir() -> Path:
    """HSR_BUILD_DIR, else the per-user cache; where the home cache cannot be created, a fresh private
    directory (mkdtemp: mode 0700, an unpredictable name) that lasts for this process."""
    configured = envs.get("BUILD_DIR")
    if configured:
        return private_directory(Path(configured))
    try:
        return private_directory(_default_build_dir())
    except NativeBuildError as error:
        fresh = Path(tempfile.mkdtemp(prefix="vllm_hsr-"))
        warning_once(logger, "HSR: %s; building the CPU kernel in %s for this process only", error, fresh)
        return fresh


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"cannot run the C++ compiler {compiler!r} (set CXX): {error}") from error
    if result.returncode:
        raise NativeBuildError(f"{compiler} --version failed: {result.stderr[-2000:]}")
    return result.stdout


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> None:
    """Build the library at `path` unless it exists, holding the directory's lock, so concurrent processes
    build once and each loads a whole library."""
    with open(path.parent / "build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes
        if path.exists():                          # built by the process that held the lock
            return
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(partial)], capture_output=True,
                                text=True)
        if result.returncode:
            partial.unlink(missing_ok=True)
            raise NativeBuildError(f"{compiler} failed to build the CPU kernels:\n{result.stderr[-4000:]}")
        os.replace(partial, path)


def compiler_and_flags() -> tuple[str, tuple[str, ...]]:
    return os.environ.get("CXX", "g++"), (*FLAGS, *(envs.get("CXXFLAGS") or "").split())


def library_name(compiler: str, flags: tuple[str, ...]) -> str:
    """The library's file name: a hash of the sources, the compiler and its version, the flags and the CPU."""
    try:
        text = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    except OSError as error:
        raise NativeBuildError(f"cannot read the CPU kernels' sources: {error}") from error
    key = hashlib.sha256(text + " ".join((compiler, *flags)).encode() + _compiler_version(compiler).encode()
                         + _cpu_signature())
    return f"hsr_cpu-{key.hexdigest()[:16]}.so"


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel (built once per source, compiler version, flags and CPU). Raises NativeBuildError."""
    compiler, flags = compiler_and_flags()
    path = _build_dir() / library_name(compiler, flags)
    try:
        if not path.exists():
            _compile(compiler, flags, path)
        return ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeBuildError(f"cannot build or load {path}: {error}") from error
