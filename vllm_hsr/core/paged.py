"""HSR over a paged KV cache: the summaries kept beside each physical block, and decode over them.

Node i of tree level l (span S = cell_size * fanout**l tokens) is stored with the
physical block that holds its last token, in slot (last % block_size) // S of
that level, so a summary is a pure function of block contents: prefix caching
shares it. A node is summarised when the write that completes it lands (a cell's box
and codes from its keys in the cache), so a recycled block's old summaries are
overwritten before they are read; the partial last cell has none and is read exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

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
            tokens = torch.arange(view.shape[2], device=cache.device).unsqueeze(1) * view.stride(2)
            channels = torch.arange(view.shape[3], device=cache.device).unsqueeze(0) * view.stride(3)
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


def code_width(head_dim: int, code_bits: int) -> int:
    """Bytes of one token's codes, every plane."""
    return code_planes(code_bits)[1] * plane_bytes(head_dim, code_bits)


def _storage_rows(view: torch.Tensor, row: int) -> tuple[torch.Tensor, int]:
    """The whole storage under `view` as [n, row] rows of its dtype (what box/code reads index)."""
    count = view.untyped_storage().nbytes() // view.element_size() // row
    return view.as_strided((count, row), (row, 1), 0), row


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """Byte offsets, within one KV page, of the summaries kept in its padding."""

    boxes: int
    codes: int
    keys: int    # the key copy (== end of the codes when there is none)
    end: int     # the padded page size that holds them


