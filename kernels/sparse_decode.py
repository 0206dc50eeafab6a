"""Split-K sparse paged decode over candidate token lists, with a log-sum-exp merge.

Twin: vllm_hsr.core.decode.decode_candidates. Grid (batch * num_kv_heads, NUM_SPLITS), the
split count fixed per launch site: each program takes an equal share of its row's tokens
(the candidate list, or the whole sequence for a row whose list overflowed) and walks it
BLOCK_N tokens at a time, loading each key and value once for all query heads of the GQA
group through the block table and the layout's offset tables (any cache layout, packed ones
included); it keeps a running (max, normaliser, accumulator) per query head and writes it as
the split's partial. The merge kernel combines the splits and writes out and certificate.
Nothing depends on list widths or sequence lengths at compile time or on the host: one
compiled kernel serves every step, and the grid follows the batch, not the longest sequence.
A split with no token contributes (m=-inf, l=0, acc=0): never NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_SPLITS = 16       # programs per (sequence, KV head): enough to fill a GPU at small batches


@triton.jit
def _sparse_decode_split_kernel(
    q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, tokens_ptr, counts_ptr, dense_ptr,
    key_offsets_ptr, value_offsets_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    scale, bias, capacity,
    block_stride, head_stride,
    stride_qb, stride_qh,
    stride_bt_b,
    stride_tok_b, stride_tok_h,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, RELU: tl.constexpr, ALPHA: tl.constexpr,
):
    row = tl.program_id(0)                       # batch * NUM_KV_HEADS + kv_head
    split = tl.program_id(1)
    b = row // NUM_KV_HEADS
    kv_head = row % NUM_KV_HEADS
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM

    q_rows = kv_head * GROUP + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + q_rows[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)          # [GROUP_PAD, HEAD_DIM_PAD]

    # a dense row (its list overflowed) reads positions 0..seq_len-1 instead of its list
    dense = tl.load(dense_ptr + row) != 0
    count = tl.where(dense, tl.load(seq_lens_ptr + b), tl.load(counts_ptr + row))
    share = tl.cdiv(tl.cdiv(count, NUM_SPLITS), BLOCK_N) * BLOCK_N                    # whole BLOCK_N steps
    first = split * share
    last = tl.minimum(first + share, count)
    list_base = tokens_ptr + b.to(tl.int64) * stride_tok_b + kv_head * stride_tok_h
    table_base = block_table_ptr + b.to(tl.int64) * stride_bt_b
    head_base = kv_head.to(tl.int64) * head_stride

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    if RELU:
        m = tl.zeros([GROUP_PAD], dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    for start in range(first, last, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < last
        from_list = n_ok & (n < capacity) & (tl.zeros([BLOCK_N], dtype=tl.int1) == dense)
        listed = tl.load(list_base + n, mask=from_list, other=0).to(tl.int64)
        pos = tl.where(dense, n.to(tl.int64), listed)                                    # [BLOCK_N]
        block = tl.load(table_base + pos // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        base = block * block_stride + head_base                                        # int64: no overflow
        in_block = pos % BLOCK_SIZE
        tile = n_ok[:, None] & d_ok[None, :]
        k_off = tl.load(key_offsets_ptr + in_block[:, None] * HEAD_DIM + d[None, :], mask=tile, other=0)
        v_off = tl.load(value_offsets_ptr + in_block[:, None] * HEAD_DIM + d[None, :], mask=tile, other=0)
        k = tl.load(cache_ptr + base[:, None] + k_off, mask=tile, other=0.0).to(tl.float32)  # [BLOCK_N, HEAD_DIM_PAD]
        v = tl.load(cache_ptr + base[:, None] + v_off, mask=tile, other=0.0).to(tl.float32)

        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                      # [GROUP_PAD, BLOCK_N]
        if RELU:
            w = tl.maximum(s - bias, 0.0)
            a = w
            for _ in tl.static_range(ALPHA - 1):
                a = a * w
            p = tl.where(n_ok[None, :], a, 0.0)
        else:
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))                                   # [GROUP_PAD]
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            rescale = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))
            l = l * rescale
            acc = acc * rescale[:, None]
            m = m_new
        l += tl.sum(p, axis=1)
        acc += tl.sum(p[:, :, None] * v[None, :, :], axis=1)                           # [GROUP_PAD, HEAD_DIM_PAD]

    part = (b.to(tl.int64) * NUM_KV_HEADS * GROUP + q_rows) * NUM_SPLITS + split          # [GROUP_PAD]
    tl.store(part_m_ptr + part, m, mask=g_ok)
    tl.store(part_l_ptr + part, l, mask=g_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, skipped_ptr, out_ptr, bound_ptr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr, RELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)          # batch * num_q_heads + q_head
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = s < NUM_SPLITS
    d_ok = d < HEAD_DIM
    m = tl.load(part_m_ptr + row * NUM_SPLITS + s, mask=s_ok, other=float("-inf"))     # [SPLITS_PAD]
    l = tl.load(part_l_ptr + row * NUM_SPLITS + s, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)                      # [SPLITS_PAD, HEAD_DIM_PAD]
    if RELU:
        w = tl.where(s_ok, 1.0, 0.0)
        big_m = 0.0
    else:
        big_m = tl.max(m, axis=0)
        big_m = tl.where(big_m == float("-inf"), 0.0, big_m)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big_m))
    total = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out, mask=d_ok)
    if RELU:
        tl.store(bound_ptr + row, 0.0)
    else:
        skipped = tl.load(skipped_ptr + row)
        bound = tl.exp(skipped - big_m - tl.log(total)) * (1 + 1e-5)
        bound = tl.maximum(bound, 1.1754943508222875e-38)   # FLT_MIN: underflow never certifies 0
        tl.store(bound_ptr + row, tl.where(skipped == float("-inf"), 0.0, bound))


def sparse_decode(q: torch.Tensor, cache: torch.Tensor, block_stride: int, head_stride: int,
                  key_offsets: torch.Tensor, value_offsets: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, dense: torch.Tensor,
                  skipped: torch.Tensor, *, relu: bool, alpha: int, bias: float, scale: float,
                  out: torch.Tensor | None = None, block_n: int = 32,
                  num_splits: int = NUM_SPLITS) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, D]; cache: flat (1-D) KV cache; key/value_offsets: [block_size, D] int64;
    block_table: [B, max_blocks]; seq_lens: [B]; tokens: [B, Hkv, cap]; counts: [B, Hkv];
    dense: [B, Hkv] bool (read the row's seq_len tokens, not its list); skipped: [B, Hq] fp32.
    returns out [B, Hq, D] fp32 (written in place if given) and error_bound [B, Hq] fp32.
    No host synchronisation: the grid is (B * Hkv, num_splits) whatever the lengths.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, cap = tokens.shape[1], tokens.shape[2]
    group = num_q_heads // num_kv_heads
    device = q.device
    part_m = torch.empty(batch, num_q_heads, num_splits, device=device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, num_q_heads, num_splits, head_dim, device=device, dtype=torch.float32)
    out = torch.empty(batch, num_q_heads, head_dim, device=device, dtype=torch.float32) if out is None else out
    bound = torch.empty(batch, num_q_heads, device=device, dtype=torch.float32)
    q = q.contiguous()
    tokens, counts = tokens.contiguous(), counts.to(torch.int32).contiguous()
    block_table = block_table.contiguous()
    _sparse_decode_split_kernel[(batch * num_kv_heads, num_splits)](
        q, cache, block_table, seq_lens.to(torch.int32), tokens, counts, dense.to(torch.int8).contiguous(),
        key_offsets.contiguous(), value_offsets.contiguous(),
        part_m, part_l, part_acc, scale, bias, cap, block_stride, head_stride,
        q.stride(0), q.stride(1), block_table.stride(0), tokens.stride(0), tokens.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=key_offsets.shape[0],
        BLOCK_N=block_n, NUM_SPLITS=num_splits, RELU=relu, ALPHA=alpha)
    _merge_splits_kernel[(batch * num_q_heads,)](
        part_m, part_l, part_acc, skipped.float().contiguous(), out, bound,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), NUM_SPLITS=num_splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), RELU=relu)
    return out, bound
