"""Every vLLM import path the plugin uses, in one place (they move between vLLM versions).

Names resolve lazily on first access: the platform hook runs while vLLM is still
choosing its platform, when importing vllm.config (which most backend modules do)
would recurse into that choice. Only the registry and the CPU platform module
are safe to import from there.
"""

from __future__ import annotations

import importlib
from typing import Any

_PATHS = {
    # safe inside the platform hook
    "AttentionBackendEnum": "vllm.v1.attention.backends.registry:AttentionBackendEnum",
    "register_backend": "vllm.v1.attention.backends.registry:register_backend",
    "CpuPlatform": "vllm.platforms.cpu:CpuPlatform",
    "builtin_cpu_platform_plugin": "vllm.platforms:cpu_platform_plugin",
    # backend and engine side
    "current_platform": "vllm.platforms:current_platform",
    "AttentionType": "vllm.v1.attention.backend:AttentionType",
    "AttentionCGSupport": "vllm.v1.attention.backend:AttentionCGSupport",
    "CommonAttentionMetadata": "vllm.v1.attention.backend:CommonAttentionMetadata",
    "is_quantized_kv_cache": "vllm.utils.torch_utils:is_quantized_kv_cache",
    "Attention": "vllm.model_executor.layers.attention:Attention",
    "get_layers_from_vllm_config": "vllm.config:get_layers_from_vllm_config",
    "split_decodes_and_prefills": "vllm.v1.attention.backends.utils:split_decodes_and_prefills",
    "get_current_vllm_config": "vllm.config:get_current_vllm_config",
    "get_current_vllm_config_or_none": "vllm.config:get_current_vllm_config_or_none",
    "FullAttentionSpec": "vllm.v1.kv_cache_interface:FullAttentionSpec",
    "cli_main": "vllm.entrypoints.cli.main:main",
    # benchmarks/bench_layer_call.py: CPU_ATTN's kernel driven without an engine
    "VllmConfig": "vllm.config:VllmConfig",
    "set_current_vllm_config": "vllm.config:set_current_vllm_config",
    "CPUAttentionMetadata": "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata",
    "cpu_attn_isa": "vllm.v1.attention.backends.cpu_attn:_get_attn_isa",
    "cpu_attn_get_scheduler_metadata": "vllm._custom_ops:cpu_attn_get_scheduler_metadata",
    "VLLM_CPU_ATTN_SPLIT_KV": "vllm.envs:VLLM_CPU_ATTN_SPLIT_KV",
}


# The dense backends HSR composes with: (backend, metadata builder, impl) of each.
DENSE_PARTNERS = {
    "CPU_ATTN": ("vllm.v1.attention.backends.cpu_attn",
                 ("CPUAttentionBackend", "CPUAttentionMetadataBuilder", "CPUAttentionBackendImpl")),
    "FLASH_ATTN": ("vllm.v1.attention.backends.flash_attn",
                   ("FlashAttentionBackend", "FlashAttentionMetadataBuilder", "FlashAttentionImpl")),
    "TRITON_ATTN": ("vllm.v1.attention.backends.triton_attn",
                    ("TritonAttentionBackend", "TritonAttentionMetadataBuilder", "TritonAttentionImpl")),
}


def dense_partner(name: str) -> tuple[type, type, type]:
    """(backend, metadata builder, impl) classes of the dense backend `name` (a DENSE_PARTNERS key)."""
    module, names = DENSE_PARTNERS[name]
    loaded = importlib.import_module(module)
    return tuple(getattr(loaded, attr) for attr in names)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _PATHS[name].split(":")
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
