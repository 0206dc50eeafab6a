"""Score bounds of cell-tree nodes read straight from the paged summaries: the memory-bound
part of the cell-tree query.

Twin: vllm_hsr.core.query.RowBounds (box and code bounds, core/summaries.py's formulas).
`node_box_bounds`: grid (rows, cdiv(F, BLOCK_N)); each program locates BLOCK_N nodes of one
(sequence, KV head) row through its block-table row, loads their boxes once and bounds
s*<q,k> over each box for every query head of the GQA group. `token_code_bounds`: grid
(rows, cdiv(P, BLOCK_T)); each program reads the first PLANES code planes of BLOCK_T tokens
of complete cells (with their cells' boxes) and bounds every token. All offsets are int64. The
rounding allowances (margins) are passed in by the caller, so kernel and twin share one definition of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_query(q_ptr, row, stride_q_row, stride_q_g, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """The query heads of one row's GQA group: q [GROUP_PAD, HEAD_DIM_PAD] fp32, its aranges and masks."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    g_ok, d_ok = g < GROUP, d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_q_row + g[:, None] * stride_q_g + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    return q, g, d, g_ok, d_ok


@triton.jit
def _finite_bounds(center, width, margin, scale):
    # inf - inf inside a bound means the box overflowed: the bound is unbounded
    ub = scale * (center + width) + margin
    lb = scale * (center - width) - margin
    return tl.where(ub != ub, float("inf"), ub), tl.where(lb != lb, float("-inf"), lb)