def page_layout(dense_page_bytes: int, block_size: int, num_kv_heads: int, head_dim: int, cfg: HSRConfig,
                dtype: torch.dtype, key_dtype: torch.dtype | None = None) -> PageLayout:
    """Boxes, codes, then the key copy (key_dtype; None: no copy) after the dense KV bytes, each region
    starting at a whole row of what is read from it (a box side; one cell's codes; one key), the page a
    multiple of all."""
    box_row = head_dim * dtype.itemsize
    code_row = cfg.cell_size * code_width(head_dim, cfg.code_bits) if cfg.code_bits else 1
    key_row = head_dim * key_dtype.itemsize if key_dtype is not None else 1
    align = math.lcm(box_row, code_row, key_row, 64)
    num_slots = sum(count for _, count in level_slots(cfg, block_size))
    boxes = -(-dense_page_bytes // align) * align
    codes = boxes + -(-num_slots * 2 * num_kv_heads * box_row // align) * align
    keys = codes + (-(-block_size * num_kv_heads * code_width(head_dim, cfg.code_bits) // align) * align
                    if cfg.code_bits else 0)
    end = keys + (block_size * num_kv_heads * key_row if key_dtype is not None else 0)
    return PageLayout(boxes, codes, keys, -(-end // align) * align)


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


@dataclasses.dataclass
class SummaryWrite:
    """What one step's KV write changes in the summaries: the cells it fills and the tree nodes
    it completes. It depends on slots and positions only, so it is planned once per step and
    applied to every layer. Empty parts are None (checked on the host: the torch path's syncs)."""

    slot_mapping: torch.Tensor        # [n] int64 cache slot of each written token
    positions: torch.Tensor           # [n] sequence position of each token
    token_rows: torch.Tensor          # [n] block-table row of each token
    filled_blocks: torch.Tensor | None    # [c] block and first in-block offset of each cell that fills now
    filled_offsets: torch.Tensor | None
    levels: list[tuple[torch.Tensor, torch.Tensor]]   # per level >= 1 with completed nodes: (the nodes
    # completed [m], the block-table row of each [m]); empty once a level has none

    @classmethod
    def plan(cls, slot_mapping: torch.Tensor, positions: torch.Tensor, token_rows: torch.Tensor, block_size: int,
             cfg: HSRConfig) -> SummaryWrite:
        slot_mapping = slot_mapping.long()
        size = cfg.cell_size
        filled = (positions + 1) % size == 0
        if not filled.any():    # most decode steps: nothing to summarise
            return cls(slot_mapping, positions, token_rows, None, None, [])
        slots, ends, rows = slot_mapping[filled], positions[filled] + 1, token_rows[filled]
        levels = []             # a node above cells completes only where a cell does
        for level in range(1, cfg.tree_levels + 1):
            span = size * cfg.fanout ** level
            done = ends % span == 0
            if not done.any():
                break
            levels.append((ends[done] // span - 1, rows[done]))
        return cls(slot_mapping, positions, token_rows, slots // block_size, slots % block_size - (size - 1),
                   levels)


class PagedSummaries:
    """Boxes and token codes of every physical KV block of one attention layer.

    boxes: [num_blocks, num_slots, 2, num_kv_heads, head_dim] (lo, hi) in the summary dtype
    codes: [num_blocks, block_size, num_kv_heads, ceil(head_dim * code_bits / 8)] uint8, or None: a view of
        head-major storage, so the codes of one cell and KV head are one contiguous run
    keys: [num_blocks, block_size, num_kv_heads, head_dim] in the cache dtype, or None: the key copy
        (HSRConfig.key_copy), head-major storage like the codes; complete cells only, so that a kept token's
        exact key is one row whatever the dense layout
    Either side tensors (`allocate`) or views into the padding of the KV pages (`in_pages`): reads go
    through the storage in rows (one box side, one cell's codes), so both need their strides and
    offsets to be whole rows.
    """

    def __init__(self, boxes: torch.Tensor, codes: torch.Tensor | None, cfg: HSRConfig, block_size: int,
                 keys: torch.Tensor | None = None):
        self.boxes, self.codes, self.keys, self.cfg, self.block_size = boxes, codes, keys, cfg, block_size
        self.slots = level_slots(cfg, block_size)
        box_row, code_row = self.head_dim, cfg.cell_size * (codes.shape[-1] if codes is not None else 0)
        if any(x % box_row for x in (*boxes.stride()[:4], boxes.storage_offset())) or boxes.stride(4) != 1:
            raise ValueError("HSR: box storage must hold whole [head_dim] rows")
        if codes is not None and (any(x % code_row for x in (codes.stride(0), codes.stride(2), codes.storage_offset()))
                                  or codes.stride(1) != codes.shape[-1] or codes.stride(3) != 1):
            raise ValueError("HSR: code storage must hold each cell's codes of one KV head as one run")
        if keys is not None and (keys.stride(3) != 1 or keys.stride(1) != keys.shape[3]):
            raise ValueError("HSR: the key copy must hold each key as one row, a KV head's keys in token order")

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int, cfg: HSRConfig,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 key_dtype: torch.dtype | None = None) -> PagedSummaries:
        num_slots = sum(count for _, count in level_slots(cfg, block_size))
        boxes = torch.empty(num_blocks, num_slots, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        codes = None
        if cfg.code_bits:
            width = code_width(head_dim, cfg.code_bits)
            # only complete cells' codes are ever read, and each is written when its cell fills
            codes = torch.empty(num_blocks, num_kv_heads, block_size, width, dtype=torch.uint8, device=device)
            codes = codes.permute(0, 2, 1, 3)
        keys = None
        if key_dtype is not None:
            keys = torch.empty(num_blocks, num_kv_heads, block_size, head_dim, dtype=key_dtype, device=device)
            keys = keys.permute(0, 2, 1, 3)
        return cls(boxes, codes, cfg, block_size, keys)

    @classmethod
    def in_pages(cls, kv_cache: torch.Tensor, dense_page_bytes: int, head_dim: int, cfg: HSRConfig,
                 dtype: torch.dtype, copy_keys: bool = False) -> PagedSummaries | None:
        """Views into the padding past the first `dense_page_bytes` of every block of kv_cache
        [num_blocks, num_kv_heads, block_size, ...], laid out as `page_layout` says (with a key copy in
        kv_cache's dtype if copy_keys); None if the pages have no room for them (or not at whole rows)."""
        num_blocks, num_kv_heads, block_size = kv_cache.shape[:3]
        key_dtype = kv_cache.dtype if copy_keys else None
        layout = page_layout(dense_page_bytes, block_size, num_kv_heads, head_dim, cfg, dtype, key_dtype)
        page = kv_cache.stride(0) * kv_cache.element_size()
        base = kv_cache.storage_offset() * kv_cache.element_size()
        box_bytes = dtype.itemsize
        if page < layout.end or (base + layout.boxes) % box_bytes or page % box_bytes:
            return None
        storage, device = kv_cache.untyped_storage(), kv_cache.device

        def view(view_dtype: torch.dtype, offset: int, shape: tuple, inner_strides: tuple) -> torch.Tensor:
            """[num_blocks, *shape] of view_dtype at byte `offset` of every page (strides in elements)"""
            item = view_dtype.itemsize
            return torch.empty(0, dtype=view_dtype, device=device).set_(
                storage, (base + offset) // item, (num_blocks, *shape), (page // item, *inner_strides))

        num_slots = sum(count for _, count in level_slots(cfg, block_size))
        boxes = view(dtype, layout.boxes, (num_slots, 2, num_kv_heads, head_dim),
                     (2 * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, 1))
        codes = keys = None
        if cfg.code_bits:
            width = code_width(head_dim, cfg.code_bits)
            codes = view(torch.uint8, layout.codes, (num_kv_heads, block_size, width),
                         (block_size * width, width, 1)).permute(0, 2, 1, 3)
        if copy_keys:     # page and base are whole cache elements, layout.keys whole keys
            keys = view(kv_cache.dtype, layout.keys, (num_kv_heads, block_size, head_dim),
                        (block_size * head_dim, head_dim, 1)).permute(0, 2, 1, 3)
        try:
            return cls(boxes, codes, cfg, block_size, keys)
        except ValueError:
            return None

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
        rows, row = _storage_rows(self.boxes, self.head_dim)
        block, slot, side, head = (stride // row for stride in self.boxes.stride()[:4])
        lo = self.boxes.storage_offset() // row + blocks * block + slots * slot + kv_heads * head
        return rows[lo], rows[lo + side]

    def cell_codes(self, blocks: torch.Tensor, slots: torch.Tensor, kv_heads: torch.Tensor,
                   planes: int | None = None) -> torch.Tensor:
        """The first `planes` code planes (None: all) of the cells at (blocks, slots, kv_heads)
        (broadcast), contiguous: [..., cell_size, planes * plane_bytes]"""
        width = self.codes.shape[-1]
        size = self.cfg.cell_size
        width_read = width if planes is None else planes * plane_bytes(self.head_dim, self.cfg.code_bits)
        runs, row = _storage_rows(self.codes, size * width)       # one row per (block, head, cell)
        index = (self.codes.storage_offset() + blocks * self.codes.stride(0) + kv_heads * self.codes.stride(2)) // row
        index = index + slots
        picked = runs.view(-1, size, width)[:, :, :width_read].index_select(0, index.flatten())
        return picked.view(*index.shape, size, width_read)

    def plan_write(self, slot_mapping: torch.Tensor, positions: torch.Tensor,
                   token_rows: torch.Tensor) -> SummaryWrite:
        """What a KV write of tokens at slot_mapping changes here (the same for every layer of a step)."""
        return SummaryWrite.plan(slot_mapping, positions, token_rows, self.block_size, self.cfg)

    def update(self, slot_mapping: torch.Tensor, positions: torch.Tensor, token_rows: torch.Tensor,
               block_table: torch.Tensor, flat_cache: torch.Tensor, layout: PagedKVLayout) -> None:
        """Summarise what a KV write (already in the cache) completed: plan_write, then apply.

        positions: [n] sequence positions of the written tokens; token_rows: [n] their block_table rows.
        """
        self.apply(self.plan_write(slot_mapping, positions, token_rows), block_table, flat_cache, layout)

    def apply(self, write: SummaryWrite, block_table: torch.Tensor, flat_cache: torch.Tensor,
              layout: PagedKVLayout) -> None:
        """Box, codes (and key copy) of every cell `write` fills, read from the cache, then the union boxes it
        completes.

        Only complete cells have summaries: the partial last cell of a sequence is always read
        exactly, so a box is written once, when its cell fills, whatever the block held before.
        """
        if write.filled_blocks is not None:
            self._summarise_cells(write.filled_blocks, write.filled_offsets, flat_cache, layout)
        self.apply_unions(write, block_table)

    def apply_unions(self, write: SummaryWrite, block_table: torch.Tensor) -> None:
        """The union boxes `write` completes, from their children (whose boxes are up to date)."""
        for level, (nodes, rows) in enumerate(write.levels, start=1):
            self._union_children(level, nodes, block_table.long()[rows])

    def _cell_keys(self, blocks: torch.Tensor, first_offsets: torch.Tensor, flat_cache: torch.Tensor,
                   layout: PagedKVLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The cells starting at in-block offsets first_offsets of blocks [c]: their in-block tokens [c, T]
        and keys as the cache holds them [c, H, T, D]."""
        tokens = first_offsets.unsqueeze(1) + torch.arange(self.cfg.cell_size, device=blocks.device)
        heads = torch.arange(self.boxes.shape[3], device=blocks.device).view(1, -1, 1)
        keys, _ = layout.gather(flat_cache, blocks.view(-1, 1, 1), tokens.unsqueeze(1), heads, values=False)
        return tokens, keys

    def _summarise_cells(self, blocks: torch.Tensor, first_offsets: torch.Tensor, flat_cache: torch.Tensor,
                         layout: PagedKVLayout) -> None:
        tokens, raw = self._cell_keys(blocks, first_offsets, flat_cache, layout)
        keys = raw.float()                                                                             # [c, H, T, D]
        lo, hi = round_outward(keys.amin(2), keys.amax(2), self.boxes.dtype)                           # [c, H, D]
        slots = first_offsets // self.cfg.cell_size
        self.boxes[blocks, slots, 0] = lo
        self.boxes[blocks, slots, 1] = hi
        if self.codes is not None:
            codes = quantize_keys(keys.transpose(1, 2), lo, hi, self.cfg.code_bits)                    # [c, T, H, D]
            self.codes[blocks.view(-1, 1), tokens] = pack_codes(codes, self.cfg.code_bits)
        if self.keys is not None:
            self.keys[blocks.view(-1, 1), tokens] = raw.transpose(1, 2)

    def copy_keys(self, write: SummaryWrite, flat_cache: torch.Tensor, layout: PagedKVLayout) -> None:
        """The key copy of every cell `write` fills (for update paths that write boxes and codes themselves)."""
        if self.keys is not None and write.filled_blocks is not None:
            tokens, keys = self._cell_keys(write.filled_blocks, write.filled_offsets, flat_cache, layout)
            self.keys[write.filled_blocks.view(-1, 1), tokens] = keys.transpose(1, 2)

    def _union_children(self, level: int, nodes: torch.Tensor, block_rows: torch.Tensor) -> None:
        fanout = self.cfg.fanout
        children = nodes.unsqueeze(1) * fanout + torch.arange(fanout, device=nodes.device)  # [n, f]
        rows = block_rows.unsqueeze(1).expand(-1, fanout, -1)
        child = self.boxes[self.locate(level - 1, children, rows)]                           # [n, f, 2, H, D]
        blocks, slots = self.locate(level, nodes, block_rows)
        self.boxes[blocks, slots, 0] = child[:, :, 0].amin(1)
        self.boxes[blocks, slots, 1] = child[:, :, 1].amax(1)
