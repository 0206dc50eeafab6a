"""The `vllm.platform_plugins` entry point: a CPU platform that honours the HSR selection.

vLLM's CpuPlatform returns CPU_ATTN whatever backend was selected. This platform
returns ours when HSR (or CUSTOM) is selected and defers to CpuPlatform otherwise.
It activates exactly where vLLM's own CPU platform would (never on CUDA).
"""

from __future__ import annotations

from vllm_hsr import _vllm
from vllm_hsr.config import HSRConfig
from vllm_hsr.plugin import BACKEND_NAME, BACKEND_PATH, register


def cpu_platform_plugin() -> str | None:
    if _vllm.builtin_cpu_platform_plugin() is None:
        return None
    register()  # early, so the enum member exists before any config is unpickled
    return "vllm_hsr.platform.HSRCpuPlatform"


def selects_hsr(selected_backend) -> bool:
    enum = _vllm.AttentionBackendEnum
    return selected_backend is not None and selected_backend in (
        enum.CUSTOM, enum.__members__.get(BACKEND_NAME, enum.CUSTOM))


class HSRCpuPlatform(_vllm.CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if selects_hsr(selected_backend):
            # As vLLM's CUDA platform does for a selected backend: refuse a set-up it cannot serve, with reasons.
            from vllm_hsr.backend import HSRAttentionBackend
            reasons = HSRAttentionBackend.validate_configuration(device_capability=None,
                                                                 **attn_selector_config._asdict())
            if reasons:
                raise ValueError(f"Selected backend {BACKEND_NAME} is not valid for this configuration. "
                                 f"Reason: {reasons}")
            return BACKEND_PATH
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        if selects_hsr(vllm_config.attention_config.backend):
            # Fail at engine start, in the caller's process, naming the bad setting.
            HSRConfig.from_vllm(vllm_config.additional_config).check_engine_use()
