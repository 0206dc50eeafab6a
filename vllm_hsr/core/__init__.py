"""HSR math in pure torch (DESIGN.md §2): the CPU decode path and every kernel's test oracle."""

from vllm_hsr.core.attention import HSRStats, attend_kv_head, dense_attention, sparse_attention
from vllm_hsr.core.tree import CellTree, build_cell_tree

__all__ = ["CellTree", "HSRStats", "attend_kv_head", "build_cell_tree", "dense_attention", "sparse_attention"]
