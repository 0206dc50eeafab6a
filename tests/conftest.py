"""Shared fixtures: the tiny local model, built once per checkout and reused.

The Triton kernels run in Triton's interpreter here. TRITON_INTERPRET is read when a
triton.jit function is defined, and importing vLLM (some test modules do, at collection)
imports triton; so it is set before any test module is imported. Engines and servers
started by tests run without it.
"""

import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from vllm_hsr.tiny_model import build_tiny_model
    return build_tiny_model(ROOT / ".tiny-model" / "tests", layers=2, max_position=8192)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as a float32 checkpoint (vllm_hsr.real_model), built once per checkout."""
    from vllm_hsr.real_model import build_real_model
    return build_real_model(ROOT / ".real-model")

