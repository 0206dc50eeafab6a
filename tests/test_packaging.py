"""The wheel carries kernels/ as vllm_hsr.kernels, the real text with its licence, and both vLLM entry points."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_and_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True)
    wheel = next(tmp_path.glob("vllm_hsr-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "vllm_hsr/kernels/__init__.py" in names
    sources = sorted(path.name for path in (ROOT / "kernels" / "cpu").iterdir() if path.suffix in (".cpp", ".h"))
    assert {"hsr_decode.cpp", "summary_update.cpp", "common.h", "walk.h"} <= set(sources)
    for source in sources:                                                 # CPU kernels compile where they run
        assert f"vllm_hsr/kernels/cpu/{source}" in names
    assert not any(n.startswith("kernels/") for n in names)
    for data in ("python_reference.txt", "PSF-LICENSE.txt", "README.md"):  # vllm_hsr.corpus reads them
        assert f"vllm_hsr/data/{data}" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[vllm.general_plugins]" in entry_points and "[vllm.platform_plugins]" in entry_points

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    probe = ("import vllm_hsr, vllm_hsr.kernels, vllm_hsr.core; from vllm_hsr.kernels import cpu_build; "
             "assert all(p.is_file() for p in (*cpu_build.SOURCES, *cpu_build.HEADERS)); "
             "from vllm_hsr.corpus import paragraphs; assert len(paragraphs()) > 1000; "
             "print(vllm_hsr.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True,
                         text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip().startswith(str(target))
