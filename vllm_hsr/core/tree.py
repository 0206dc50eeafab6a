"""The cell tree of one sequence: token codes, cell boxes and union boxes above them."""

from __future__ import annotations

import dataclasses

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.summaries import cell_boxes, pack_codes, quantize_keys, union_boxes

_SUMMARY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def summary_dtype(cfg: HSRConfig, key_dtype: torch.dtype) -> torch.dtype:
    if cfg.summary_dtype != "auto":
        return _SUMMARY_DTYPES[cfg.summary_dtype]
    return key_dtype if key_dtype in _SUMMARY_DTYPES.values() else torch.float32


@dataclasses.dataclass
class CellTree:
    """Summaries of one sequence, all KV heads.

    levels[0] holds the cells (level 1 of DESIGN.md), levels[i] the union boxes of
    `fanout` consecutive nodes of levels[i - 1]; each entry is (lo, hi), both
    [num_nodes, num_kv_heads, head_dim]. codes: [num_cells, cell_size,
    num_kv_heads, ceil(head_dim * code_bits / 8)] uint8, or None when code_bits is 0.
    """

    levels: list[tuple[torch.Tensor, torch.Tensor]]
    codes: torch.Tensor | None
    num_tokens: int
    cell_size: int
    fanout: int
    code_bits: int
    head_dim: int

    def node_span(self, level: int) -> int:
        """Tokens covered by one node of `level` (0 = cells)."""
        return self.cell_size * self.fanout ** level

    def node_token_ranges(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.node_span(level)
        return nodes * span, torch.clamp((nodes + 1) * span, max=self.num_tokens)

    def children(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Child ids on level - 1 of `nodes` on `level`, in order, out-of-range ones dropped."""
        kids = (nodes.unsqueeze(1) * self.fanout + torch.arange(self.fanout, device=nodes.device)).flatten()
        return kids[kids < self.levels[level - 1][0].shape[0]]


def build_cell_tree(keys: torch.Tensor, cfg: HSRConfig) -> CellTree:
    """Summarise a whole sequence. keys: [num_tokens, num_kv_heads, head_dim]."""
    num_tokens, _, head_dim = keys.shape
    levels = [cell_boxes(keys, num_tokens, cfg.cell_size, summary_dtype(cfg, keys.dtype))]
    while levels[-1][0].shape[0] > cfg.fanout:
        levels.append(union_boxes(*levels[-1], cfg.fanout))
    codes = None
    if cfg.code_bits:
        lo, hi = levels[0]
        pad = lo.shape[0] * cfg.cell_size - num_tokens
        # Padding slots copy lo, so they get code 0 and are never read as tokens.
        padded = torch.cat([keys.float(), lo[-1:].float().expand(pad, -1, -1)])
        per_cell = padded.view(lo.shape[0], cfg.cell_size, *keys.shape[1:])
        codes = pack_codes(quantize_keys(per_cell, lo, hi, cfg.code_bits), cfg.code_bits)
    return CellTree(levels, codes, num_tokens, cfg.cell_size, cfg.fanout, cfg.code_bits, head_dim)
