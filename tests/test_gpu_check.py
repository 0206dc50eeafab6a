"""benchmarks/gpu_check.py, the checks a session lent a GPU runs, here on the CPU in Triton's interpreter:
every case passes, and a broken kernel is caught."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("case", gpu_check.CASES, ids=lambda case: f"{case[4]['mode']}-d{case[2]}-{case[3]}")
def test_gpu_check_cases_pass_in_the_interpreter(case):
    before = os.environ.get("HSR_KERNELS")
    record = gpu_check.run_case(*case, device="cpu", seq_lens=(1, 37, 300))
    assert record["passed"], record
    assert os.environ.get("HSR_KERNELS") == before         # the kernel choice is put back


def test_gpu_check_catches_a_wrong_kernel(monkeypatch):
    """A split kernel that drops the last candidate of every list fails the check."""
    from vllm_hsr.kernels import sparse_decode as module
    real = module.sparse_decode

    def dropping_last(q, cache, block_stride, head_stride, key_offsets, value_offsets, block_table, seq_lens,
                      tokens, counts, *args, **kwargs):
        return real(q, cache, block_stride, head_stride, key_offsets, value_offsets, block_table, seq_lens,
                    tokens, torch.clamp(counts - 1, min=0), *args, **kwargs)

    monkeypatch.setattr(module, "sparse_decode", dropping_last)
    record = gpu_check.run_case(*gpu_check.CASES[2], device="cpu", seq_lens=(1, 37, 300))
    assert not record["passed"] and record["max_abs_diff_vs_twin"] > 1e-3
