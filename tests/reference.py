"""Independent dense attention in float64: the oracle every test compares against."""

from __future__ import annotations

import torch


def scores64(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [Hq, D], k: [N, Hkv, D] -> [Hq, N] float64 (query head h reads KV head h // group)."""
    group = q.shape[0] // k.shape[1]
    keys = k.double().repeat_interleave(group, dim=1)           # [N, Hq, D]
    return torch.einsum("hd,nhd->hn", q.double(), keys) * scale


def dense64(q, k, v, *, mode: str, scale: float, alpha: int = 1, bias: float = 0.0) -> torch.Tensor:
    x = scores64(q, k, scale)
    values = v.double().repeat_interleave(q.shape[0] // k.shape[1], dim=1)   # [N, Hq, D]
    if mode == "relu":
        w = torch.relu(x - bias) ** alpha
        norm = w.sum(1, keepdim=True)
        w = torch.where(norm > 0, w / torch.where(norm > 0, norm, 1.0), torch.zeros_like(w))
    else:
        w = torch.softmax(x, dim=1)
    return torch.einsum("hn,nhd->hd", w, values)


def dropped_relative_mass(q, k, scale: float, tokens_read: list[torch.Tensor]) -> torch.Tensor:
    """Per query head: sum of exp(x) over unread keys / sum over read keys (float64)."""
    x = scores64(q, k, scale)
    group = q.shape[0] // k.shape[1]
    read = torch.zeros_like(x, dtype=torch.bool)
    for kv_head, tokens in enumerate(tokens_read):
        read[kv_head * group:(kv_head + 1) * group, tokens] = True
    m = torch.where(read, x, torch.full_like(x, -torch.inf)).amax(1, keepdim=True)
    p = torch.exp(x - m)
    return (p * ~read).sum(1) / (p * read).sum(1)
