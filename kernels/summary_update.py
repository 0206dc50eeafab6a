"""Summary and code update after a KV write: cell boxes, token codes, union boxes above.

Twin: vllm_hsr.core.paged.PagedSummaries.apply (torch). Only complete cells have
summaries (the partial last cell of a sequence is always read exactly), so the program
of a token that fills its cell reads the whole cell back from the cache (its earlier
tokens may come from earlier steps), writes its box and quantises its codes; every
other program returns at once. A box is written whole, so a recycled block's old
content never leaks. Boxes are stored in the cache dtype here, where min/max are
exact; a narrower summary dtype (with outward rounding) is the torch path's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cell_update_kernel(
    slots_ptr, positions_ptr, boxes_ptr, codes_ptr, cache_ptr, key_offsets_ptr,
    box_stride_block, box_stride_slot, box_stride_side, box_stride_h,
    code_stride_block, code_stride_t, code_stride_h,
    block_stride, head_stride,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CELL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr, PLANE_BITS: tl.constexpr, PLANE_BYTES: tl.constexpr,
):
    i = tl.program_id(0)                    # token index in this step
    h = tl.program_id(1)                    # kv head
    pos = tl.load(positions_ptr + i)
    if (pos + 1) % CELL == 0:
        slot = tl.load(slots_ptr + i).to(tl.int64)
        block = slot // BLOCK_SIZE
        first_offset = slot % BLOCK_SIZE - (CELL - 1)
        j = tl.arange(0, CELL)
        d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = d < HEAD_DIM
        k_off = tl.load(key_offsets_ptr + (first_offset + j)[:, None] * HEAD_DIM + d[None, :],
                        mask=d_ok[None, :], other=0)
        k = tl.load(cache_ptr + block * block_stride + h.to(tl.int64) * head_stride + k_off,
                    mask=d_ok[None, :], other=0.0)                                      # [CELL, HEAD_DIM_PAD]
        lo = tl.min(k, axis=0)
        hi = tl.max(k, axis=0)
        box = boxes_ptr + block * box_stride_block + (first_offset // CELL) * box_stride_slot + h * box_stride_h + d
        tl.store(box, lo, mask=d_ok)
        tl.store(box + box_stride_side, hi, mask=d_ok)
        if BITS > 0:
            lo32 = lo.to(tl.float32)
            step = (hi.to(tl.float32) - lo32) / ((1 << BITS) - 1)
            scaled = (k.to(tl.float32) - lo32[None, :]) / step[None, :]
            finite = (scaled == scaled) & (tl.abs(scaled) < float("inf"))
            scaled = tl.where(finite, scaled, 0.0)
            code = tl.minimum(tl.maximum(tl.floor(scaled + 0.5), 0.0), (1 << BITS) - 1).to(tl.int32)
            code = tl.where(d_ok[None, :], code, 0)
            # planes of PLANE_BITS, most significant first, each packing 8 // PLANE_BITS codes per
            # byte: byte b of a plane holds channels b*per .. b*per + per - 1
            PER: tl.constexpr = 8 // PLANE_BITS
            byte = tl.arange(0, HEAD_DIM_PAD // PER)
            shifts = (tl.arange(0, PER) * PLANE_BITS)[None, None, :]
            row = codes_ptr + block * code_stride_block + (first_offset + j).to(tl.int64)[:, None] * code_stride_t \
                + h * code_stride_h + byte[None, :]
            for plane in tl.static_range(BITS // PLANE_BITS):
                part = (code >> (PLANE_BITS * (BITS // PLANE_BITS - 1 - plane))) & ((1 << PLANE_BITS) - 1)
                grouped = tl.reshape(part, [CELL, HEAD_DIM_PAD // PER, PER])
                packed = tl.sum(grouped << shifts, axis=2).to(tl.uint8)                  # [CELL, HEAD_DIM_PAD // PER]
                tl.store(row + plane * PLANE_BYTES, packed, mask=(byte < PLANE_BYTES)[None, :])


@triton.jit
def _union_kernel(
    boxes_ptr, nodes_ptr, rows_ptr, block_table_ptr,
    stride_bt,
    box_stride_block, box_stride_slot, box_stride_side, box_stride_h,
    CHILD_SPAN: tl.constexpr, CHILD_FIRST_SLOT: tl.constexpr, SPAN: tl.constexpr, FIRST_SLOT: tl.constexpr,
    FANOUT: tl.constexpr, FANOUT_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    i = tl.program_id(0)                    # one node completed this step
    h = tl.program_id(1)
    node = tl.load(nodes_ptr + i).to(tl.int64)
    table = block_table_ptr + tl.load(rows_ptr + i).to(tl.int64) * stride_bt
    c = tl.arange(0, FANOUT_PAD)
    c_ok = c < FANOUT
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    child_last = (node * FANOUT + c + 1) * CHILD_SPAN - 1                                  # [FANOUT_PAD]
    child_block = tl.load(table + child_last // BLOCK_SIZE, mask=c_ok, other=0).to(tl.int64)
    child_slot = CHILD_FIRST_SLOT + (child_last % BLOCK_SIZE) // CHILD_SPAN
    child = boxes_ptr + child_block[:, None] * box_stride_block + child_slot[:, None] * box_stride_slot \
        + h * box_stride_h + d[None, :]
    tile = c_ok[:, None] & d_ok[None, :]
    lo = tl.min(tl.load(child, mask=tile, other=float("inf")), axis=0)
    hi = tl.max(tl.load(child + box_stride_side, mask=tile, other=float("-inf")), axis=0)
    last = (node + 1) * SPAN - 1
    block = tl.load(table + last // BLOCK_SIZE).to(tl.int64)
    dst = boxes_ptr + block * box_stride_block + (FIRST_SLOT + (last % BLOCK_SIZE) // SPAN) * box_stride_slot \
        + h * box_stride_h + d
    tl.store(dst, lo, mask=d_ok)
    tl.store(dst + box_stride_side, hi, mask=d_ok)


def update_cells(slots: torch.Tensor, positions: torch.Tensor, boxes: torch.Tensor, codes: torch.Tensor | None,
                 cache: torch.Tensor, block_stride: int, head_stride: int, key_offsets: torch.Tensor,
                 cell_size: int, code_bits: int, plane_bits: int) -> None:
    """Summarise the cells this step's write fills. slots, positions: [n] of the written tokens;
    boxes: [num_blocks, num_slots, 2, H, D] (cells first) in the cache dtype; cache: flat;
    codes: [num_blocks, block_size, H, bytes] uint8, code_bits // plane_bits planes of plane_bits each.
    """
    if boxes.dtype != cache.dtype:
        raise ValueError(f"summary kernel stores boxes in the cache dtype ({cache.dtype}), got {boxes.dtype}")
    n = slots.numel()
    if n == 0:
        return
    num_kv_heads, head_dim = boxes.shape[3], boxes.shape[4]
    block_size = key_offsets.shape[0]
    codes_arg = codes if codes is not None else boxes
    code_strides = (codes.stride(0), codes.stride(1), codes.stride(2)) if codes is not None else (0, 0, 0)
    _cell_update_kernel[(n, num_kv_heads)](
        slots, positions, boxes, codes_arg, cache, key_offsets.contiguous(), *boxes.stride()[:4], *code_strides,
        block_stride, head_stride, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        CELL=cell_size, BLOCK_SIZE=block_size, BITS=code_bits, PLANE_BITS=max(plane_bits, 1),
        PLANE_BYTES=codes.shape[-1] // (code_bits // plane_bits) if codes is not None else 1)


def update_union(boxes: torch.Tensor, nodes: torch.Tensor, rows: torch.Tensor, block_table: torch.Tensor,
                 child_span: int, child_first_slot: int, span: int, first_slot: int, fanout: int,
                 block_size: int) -> None:
    """Union boxes of level nodes completed this step. nodes: [m] node ids; rows: [m] block-table rows."""
    if nodes.numel() == 0:
        return
    num_kv_heads, head_dim = boxes.shape[3], boxes.shape[4]
    _union_kernel[(nodes.numel(), num_kv_heads)](
        boxes, nodes, rows, block_table, block_table.stride(0), *boxes.stride()[:4],
        CHILD_SPAN=child_span, CHILD_FIRST_SLOT=child_first_slot, SPAN=span, FIRST_SLOT=first_slot,
        FANOUT=fanout, FANOUT_PAD=triton.next_power_of_2(fanout), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim))