@triton.jit
def _integer_weights(w, RANGE: tl.constexpr, RANGE_BITS: tl.constexpr):
    """core.summaries.integer_weights of w [..., HEAD_DIM_PAD] (padding 0): x (int32), 2^e and the residual.
    For a largest |w| below 2^-100 (then 2^-e is no float), e stays at -100: still a valid split, with a
    larger residual than the twin's."""
    top = tl.max(tl.abs(w), axis=2)
    bits = top.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 255) - 126                              # top = m * 2^exponent, m in [0.5, 1)
    mantissa = ((bits & 0x7FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    exponent = exponent - RANGE_BITS - tl.where(mantissa * (2 << RANGE_BITS) <= RANGE, 1, 0)
    usable = (top > 0) & (top < float("inf"))
    exponent = tl.where(usable, tl.maximum(exponent, -100), 0)
    down = ((127 - exponent) << 23).to(tl.float32, bitcast=True)      # 2^-e and 2^e: e is in [-100, 114]
    power = ((127 + exponent) << 23).to(tl.float32, bitcast=True)
    y = w * down[:, :, None]
    magic = 12582912.0                                                 # 1.5 * 2^23: adding it rounds to even
    rounded = (y + magic) - magic
    x = tl.where(usable[:, :, None], rounded, 0.0)
    residual = tl.where(usable, tl.sum(tl.abs(y - rounded), axis=2), tl.where(top == 0, 0.0, float("inf")))
    return x.to(tl.int32), power, residual


@triton.jit
def _node_box_bounds_kernel(
    q_ptr, nodes_ptr, tables_ptr, kv_heads_ptr, boxes_ptr, ub_ptr, lb_ptr,
    num_nodes, scale, margin_rel, margin_abs,
    stride_q_row, stride_q_g, stride_nodes_row, stride_tables_row,
    stride_box_block, stride_box_slot, stride_box_side, stride_box_head,
    SPAN: tl.constexpr, FIRST_SLOT: tl.constexpr, BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < num_nodes
    q, g, d, g_ok, d_ok = _group_query(q_ptr, row, stride_q_row, stride_q_g, GROUP, GROUP_PAD, HEAD_DIM,
                                       HEAD_DIM_PAD)
    node = tl.load(nodes_ptr + row * stride_nodes_row + n, mask=n_ok, other=0).to(tl.int64)   # [BLOCK_N]
    last = (node + 1) * SPAN - 1
    logical = tl.minimum(last // BLOCK_SIZE, MAX_BLOCKS - 1)
    block = tl.load(tables_ptr + row * stride_tables_row + logical, mask=n_ok, other=0).to(tl.int64)
    slot = FIRST_SLOT + (last % BLOCK_SIZE) // SPAN
    kv_head = tl.load(kv_heads_ptr + row).to(tl.int64)
    base = block * stride_box_block + slot * stride_box_slot + kv_head * stride_box_head
    tile = n_ok[:, None] & d_ok[None, :]
    lo = tl.load(boxes_ptr + base[:, None] + d[None, :], mask=tile, other=0.0).to(tl.float32)   # [BLOCK_N, D]
    hi = tl.load(boxes_ptr + base[:, None] + stride_box_side + d[None, :], mask=tile, other=0.0).to(tl.float32)

    q_pos = tl.maximum(q, 0.0)[None, :, :]
    q_neg = tl.minimum(q, 0.0)[None, :, :]
    lo3, hi3 = lo[:, None, :], hi[:, None, :]
    upper = tl.sum(hi3 * q_pos + lo3 * q_neg, axis=2)                                    # [BLOCK_N, GROUP_PAD]
    lower = tl.sum(lo3 * q_pos + hi3 * q_neg, axis=2)
    magnitude = tl.maximum(tl.abs(lo), tl.abs(hi))[:, None, :]
    margin = scale * margin_rel * tl.sum(magnitude * tl.abs(q)[None, :, :], axis=2) + margin_abs
    ub = scale * upper + margin
    lb = scale * lower - margin
    out = (row * num_nodes + n)[:, None] * GROUP + g[None, :]
    done = n_ok[:, None] & g_ok[None, :]
    tl.store(ub_ptr + out, tl.where(ub != ub, float("inf"), ub), mask=done)
    tl.store(lb_ptr + out, tl.where(lb != lb, float("-inf"), lb), mask=done)


@triton.jit
def _token_code_bounds_kernel(
    q_ptr, tokens_ptr, tables_ptr, kv_heads_ptr, boxes_ptr, codes_ptr, ub_ptr, lb_ptr,
    num_tokens, scale, margin_rel, margin_abs, step_slack, magnitude_slack, abs_slack,
    stride_q_row, stride_q_g, stride_tokens_row, stride_tables_row,
    stride_box_block, stride_box_slot, stride_box_side, stride_box_head,
    stride_code_block, stride_code_token, stride_code_head,
    CELL_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, PLANE_BITS: tl.constexpr,
    PLANE_BYTES: tl.constexpr, PLANES: tl.constexpr, RANGE: tl.constexpr, RANGE_BITS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // PLANE_BITS
    UNKNOWN: tl.constexpr = (1 << (BITS - PLANES * PLANE_BITS)) - 1      # 2^u - 1 for the u bits not read
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    q, g, d, g_ok, d_ok = _group_query(q_ptr, row, stride_q_row, stride_q_g, GROUP, GROUP_PAD, HEAD_DIM,
                                       HEAD_DIM_PAD)
    token = tl.load(tokens_ptr + row * stride_tokens_row + t, mask=t_ok, other=0).to(tl.int64)   # [BLOCK_T]
    block = tl.load(tables_ptr + row * stride_tables_row + token // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
    kv_head = tl.load(kv_heads_ptr + row).to(tl.int64)
    tile = t_ok[:, None] & d_ok[None, :]
    # a complete cell lies in one block; its box is level 0's slot of that block
    box = (block * stride_box_block + ((token % BLOCK_SIZE) // CELL_SIZE) * stride_box_slot
           + kv_head * stride_box_head)
    lo = tl.load(boxes_ptr + box[:, None] + d[None, :], mask=tile, other=0.0).to(tl.float32)    # [BLOCK_T, D]
    hi = tl.load(boxes_ptr + box[:, None] + stride_box_side + d[None, :], mask=tile, other=0.0).to(tl.float32)
    code_row = codes_ptr + block * stride_code_block + (token % BLOCK_SIZE) * stride_code_token \
        + kv_head * stride_code_head
    known = tl.zeros([BLOCK_T, HEAD_DIM_PAD], dtype=tl.int32)
    for plane in tl.static_range(PLANES):                # most significant plane first
        packed = tl.load(code_row[:, None] + plane * PLANE_BYTES + (d // PER_BYTE)[None, :], mask=tile,
                         other=0).to(tl.int32)
        known = (known << PLANE_BITS) | ((packed >> ((d % PER_BYTE) * PLANE_BITS)[None, :]) & ((1 << PLANE_BITS) - 1))

    step = (hi - lo) / ((1 << BITS) - 1)
    magnitude = tl.maximum(tl.abs(lo), tl.abs(hi))
    half = step * (0.5 + UNKNOWN / 2 + step_slack) + magnitude * magnitude_slack + abs_slack
    step = tl.where(tl.abs(step) < float("inf"), step, 0.0)
    q3 = q[None, :, :]
    cell_part = tl.sum((lo + (UNKNOWN / 2) * step)[:, None, :] * q3, axis=2)            # [BLOCK_T, GROUP_PAD]
    # the known codes against the cell's integer weights: an exact integer dot (core.summaries.code_bounds)
    x, power, residual = _integer_weights(step[:, None, :] * q3, RANGE, RANGE_BITS)    # [BLOCK_T, GROUP_PAD, D]
    dot = tl.sum(x * known[:, None, :], axis=2).to(tl.float32) * power
    center = cell_part + (UNKNOWN + 1) * dot
    q_abs = tl.abs(q)[None, :, :]
    width = tl.sum(half[:, None, :] * q_abs, axis=2) + ((1 << BITS) - (UNKNOWN + 1)) * residual * power
    margin = scale * margin_rel * tl.sum((magnitude + half)[:, None, :] * q_abs, axis=2) + margin_abs
    ub, lb = _finite_bounds(center, width, margin, scale)
    out = (row * num_tokens + t)[:, None] * GROUP + g[None, :]
    done = t_ok[:, None] & g_ok[None, :]
    tl.store(ub_ptr + out, ub, mask=done)
    tl.store(lb_ptr + out, lb, mask=done)


def _bounds_out(q: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ub, lb for items [R, n]: [R, n, G] fp32 each."""
    ub = torch.empty(*items.shape, q.shape[1], device=q.device, dtype=torch.float32)
    return ub, torch.empty_like(ub)


def _launch_shapes(q: torch.Tensor) -> dict:
    group, head_dim = q.shape[1], q.shape[2]
    return dict(GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                HEAD_DIM_PAD=triton.next_power_of_2(head_dim))


def node_box_bounds(q: torch.Tensor, nodes: torch.Tensor, tables: torch.Tensor, kv_heads: torch.Tensor,
                    boxes: torch.Tensor, *, span: int, first_slot: int, block_size: int, scale: float,
                    margin_rel: float, margin_abs: float, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [R, G, D] fp32; nodes: [R, F] (every id inside its row's table); tables: [R, max_blocks];
    kv_heads: [R]; boxes: [num_blocks, slots, 2, Hkv, D]. returns ub, lb: [R, F, G] fp32"""
    num_rows, num_nodes = nodes.shape
    ub, lb = _bounds_out(q, nodes)
    if ub.numel() == 0:
        return ub, lb
    q, nodes, tables = q.contiguous(), nodes.contiguous(), tables.contiguous()
    _node_box_bounds_kernel[(num_rows, triton.cdiv(num_nodes, block_n))](
        q, nodes, tables, kv_heads.contiguous(), boxes, ub, lb, num_nodes, scale, margin_rel, margin_abs,
        q.stride(0), q.stride(1), nodes.stride(0), tables.stride(0), *boxes.stride()[:4],
        SPAN=span, FIRST_SLOT=first_slot, BLOCK_SIZE=block_size, MAX_BLOCKS=tables.shape[1],
        BLOCK_N=block_n, **_launch_shapes(q))
    return ub, lb


def token_code_bounds(q: torch.Tensor, tokens: torch.Tensor, tables: torch.Tensor, kv_heads: torch.Tensor,
                      boxes: torch.Tensor, codes: torch.Tensor, *, cell_size: int, block_size: int, bits: int,
                      plane_bits: int, planes: int, scale: float, margin_rel: float, margin_abs: float,
                      step_slack: float, magnitude_slack: float, abs_slack: float, weight_range: int,
                      block_t: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [R, G, D] fp32; tokens: [R, P] tokens of complete cells (padding: any token of the row's first
    block); codes: [num_blocks, block_size, Hkv, bytes] uint8 in planes of plane_bits, of which the first
    `planes` are read; weight_range: core.summaries.code_weight_range. returns ub, lb: [R, P, G] fp32"""
    num_rows, num_tokens = tokens.shape
    ub, lb = _bounds_out(q, tokens)
    if ub.numel() == 0:
        return ub, lb
    q, tokens, tables = q.contiguous(), tokens.contiguous(), tables.contiguous()
    _token_code_bounds_kernel[(num_rows, triton.cdiv(num_tokens, block_t))](
        q, tokens, tables, kv_heads.contiguous(), boxes, codes, ub, lb, num_tokens, scale, margin_rel, margin_abs,
        step_slack, magnitude_slack, abs_slack, q.stride(0), q.stride(1), tokens.stride(0), tables.stride(0),
        *boxes.stride()[:4], *codes.stride()[:3], CELL_SIZE=cell_size, BLOCK_SIZE=block_size, BITS=bits,
        PLANE_BITS=plane_bits, PLANE_BYTES=codes.shape[-1] // (bits // plane_bits), PLANES=planes,
        RANGE=weight_range, RANGE_BITS=weight_range.bit_length() - 1,
        BLOCK_T=block_t, **_launch_shapes(q))
    return ub, lb
