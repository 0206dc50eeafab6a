"""The `vllm.general_plugins` entry point: registers the HSR backend in every vLLM process."""

from __future__ import annotations

from vllm_hsr import _vllm

BACKEND_NAME = "HSR"
BACKEND_PATH = "vllm_hsr.backend.HSRAttentionBackend"


def _hsr_member():
    """Unpickling hook of the HSR enum member: registers it in the process that unpickles."""
    register()
    return _vllm.AttentionBackendEnum[BACKEND_NAME]


def register() -> None:
    """Register `--attention-backend HSR` and fill the CUSTOM slot (idempotent).

    vLLM spawns the engine core with the config pickled, and an enum member
    pickles by value, which the child cannot resolve before plugins load. The
    member pickles through `_hsr_member` instead, which registers it first.
    """
    enum = _vllm.AttentionBackendEnum
    if BACKEND_NAME not in enum.__members__:
        member = enum.register(BACKEND_NAME, BACKEND_PATH)
        member.__reduce_ex__ = lambda protocol: (_hsr_member, ())
    _vllm.register_backend(enum.CUSTOM, BACKEND_PATH)
