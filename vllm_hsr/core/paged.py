"""HSR over a paged KV cache: the summaries kept beside each physical block, and decode over them.

Node i of tree level l (span S = cell_size * fanout**l tokens) is stored with the
physical block that holds its last token, in slot (last % block_size) // S of
that level, so a summary is a pure function of block contents: prefix caching
shares it, and a recycled block is re-summarised by its first write.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.summaries import code_planes, pack_codes, plane_bytes, quantize_keys, round_outward


@dataclasses.dataclass(frozen=True)
class PagedKVLayout:
    """Where element (block, kv_head, token, channel) of K and of V lives in a flat cache.

    offset = block * block_stride + kv_head * head_stride + key_offsets[token, channel]
    (value_offsets for V), in elements of the cache tensor, from its first element.
    Covers plain strided layouts and packed ones (e.g. CPU_ATTN's VNNI tiles) alike.
    """

    block_stride: int
    head_stride: int
    key_offsets: torch.Tensor     # [block_size, head_dim] int64
    value_offsets: torch.Tensor   # [block_size, head_dim] int64

    @property
    def block_size(self) -> int:
        return self.key_offsets.shape[0]

    @classmethod
    def from_views(cls, cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> PagedKVLayout:
        """From strided views [num_blocks, num_kv_heads, block_size, head_dim] into `cache`."""
        for view in (keys, values):
            if view.untyped_storage().data_ptr() != cache.untyped_storage().data_ptr():
                raise ValueError("key/value views must share the cache's storage")
        if keys.stride()[:2] != values.stride()[:2]:
            raise ValueError("keys and values must have the same block and head strides")

        def offsets(view: torch.Tensor) -> torch.Tensor:
            tokens = torch.arange(view.shape[2]).unsqueeze(1) * view.stride(2)
            channels = torch.arange(view.shape[3]).unsqueeze(0) * view.stride(3)
            return view.storage_offset() - cache.storage_offset() + tokens + channels

        return cls(keys.stride(0), keys.stride(1), offsets(keys), offsets(values))

    @functools.cached_property
    def channel_strides(self) -> tuple[int | None, int | None]:
        """(K, V) distance between consecutive channels of a token when it is constant, else None."""
        def stride(offsets: torch.Tensor) -> int | None:
            step = int(offsets[0, 1] - offsets[0, 0]) if offsets.shape[1] > 1 else 1
            affine = offsets[:, :1] + step * torch.arange(offsets.shape[1], device=offsets.device)
            return step if step > 0 and torch.equal(offsets, affine) else None
        return stride(self.key_offsets), stride(self.value_offsets)

    def gather(self, flat_cache: torch.Tensor, blocks: torch.Tensor, tokens_in_block: torch.Tensor,
               kv_head: int | torch.Tensor, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K and V rows at (blocks[...], tokens_in_block[...]) of kv_head (broadcast). -> [..., head_dim] each"""
        base = blocks * self.block_stride + kv_head * self.head_stride
        tables = (self.key_offsets, self.value_offsets) if values else (self.key_offsets,)
        rows = [self._rows(flat_cache, base, offsets, tokens_in_block, stride)
                for offsets, stride in zip(tables, self.channel_strides)]
        return rows[0], rows[1] if values else None

    @staticmethod
    def _rows(flat_cache: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor, tokens_in_block: torch.Tensor,
              channel_stride: int | None) -> torch.Tensor:
        if channel_stride is None:   # packed layout: one index per element
            return flat_cache[base.unsqueeze(-1) + offsets[tokens_in_block]]
        # strided channels: gather whole rows of a sliding-window view (row i = channels from element i)
        head_dim = offsets.shape[1]
        window = flat_cache.as_strided((flat_cache.numel() - (head_dim - 1) * channel_stride, head_dim),
                                       (1, channel_stride))
        return window[base + offsets[tokens_in_block, 0]]

    def gather_rows(self, flat_cache: torch.Tensor, tables: torch.Tensor, kv_heads: torch.Tensor,
                    tokens: torch.Tensor, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K and V of sequence positions, one block-table row and KV head per row.

        tables: [R, max_blocks]; kv_heads: [R]; tokens: [R, n] (in range) -> [R, n, head_dim] each
        """
        blocks = tables.long().gather(1, tokens // self.block_size)
        return self.gather(flat_cache, blocks, tokens % self.block_size, kv_heads.unsqueeze(1), values)


def flat_view(cache: torch.Tensor) -> torch.Tensor:
    """1-D view of a cache tensor from its first element to its last (padding included)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(cache.shape, cache.stride()))
    return cache.as_strided((extent,), (1,))


_SUMMARY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def summary_dtype(cfg: HSRConfig, key_dtype: torch.dtype) -> torch.dtype:
    if cfg.summary_dtype != "auto":
        return _SUMMARY_DTYPES[cfg.summary_dtype]
    return key_dtype if key_dtype in _SUMMARY_DTYPES.values() else torch.float32


def level_slots(cfg: HSRConfig, block_size: int) -> list[tuple[int, int]]:
    """(first slot, slots per block) of each tree level in a block's box storage."""
    if block_size % cfg.cell_size:
        raise ValueError(f"HSR cell_size={cfg.cell_size} must divide the KV block size {block_size}")
    slots, first = [], 0
    for level in range(cfg.tree_levels + 1):
        count = -(-block_size // (cfg.cell_size * cfg.fanout ** level))
        slots.append((first, count))
        first += count
    return slots


class PagedSummaries:
    """Boxes and token codes of every physical KV block of one attention layer.

    boxes: [num_blocks, num_slots, 2, num_kv_heads, head_dim] (lo, hi) in the summary dtype
    codes: [num_blocks, block_size, num_kv_heads, ceil(head_dim * code_bits / 8)] uint8, or None
    """

    def __init__(self, boxes: torch.Tensor, codes: torch.Tensor | None, cfg: HSRConfig, block_size: int):
        self.boxes, self.codes, self.cfg, self.block_size = boxes, codes, cfg, block_size
        self.slots = level_slots(cfg, block_size)

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int, cfg: HSRConfig,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> PagedSummaries:
        num_slots = sum(count for _, count in level_slots(cfg, block_size))
        boxes = torch.empty(num_blocks, num_slots, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        codes = None
        if cfg.code_bits:
            width = code_planes(cfg.code_bits)[1] * plane_bytes(head_dim, cfg.code_bits)
            # only complete cells' codes are ever read, and each is written when its cell fills
            codes = torch.empty(num_blocks, block_size, num_kv_heads, width, dtype=torch.uint8, device=device)
        return cls(boxes, codes, cfg, block_size)

    @property
    def head_dim(self) -> int:
        return self.boxes.shape[-1]

    def span(self, level: int) -> int:
        return self.cfg.cell_size * self.cfg.fanout ** level

    def locate(self, level: int, nodes: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(physical block, slot) of level-`level` nodes.

        rows: one block-table row [max_blocks] shared by all nodes, or one per node [..., max_blocks].
        Nodes past the row's end (padding) read its last block: any slot, never out of bounds.
        """
        last = (nodes + 1) * self.span(level) - 1
        logical = (last // self.block_size).clamp(max=rows.shape[-1] - 1)
        blocks = rows[logical] if rows.dim() == 1 else rows.gather(-1, logical.unsqueeze(-1)).squeeze(-1)
        first_slot, _ = self.slots[level]
        return blocks, first_slot + (last % self.block_size) // self.span(level)

    def box_corners(self, blocks: torch.Tensor, slots: torch.Tensor,
                    kv_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lo, hi of the boxes at (blocks, slots, kv_heads) (broadcast): [..., head_dim] each"""
        num_slots, num_kv_heads = self.boxes.shape[1], self.boxes.shape[3]
        rows = self.boxes.view(-1, self.head_dim)   # one row per (block, slot, side, kv head)
        lo = ((blocks * num_slots + slots) * 2) * num_kv_heads + kv_heads
        return rows[lo], rows[lo + num_kv_heads]

    def update(self, keys: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
               token_rows: torch.Tensor, block_table: torch.Tensor, flat_cache: torch.Tensor,
               layout: PagedKVLayout) -> None:
        """Bring the summaries of every node touched by this step's KV write up to date.

        keys: [n, num_kv_heads, head_dim] (already written to the cache at slot_mapping);
        positions: [n] sequence positions; token_rows: [n] each token's row of block_table.
        Tokens of a sequence arrive in order, so a cell whose first token is written now is reset
        first (a recycled block carries an old box) and then grown by min/max.
        """
        bs, size = self.block_size, self.cfg.cell_size
        blocks, offsets = slot_mapping // bs, slot_mapping % bs
        cell_slots = blocks * self.boxes.shape[1] + offsets // size
        flat = self.boxes.view(-1, 2, *self.boxes.shape[3:])                  # [blocks * slots, 2, H, D]
        starts = cell_slots[offsets % size == 0]
        flat[starts, 0] = torch.inf
        flat[starts, 1] = -torch.inf
        lo, hi = round_outward(keys.float(), keys.float(), self.boxes.dtype)
        index = cell_slots.view(-1, 1, 1).expand_as(lo)
        flat[:, 0].scatter_reduce_(0, index, lo, "amin")
        flat[:, 1].scatter_reduce_(0, index, hi, "amax")

        filled = offsets % size == size - 1
        if self.codes is not None and filled.any():
            self._quantize_cells(blocks[filled], offsets[filled] - (size - 1), flat_cache, layout)
        block_rows = block_table.long()[token_rows]
        for level in range(1, self.cfg.tree_levels + 1):
            done = (positions + 1) % self.span(level) == 0
            if done.any():
                self._union_children(level, positions[done], block_rows[done])

    def _quantize_cells(self, blocks: torch.Tensor, first_offsets: torch.Tensor, flat_cache: torch.Tensor,
                        layout: PagedKVLayout) -> None:
        size, bits = self.cfg.cell_size, self.cfg.code_bits
        tokens = first_offsets.unsqueeze(1) + torch.arange(size, device=blocks.device)     # [c, T]
        cell_blocks = blocks.unsqueeze(1).expand_as(tokens)
        box = self.boxes[blocks, first_offsets // size]                                     # [c, 2, H, D]
        for kv_head in range(self.boxes.shape[3]):
            keys, _ = layout.gather(flat_cache, cell_blocks.flatten(), tokens.flatten(), kv_head)
            codes = quantize_keys(keys.view(*tokens.shape, -1), box[:, 0, kv_head], box[:, 1, kv_head], bits)
            self.codes[cell_blocks, tokens, kv_head] = pack_codes(codes, bits)

    def _union_children(self, level: int, positions: torch.Tensor, block_rows: torch.Tensor) -> None:
        fanout = self.cfg.fanout
        nodes = (positions + 1) // self.span(level) - 1
        children = nodes.unsqueeze(1) * fanout + torch.arange(fanout, device=nodes.device)  # [n, f]
        rows = block_rows.unsqueeze(1).expand(-1, fanout, -1)
        child = self.boxes[self.locate(level - 1, children, rows)]                           # [n, f, 2, H, D]
        blocks, slots = self.locate(level, nodes, block_rows)
        self.boxes[blocks, slots, 0] = child[:, :, 0].amin(1)
        self.boxes[blocks, slots, 1] = child[:, :, 1].amax(1)
