"""HSR attention of one decode query over one contiguous sequence (the dense interface), through hsr_decode.

The sequence is laid into a small paged cache (FLASH_ATTN's layout, shuffled nowhere: the paged
tests do that), summarised as a prefill would be, and decoded by `hsr_decode`, the same entry point
(and so the same kernel choice, HSR_KERNELS) as the vLLM path.
"""

from __future__ import annotations

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.attention import HSRStats, check_inputs
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, flat_view, summary_dtype
from vllm_hsr.ops import hsr_decode

MIN_BLOCK_TOKENS = 64


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cfg: HSRConfig) -> tuple[torch.Tensor, HSRStats]:
    """q: [num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
    returns out [num_q_heads, head_dim] in q's dtype, and HSRStats (error_bound [num_q_heads],
    tokens_read: one ascending list per KV head)
    """
    check_inputs(q, k, v)
    num_tokens, num_kv_heads, head_dim = k.shape
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
    summaries.update(positions + block_size, positions, torch.zeros_like(positions), table, flat_view(cache), layout)
    out, bound, stats = hsr_decode(q.unsqueeze(0), cache, layout, summaries, table, torch.tensor([num_tokens]), cfg,
                                   cfg.resolved_scale(head_dim), record_tokens=True)
    stats.error_bound = bound[0]
    return out[0], stats
