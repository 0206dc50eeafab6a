"""Attention over per-(sequence, KV head) candidate token lists in a paged cache.

The pure-torch twin of kernels/sparse_decode.py: the second half of HSR decode, after
selection has written each row's reported tokens and its skipped mass.
"""

from __future__ import annotations

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.attention import round_up_certificate
from vllm_hsr.core.paged import PagedKVLayout

MODE_IDS = {"relu": 0, "softmax": 1, "topk": 1}   # topk attends like softmax


def decode_candidates(q: torch.Tensor, flat_cache: torch.Tensor, layout: PagedKVLayout, block_table: torch.Tensor,
                      tokens: torch.Tensor, counts: torch.Tensor, skipped: torch.Tensor, cfg: HSRConfig,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, D]; tokens: [B, Hkv, cap] sequence positions (first counts[b, h] valid);
    skipped: [B, Hq] fp32 ln of the skipped mass bound (-inf: nothing skipped).
    returns out [B, Hq, D] fp32 and error_bound [B, Hq] fp32 (0 in relu mode)
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, cap = tokens.shape[1], tokens.shape[2]
    group = num_q_heads // num_kv_heads
    valid = torch.arange(cap, device=tokens.device) < counts.unsqueeze(-1)               # [B, Hkv, cap]
    positions = torch.where(valid, tokens, torch.zeros_like(tokens))
    bs = layout.block_size
    blocks = block_table.long().gather(1, (positions // bs).flatten(1)).view_as(positions)
    base = blocks * layout.block_stride + torch.arange(num_kv_heads).view(1, -1, 1) * layout.head_stride
    in_block = positions % bs
    keys = flat_cache[base.unsqueeze(-1) + layout.key_offsets[in_block]].float()          # [B, Hkv, cap, D]
    values = flat_cache[base.unsqueeze(-1) + layout.value_offsets[in_block]].float()
    q32 = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bhnd->bhgn", q32, keys) * scale                            # [B, Hkv, G, cap]
    mask = valid.unsqueeze(2)
    if cfg.mode == "relu":
        weights = torch.where(mask, torch.relu(scores - cfg.bias) ** cfg.alpha, torch.zeros_like(scores))
        norm = weights.sum(-1)
        out = torch.einsum("bhgn,bhnd->bhgd", weights, values) / torch.where(norm > 0, norm, 1.0).unsqueeze(-1)
        return out.view(batch, num_q_heads, head_dim), torch.zeros(batch, num_q_heads)
    scores = torch.where(mask, scores, torch.full_like(scores, -torch.inf))
    m = scores.amax(-1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe.unsqueeze(-1))
    z = p.sum(-1)
    out = torch.einsum("bhgn,bhnd->bhgd", p, values) / torch.where(z > 0, z, 1.0).unsqueeze(-1)
    skipped = skipped.view(batch, num_kv_heads, group)
    bound = round_up_certificate(torch.exp(skipped - m_safe - torch.log(z)) * (1 + 1e-5), skipped)
    return out.view(batch, num_q_heads, head_dim), bound.view(batch, num_q_heads)
