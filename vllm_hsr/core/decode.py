"""Attention over per-(sequence, KV head) candidate token lists in a paged cache.

The pure-torch twin of kernels/sparse_decode.py: the second half of HSR decode, after
selection has written each row's reported tokens and its skipped mass.
"""

from __future__ import annotations

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.attention import round_up_certificate
from vllm_hsr.core.paged import PagedKVLayout


def decode_candidates(q: torch.Tensor, flat_cache: torch.Tensor, layout: PagedKVLayout, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, dense: torch.Tensor,
                      skipped: torch.Tensor, cfg: HSRConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Hq, D]; tokens: [B, Hkv, cap] sequence positions (first counts[b, h] valid);
    dense: [B, Hkv] bool, rows read whole (positions 0..seq_len-1) whatever their list;
    skipped: [B, Hq] fp32 ln of the skipped mass bound (-inf: nothing skipped).
    returns out [B, Hq, D] fp32 and error_bound [B, Hq] fp32 (0 in relu mode)
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, device = tokens.shape[1], tokens.device
    group = num_q_heads // num_kv_heads
    lens = seq_lens.long().view(batch, 1).expand(-1, num_kv_heads)
    if dense.any():
        width = max(tokens.shape[2], int(lens[dense].max()))
        tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[2]))
        tokens = torch.where(dense.unsqueeze(-1), torch.arange(width, device=device), tokens)
        counts = torch.where(dense, lens, counts.long())
    valid = torch.arange(tokens.shape[2], device=device) < counts.unsqueeze(-1)      # [B, Hkv, cap]
    positions = torch.where(valid, tokens, torch.zeros_like(tokens)).flatten(0, 1)
    tables = block_table.long().repeat_interleave(num_kv_heads, 0)
    kv_heads = torch.arange(num_kv_heads, device=device).repeat(batch)
    keys, values = layout.gather_rows(flat_cache, tables, kv_heads, positions)
    keys = keys.float().view(batch, num_kv_heads, -1, head_dim)                               # [B, Hkv, cap, D]
    values = values.float().view(batch, num_kv_heads, -1, head_dim)
    q32 = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bhnd->bhgn", q32, keys) * scale                            # [B, Hkv, G, cap]
    mask = valid.unsqueeze(2)
    if cfg.mode == "relu":
        weights = torch.where(mask, torch.relu(scores - cfg.bias) ** cfg.alpha, torch.zeros_like(scores))
        norm = weights.sum(-1)
        out = torch.einsum("bhgn,bhnd->bhgd", weights, values) / torch.where(norm > 0, norm, 1.0).unsqueeze(-1)
        return out.view(batch, num_q_heads, head_dim), torch.zeros(batch, num_q_heads, device=device)
    scores = torch.where(mask, scores, torch.full_like(scores, -torch.inf))
    m = scores.amax(-1)
    # only an all -inf row needs another reference: a +inf (or NaN) maximum makes the row NaN, as dense softmax
    m_safe = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    p = torch.exp(scores - m_safe.unsqueeze(-1))
    z = p.sum(-1)
    out = torch.einsum("bhgn,bhnd->bhgd", p, values) / torch.where(z > 0, z, 1.0).unsqueeze(-1)
    skipped = skipped.view(batch, num_kv_heads, group)
    bound = round_up_certificate(torch.exp(skipped - m_safe - torch.log(z)) * (1 + 1e-5), skipped)
    return out.view(batch, num_q_heads, head_dim), bound.view(batch, num_q_heads)
