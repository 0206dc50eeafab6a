"""Shared fixtures: the tiny local model, built once per checkout and reused."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from vllm_hsr.tiny_model import build_tiny_model
    return build_tiny_model(ROOT / ".tiny-model" / "tests", layers=2, max_position=8192)
