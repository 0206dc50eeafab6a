"""Test oracle: the cell tree of one sequence (token codes, cell boxes, union boxes above),
built at once from contiguous keys (DenseCellTree) or read from paged summaries
(PagedCellTree), to check the incremental summary updates and the bounds.

Node i of level l covers the tokens [i * span(l), (i + 1) * span(l)), span(l) =
cell_size * fanout**l, whatever the KV block size, so the dense and the paged trees
of a sequence are the same tree. Every level holds complete nodes only (the partial
last cell has no summary: it is always read exactly), and the tokens past the last
complete node of a level are covered by the levels below ("tail" nodes).
"""

from __future__ import annotations

import torch

from vllm_hsr import HSRConfig
from vllm_hsr.core.paged import PagedSummaries, summary_dtype
from vllm_hsr.core.summaries import cell_boxes, pack_codes, quantize_keys, union_boxes


class CellTree:
    """Read access to the summaries of one sequence; subclasses say where they are stored."""

    def __init__(self, num_tokens: int, cfg: HSRConfig, head_dim: int):
        self.num_tokens, self.head_dim = num_tokens, head_dim
        self.cell_size, self.fanout = cfg.cell_size, cfg.fanout
        self.num_levels, self.code_bits = cfg.tree_levels + 1, cfg.code_bits

    def span(self, level: int) -> int:
        return self.cell_size * self.fanout ** level

    def num_nodes(self, level: int) -> int:
        return self.num_tokens // self.span(level)

    def num_coded_cells(self) -> int:
        return self.num_tokens // self.cell_size if self.code_bits else 0

    def node_token_ranges(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.span(level)
        return nodes * span, torch.clamp((nodes + 1) * span, max=self.num_tokens)

    def children(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Level - 1 nodes under `nodes` (complete parents: every child exists)."""
        return (nodes.unsqueeze(1) * self.fanout + torch.arange(self.fanout, device=nodes.device)).flatten()

    def tail(self, level: int) -> torch.Tensor:
        """Nodes of `level` not under a complete node of level + 1."""
        first = self.num_nodes(level + 1) * self.fanout if level + 1 < self.num_levels else 0
        return torch.arange(first, self.num_nodes(level))

    def boxes(self, level: int, nodes: torch.Tensor, kv_head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """lo, hi: [n, head_dim] in the summary dtype."""
        raise NotImplementedError

    def codes(self, cells: torch.Tensor, kv_head: int) -> torch.Tensor:
        """Packed codes of complete cells: [c, cell_size, ceil(head_dim * code_bits / 8)] uint8."""
        raise NotImplementedError


class DenseCellTree(CellTree):
    """The tree of a whole sequence held as contiguous keys, summarised at once."""

    def __init__(self, keys: torch.Tensor, cfg: HSRConfig):
        """keys: [num_tokens, num_kv_heads, head_dim]"""
        num_tokens, _, head_dim = keys.shape
        super().__init__(num_tokens, cfg, head_dim)
        cells = cell_boxes(keys, num_tokens, cfg.cell_size, summary_dtype(cfg, keys.dtype))
        self.levels = [cells]
        for level in range(1, self.num_levels):
            lo, hi = self.levels[-1]
            complete = self.num_nodes(level) * self.fanout
            self.levels.append(union_boxes(lo[:complete], hi[:complete], self.fanout))
        self.packed_codes = None
        if self.code_bits:
            coded = self.num_coded_cells()
            lo, hi = cells[0][:coded], cells[1][:coded]
            per_cell = keys[:coded * self.cell_size].view(coded, self.cell_size, *keys.shape[1:])
            self.packed_codes = pack_codes(quantize_keys(per_cell, lo, hi, self.code_bits), self.code_bits)

    def boxes(self, level, nodes, kv_head):
        lo, hi = self.levels[level]
        return lo[nodes, kv_head], hi[nodes, kv_head]

    def codes(self, cells, kv_head):
        return self.packed_codes[cells, :, kv_head]


class PagedCellTree(CellTree):
    """The cell tree of one sequence, read from per-block summaries through its block-table row."""

    def __init__(self, summaries: PagedSummaries, block_row: torch.Tensor, num_tokens: int):
        super().__init__(num_tokens, summaries.cfg, summaries.head_dim)
        self.summaries, self.block_row = summaries, block_row

    def boxes(self, level, nodes, kv_head):
        blocks, slots = self.summaries.locate(level, nodes, self.block_row)
        box = self.summaries.boxes[blocks, slots, :, kv_head]                               # [n, 2, D]
        return box[:, 0], box[:, 1]

    def codes(self, cells, kv_head):
        size, bs = self.cell_size, self.summaries.block_size
        tokens = cells.unsqueeze(1) * size + torch.arange(size, device=cells.device)      # [c, T]
        return self.summaries.codes[self.block_row[tokens // bs], tokens % bs, kv_head]
