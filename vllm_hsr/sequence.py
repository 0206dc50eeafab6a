"""HSR attention of one decode query over one contiguous sequence (the dense interface).

The sequence is laid into a small paged cache (FLASH_ATTN's layout, shuffled nowhere:
the paged tests do that), summarised as a prefill would be, and decoded through the
same query and decode twin as the vLLM path, so both interfaces share one selection.
"""

from __future__ import annotations

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.attention import HSRStats, check_inputs
from vllm_hsr.core.decode import decode_candidates
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, flat_view
from vllm_hsr.core.query import RowBounds, TreeQuery, TreeRows
from vllm_hsr.core.paged import summary_dtype

MIN_BLOCK_TOKENS = 64


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cfg: HSRConfig) -> tuple[torch.Tensor, HSRStats]:
    """q: [num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
    returns out [num_q_heads, head_dim] in q's dtype, and HSRStats (error_bound [num_q_heads],
    tokens_read: one ascending list per KV head)
    """
    check_inputs(q, k, v)
    num_tokens, num_kv_heads, head_dim = k.shape
    scale = cfg.resolved_scale(head_dim)
    block_size = max(cfg.cell_size, MIN_BLOCK_TOKENS)
    num_blocks = 1 + -(-num_tokens // block_size)              # block 0: vLLM's null block, never read
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.promote_types(k.dtype, v.dtype))
    cache[0, 1:].flatten(0, 1)[:num_tokens] = k
    cache[1, 1:].flatten(0, 1)[:num_tokens] = v
    layout = PagedKVLayout.from_views(cache, cache[0].transpose(1, 2), cache[1].transpose(1, 2))
    table = torch.arange(1, num_blocks).unsqueeze(0)
    positions = torch.arange(num_tokens)
    summaries = PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, block_size, cfg,
                                        summary_dtype(cfg, k.dtype))
    flat = flat_view(cache)
    summaries.update(positions + block_size, positions, torch.zeros_like(positions), table, flat, layout)

    seq_lens = torch.tensor([num_tokens])
    rows = TreeRows.from_batch(q.unsqueeze(0), summaries, table, seq_lens, scale)
    found = TreeQuery(rows, cfg, RowBounds(rows), flat, layout).run()
    out, bound = decode_candidates(q.unsqueeze(0), flat, layout, table, seq_lens, found.tokens, found.counts,
                                   found.dense, found.skipped, cfg, scale)
    stats = found.stats()
    stats.set_bytes(2 * head_dim * summaries.boxes.element_size(), cfg, head_dim,
                    k.element_size() + v.element_size(), num_tokens * num_kv_heads)
    stats.error_bound = bound[0]
    stats.tokens_read = found.token_lists(seq_lens)
    return out[0].to(q.dtype), stats
