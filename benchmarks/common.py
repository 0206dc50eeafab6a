"""What the benchmarks share: where results go, the machine, commit and command behind a record, writing records."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line),
                     platform.processor())
    return f"{model} ({os.cpu_count()} cores, torch {torch.__version__})"


def dense_backend() -> str:
    """vLLM's dense backend on this machine: the speed and answer baseline."""
    return "FLASH_ATTN" if torch.cuda.is_available() else "CPU_ATTN"


def provenance() -> dict:
    """The commit ('-dirty' with uncommitted changes), machine and command a record comes from."""
    import shlex
    import subprocess
    import sys

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=RESULTS.parent, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # the results a run rewrites as it goes do not make the code it ran dirty
    if git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results"):
        commit += "-dirty"
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(RESULTS.parents[1]):
        script = script.relative_to(RESULTS.parents[1])
    command = "python " + shlex.join([str(script), *sys.argv[1:]])
    return {"commit": commit, "device": machine(), "command": command}


def finish_worker(llm, result: dict) -> None:
    """A worker's ending: its `RESULT {json}` line, its engine shut down, and an exit that skips the
    interpreter's teardown, where a finished run has aborted in CI ('terminate called without an
    active exception', exit -6) after its result was complete."""
    import sys
    import traceback
    print("RESULT " + json.dumps(result), flush=True)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:             # the result stands; say why the engine may not have stopped
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def write_records(records: list[dict], json_path: Path, plot_path: Path, table, plot) -> None:
    """The records as JSON, table(records) as Markdown beside it (and printed), plot(records, plot_path)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records, indent=1))
    json_path.with_suffix(".md").write_text(table(records))
    plot(records, plot_path)
    print(table(records))
    print(f"wrote {json_path}, {json_path.with_suffix('.md')} and {plot_path}")
