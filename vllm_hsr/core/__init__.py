"""HSR math in pure torch (docs/design.md §2): the CPU decode path and every kernel's test oracle."""

from vllm_hsr.core.attention import HSRStats, dense_attention

__all__ = ["HSRStats", "dense_attention"]
