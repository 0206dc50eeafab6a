"""HSR attention backend for vLLM: the platform's dense backend with HSR decode."""

from __future__ import annotations

from vllm_hsr import _vllm
from vllm_hsr.plugin import BACKEND_NAME


class HSRAttentionBackend(_vllm.CPUAttentionBackend):
    """Registered as HSR (and CUSTOM); shares CPU_ATTN's KV-cache layout and prefill."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME
