"""hsr_decode: the one entry point of HSR paged decode.

Today every device runs the pure-torch path (vllm_hsr.core.paged); the Triton
kernels take over on CUDA as they land (kernels issue).
"""

from __future__ import annotations

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.attention import HSRStats
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, paged_decode


def hsr_decode(q: torch.Tensor, cache: torch.Tensor, layout: PagedKVLayout, summaries: PagedSummaries,
               block_table: torch.Tensor, seq_lens: torch.Tensor, cfg: HSRConfig,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, HSRStats]:
    """HSR attention of one decode query per sequence over a paged KV cache.

    q: [batch, num_q_heads, head_dim]; cache: the layer's KV cache (indexed through `layout`);
    block_table: [batch, max_blocks]; seq_lens: [batch] cached tokens, this step's included.
    returns out [batch, num_q_heads, head_dim], error_bound [batch, num_q_heads], stats
    """
    return paged_decode(q, cache, layout, summaries, block_table, seq_lens, cfg, scale)
