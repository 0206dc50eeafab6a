"""What every HSR path shares: the stats record, the certificate's rounding, input checks,
and `dense_attention`, the same math over every key (the modes' dense reference).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_hsr.config import HSRConfig
from vllm_hsr.core.summaries import code_planes, plane_bytes


CERTIFICATE_FLOOR = 2.0 ** -126   # the smallest normal fp32: GPUs may flush subnormals to zero


@dataclasses.dataclass
class HSRStats:
    """What one sparse call read. Counts are summed over KV heads."""

    keys_read: int = 0            # tokens whose full key and value were loaded
    cells_read: int = 0           # cells with at least one such token
    summary_nodes_read: int = 0   # box summaries evaluated (cells and above)
    code_cells_read: int = 0      # cells whose tokens' first code plane was loaded
    refined_cells: int = 0        # cells whose tokens' other code planes were loaded
    bytes_read: int = 0           # keys + values + summaries + codes
    dense_bytes: int = 0          # keys + values of a dense read
    dense_keys: int = 0           # keys a dense read loads
    seed_keys_read: int = 0       # keys read (without values) to seed the softmax budget
    overflow_rows: int = 0        # (sequence, KV head) rows read densely: their candidate list overflowed
    error_bound: torch.Tensor | float | None = None  # [num_q_heads] ([batch, num_q_heads] from hsr_decode, or
                                                     # their maximum): relative dropped mass, 0 in relu mode
    tokens_read: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per KV head, sorted


    @property
    def bytes_read_fraction(self) -> float:
        return self.bytes_read / self.dense_bytes if self.dense_bytes else 0.0

    def set_bytes(self, summary_bytes: int, cfg: HSRConfig, head_dim: int, kv_itemsize: int,
                  dense_tokens: int) -> None:
        """Fill bytes_read / dense_bytes from the counters. summary_bytes: one box (lo and hi)."""
        plane = plane_bytes(head_dim, cfg.code_bits) * cfg.cell_size if cfg.code_bits else 0
        more_planes = code_planes(cfg.code_bits)[1] - 1 if cfg.code_bits else 0
        token_bytes = head_dim * kv_itemsize
        self.bytes_read = (self.keys_read * token_bytes + self.summary_nodes_read * summary_bytes
                           + (self.code_cells_read + self.refined_cells * more_planes) * plane
                           + self.seed_keys_read * token_bytes // 2)
        self.dense_bytes = dense_tokens * token_bytes
        self.dense_keys = dense_tokens


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 2 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            "expected q [num_q_heads, head_dim] and k, v [num_tokens, num_kv_heads, head_dim]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] == 0:
        raise ValueError("attention over an empty sequence (k and v have 0 tokens)")
    if q.shape[1] != k.shape[2]:
        raise ValueError(f"head_dim differs: q has {q.shape[1]}, k has {k.shape[2]}")
    if q.shape[0] % k.shape[1]:
        raise ValueError(f"num_q_heads={q.shape[0]} is not a multiple of num_kv_heads={k.shape[1]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def attend(scores: torch.Tensor, values: torch.Tensor,
           cfg: HSRConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted sum of values by the mode's weights.

    scores: [n, G] fp32 (n may be 0); values: [n, D]
    returns out [G, D] fp32, running max m [G], normaliser z [G] (sum of exp(x - m))
    """
    values = values.float()
    if cfg.mode == "relu":
        weights = torch.relu(scores - cfg.bias) ** cfg.alpha
        norm = weights.sum(0)
        out = (weights.T @ values) / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(1)
        return out, torch.zeros_like(norm), norm
    if scores.shape[0] == 0:
        empty = torch.zeros(scores.shape[1], device=scores.device)
        return torch.zeros(scores.shape[1], values.shape[1], device=scores.device), empty - math.inf, empty
    m = scores.amax(0)
    p = torch.exp(scores - m)
    z = p.sum(0)
    return (p.T @ values) / z.unsqueeze(1), m, z


def _scores(q_group: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    return (keys.float() @ q_group.T) * scale                           # [n, G]


def round_up_certificate(bound: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """0 where nothing was skipped; elsewhere at least FLT_MIN, so fp32 underflow never
    turns a positive dropped mass into a certificate of 0."""
    floor = torch.full_like(bound, CERTIFICATE_FLOOR)
    return torch.where(torch.isneginf(skipped), torch.zeros_like(bound), torch.maximum(bound, floor))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: HSRConfig) -> torch.Tensor:
    """Dense ReLU^alpha (relu mode) or softmax attention (other modes) over every key.

    q: [num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> [num_q_heads, head_dim]
    """
    check_inputs(q, k, v)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    scale = cfg.resolved_scale(head_dim)
    q32 = q.float().view(num_kv_heads, -1, head_dim)
    outs = [attend(_scores(q32[h], k[:, h], scale), v[:, h], cfg)[0] for h in range(num_kv_heads)]
    return torch.cat(outs).to(q.dtype)
