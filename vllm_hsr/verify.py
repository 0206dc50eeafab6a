"""Stale-summary check: every summary a decode of a batch can read, against a recomputation from the KV cache.

With HSR_VERIFY_SUMMARIES=1 the backend runs it after each step's summary update and raises on a
difference (tests and debugging; it recomputes every row's summaries, so it is slow). A summary
that a skipped write left stale, or that a write put on the wrong block, shows as a difference.
"""

from __future__ import annotations

import torch

from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries


def _fresh_like(summaries: PagedSummaries) -> PagedSummaries:
    boxes = summaries.boxes
    num_blocks, _, _, num_kv_heads, head_dim = boxes.shape
    key_dtype = summaries.keys.dtype if summaries.keys is not None else None
    return PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, summaries.block_size, summaries.cfg,
                                   boxes.dtype, boxes.device, key_dtype=key_dtype)


def stale_summaries(summaries: PagedSummaries, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    flat_cache: torch.Tensor, layout: PagedKVLayout) -> list[str]:
    """The summaries of rows block_table [R, max_blocks] with seq_lens [R] cached tokens (this step's
    included) that differ from a recomputation from flat_cache: one line per (row, kind, block), empty if
    none. Only what a decode reads is compared: complete cells' boxes, codes and key copies, and the union
    boxes of the tree nodes those cells complete."""
    cfg, size, block_size = summaries.cfg, summaries.cfg.cell_size, summaries.block_size
    fresh = _fresh_like(summaries)
    problems = []
    for row, seq_len in enumerate(seq_lens.tolist()):
        complete = seq_len // size * size
        if not complete:
            continue
        table = block_table[row].long()
        positions = torch.arange(complete, device=table.device)
        slots = table[positions // block_size] * block_size + positions % block_size
        fresh.update(slots, positions, torch.full_like(positions, row), block_table, flat_cache, layout)
        for level in range(cfg.tree_levels + 1):
            nodes = torch.arange(complete // summaries.span(level), device=table.device)
            if not nodes.numel():
                break
            blocks, node_slots = summaries.locate(level, nodes, table)
            differ = ~_same(summaries.boxes[blocks, node_slots], fresh.boxes[blocks, node_slots])
            problems += [f"row {row}: level-{level} box of node {int(n)} in block {int(b)}"
                         for n, b in zip(nodes[differ].tolist(), blocks[differ].tolist())]
        blocks, offsets = slots // block_size, slots % block_size
        for kind, stored, want in (("codes", summaries.codes, fresh.codes), ("key copy", summaries.keys, fresh.keys)):
            if stored is not None:
                differ = ~_same(stored[blocks, offsets], want[blocks, offsets])
                problems += [f"row {row}: {kind} of position {int(p)} in block {int(b)}"
                             for p, b in zip(positions[differ].tolist(), blocks[differ].tolist())]
    return problems


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per leading index: every element equal (NaN equal to NaN: a NaN key spreads to its box alike)."""
    equal = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
    return equal.flatten(1).all(1)
