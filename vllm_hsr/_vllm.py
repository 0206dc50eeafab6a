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
    "CPUAttentionBackend": "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend",
    "CPUAttentionBackendImpl": "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",
    "CPUAttentionMetadataBuilder": "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder",
    "AttentionType": "vllm.v1.attention.backend:AttentionType",
    "Attention": "vllm.model_executor.layers.attention:Attention",
    "get_layers_from_vllm_config": "vllm.config:get_layers_from_vllm_config",
    "split_decodes_and_prefills": "vllm.v1.attention.backends.utils:split_decodes_and_prefills",
    "get_current_vllm_config": "vllm.config:get_current_vllm_config",
    "init_logger": "vllm.logger:init_logger",
    "cli_main": "vllm.entrypoints.cli.main:main",
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _PATHS[name].split(":")
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
