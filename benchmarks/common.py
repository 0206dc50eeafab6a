"""What the benchmarks share: where results go and the name of the machine they ran on."""

from __future__ import annotations

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
