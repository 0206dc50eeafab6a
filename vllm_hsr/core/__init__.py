"""HSR math in pure torch (DESIGN.md §2): the CPU decode path and every kernel's test oracle."""

from vllm_hsr.core.attention import HSRStats, attend_kv_head, dense_attention, sparse_attention
from vllm_hsr.core.tree import CellTree, DenseCellTree

__all__ = ["CellTree", "DenseCellTree", "HSRStats", "attend_kv_head", "dense_attention", "sparse_attention"]
