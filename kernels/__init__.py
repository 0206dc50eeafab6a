"""Triton kernels and their thin launchers (installed as vllm_hsr.kernels).

A leaf of the package: imports torch and triton only (the cpu_* modules: torch and a C++ compiler), never
vllm_hsr or vLLM.
Each kernel's pure-torch twin lives in vllm_hsr/core (docs/kernels.md).
"""
