"""Selecting HSR (or CUSTOM) routes a real vLLM engine's attention through our backend.

Each engine runs in its own process (tests/probe_engine.py), as a user's would.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_hsr import _vllm, platform, plugin

PROBE = Path(__file__).with_name("probe_engine.py")


def _probe(model: Path, backend: str | None) -> dict:
    cmd = [sys.executable, str(PROBE), str(model)] + (["--attention-backend", backend] if backend else [])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith('{"backends"')]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("backend", ["HSR", "CUSTOM"])
def test_selected_backend_runs_every_attention_layer(tiny_model, backend):
    report = _probe(tiny_model, backend)
    assert report["backends"], "no attention layers found"
    for name, cls, _ in report["backends"].values():
        assert (name, cls) == ("HSR", "HSRAttentionBackend")
    assert report["text"]


def test_without_selection_cpu_attn_stays(tiny_model):
    report = _probe(tiny_model, None)
    for name, cls, impl in report["backends"].values():
        assert (name, cls, impl) == ("CPU_ATTN", "CPUAttentionBackend", "CPUAttentionBackendImpl")


def test_register_is_idempotent_and_fills_custom():
    plugin.register()
    plugin.register()
    enum = _vllm.AttentionBackendEnum
    assert enum["HSR"].get_path() == plugin.BACKEND_PATH
    assert enum.CUSTOM.get_path() == plugin.BACKEND_PATH


def test_hsr_member_unpickles_in_a_fresh_process():
    """A spawned engine core unpickles the config before plugins load: the member must survive."""
    plugin.register()
    payload = pickle.dumps(_vllm.AttentionBackendEnum["HSR"]).hex()
    code = ("import pickle; m = pickle.loads(bytes.fromhex(%r)); print(m.name, m.get_path())" % payload)
    env = dict(os.environ, VLLM_PLUGINS="none")  # no entry point may help
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["HSR", plugin.BACKEND_PATH]


def test_platform_plugin_only_where_cpu_platform_would_be(monkeypatch):
    monkeypatch.setattr(_vllm, "builtin_cpu_platform_plugin", lambda: None)
    assert platform.cpu_platform_plugin() is None
    monkeypatch.setattr(_vllm, "builtin_cpu_platform_plugin", lambda: "vllm.platforms.cpu.CpuPlatform")
    assert platform.cpu_platform_plugin() == "vllm_hsr.platform.HSRCpuPlatform"


def test_platform_defers_to_cpu_attn_unless_hsr_selected():
    from vllm.v1.attention.selector import AttentionSelectorConfig
    plugin.register()
    enum = _vllm.AttentionBackendEnum
    selector = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=128)
    cls = platform.HSRCpuPlatform
    assert cls.get_attn_backend_cls(enum["HSR"], selector) == plugin.BACKEND_PATH
    assert cls.get_attn_backend_cls(enum.CUSTOM, selector) == plugin.BACKEND_PATH
    assert cls.get_attn_backend_cls(None, selector) == enum.CPU_ATTN.get_path()
    assert cls.get_attn_backend_cls(enum.CPU_ATTN, selector) == enum.CPU_ATTN.get_path()


def test_platform_refuses_what_hsr_cannot_serve_with_the_reason():
    """As vLLM's CUDA platform does for a selected backend: an fp8 KV cache (every layer would be dense),
    MLA, a head size the partner lacks."""
    from vllm.v1.attention.selector import AttentionSelectorConfig
    plugin.register()
    enum = _vllm.AttentionBackendEnum
    good = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=128)
    for bad, reason in ((dict(kv_cache_dtype="fp8"), "kv_cache_dtype not supported"),
                        (dict(use_mla=True), "MLA not supported"),
                        (dict(head_size=72), "head_size not supported")):
        with pytest.raises(ValueError, match=f"Selected backend HSR is not valid.*{reason}"):
            platform.HSRCpuPlatform.get_attn_backend_cls(enum["HSR"], AttentionSelectorConfig(**(good | bad)))
