"""The compiled CPU kernel's build: a private per-user cache, one build for concurrent processes, the
compiler's version in the key, and every failure a NativeBuildError that `auto` turns into the torch twin."""

import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vllm_hsr import ops
from vllm_hsr.kernels import cpu_build
from vllm_hsr.stats import DecodeStatsLog


@pytest.fixture
def fresh_build(monkeypatch):
    """No library loaded or build verdict cached; both are reset again afterwards."""
    monkeypatch.delenv("HSR_BUILD_DIR", raising=False)
    monkeypatch.delenv("VLLM_HSR_BUILD_DIR", raising=False)
    cpu_build.library.cache_clear()
    ops.native_unavailable.cache_clear()
    yield
    cpu_build.library.cache_clear()
    ops.native_unavailable.cache_clear()


def test_default_cache_is_created_private(monkeypatch, tmp_path, fresh_build):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    directory = cpu_build._build_dir()
    assert directory == tmp_path / "xdg" / "vllm_hsr"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_shared_or_foreign_directories_are_refused(monkeypatch, tmp_path, fresh_build):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("HSR_BUILD_DIR", str(shared))
    with pytest.raises(cpu_build.NativeBuildError, match="writable by other users"):
        cpu_build._build_dir()
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    monkeypatch.setenv("HSR_BUILD_DIR", str(own))
    assert cpu_build._build_dir() == own
    monkeypatch.setattr(os, "getuid", lambda: own.stat().st_uid + 1)
    with pytest.raises(cpu_build.NativeBuildError, match="belongs to uid"):
        cpu_build._build_dir()


def test_unusable_home_cache_gets_a_fresh_private_directory(monkeypatch, tmp_path, fresh_build, caplog):
    """Never a fixed name in the temporary folder, which another user could have created first."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))        # mkdir under a file fails
    with caplog.at_level(logging.WARNING):
        first, second = cpu_build._build_dir(), cpu_build._build_dir()
    assert first != second and first.parent == second.parent
    for directory in (first, second):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and directory.stat().st_uid == os.getuid()
    assert "for this process only" in caplog.text


def test_the_compiler_version_is_in_the_key(monkeypatch, fresh_build):
    compiler, flags = cpu_build.compiler_and_flags()
    name = cpu_build.library_name(compiler, flags)
    assert name == cpu_build.library_name(compiler, flags)
    monkeypatch.setattr(cpu_build, "_compiler_version", lambda compiler: "g++ 99.0")
    assert cpu_build.library_name(compiler, flags) != name


def test_concurrent_processes_build_once(tmp_path):
    """Three processes load the library at once from an empty cache: the compiler runs one build."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = "--version" ] || echo build >> {calls}
        exec g++ "$@"
        """))
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.endswith("BUILD_DIR")}
    env |= {"CXX": str(wrapper), "HSR_BUILD_DIR": str(tmp_path / "cache")}
    probe = "from vllm_hsr.kernels import cpu_build; cpu_build.library(); print('loaded')"
    procs = [subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    assert all(out.strip() == "loaded" for out, _ in outputs)
    assert calls.read_text().splitlines() == ["build"]
    assert len(list((tmp_path / "cache").glob("hsr_cpu-*.so"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_an_os_error_falls_back_to_the_torch_twin_visibly(monkeypatch, tmp_path, fresh_build, caplog):
    """HSR_BUILD_DIR is a file: the build cannot happen; auto decodes with the torch twin, the log says so
    once, and the stats line and metrics name the fallback."""
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("HSR_BUILD_DIR", str(not_a_directory))
    monkeypatch.setenv("HSR_KERNELS", "auto")
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING):
        assert ops.kernel_path(cpu) == "torch"
        assert ops.kernel_path(cpu) == "torch"
    assert caplog.text.count("compiled CPU kernel is unavailable") == 1
    reason = ops.kernel_fallback(cpu)
    assert reason and str(not_a_directory) in reason
    log = DecodeStatsLog()
    log.set_kernel(ops.kernel_path(cpu), reason)
    assert "[torch, fallback: the compiled kernel is unavailable]" in log.summary()
    monkeypatch.setenv("HSR_KERNELS", "native")                # asked for by name: an error, not a fallback
    with pytest.raises(cpu_build.NativeBuildError, match="cannot create the kernel cache"):
        ops.kernel_path(cpu)
