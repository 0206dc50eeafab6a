"""relu mode is exact: equal to dense ReLU^alpha attention, and it skips what cannot count."""

import math

import pytest
import torch

from reference import dense64
from vllm_hsr import HSRConfig, dense_attention, sparse_attention

LENGTHS = (1, 15, 16, 17, 1000, 4099)
GQA = ((1, 1), (2, 2), (1, 4), (2, 8))   # (num_kv_heads, group)


def _inputs(num_tokens, num_kv_heads, group, head_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_kv_heads * group, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    return q, k, v


@pytest.mark.parametrize("num_tokens", LENGTHS)
@pytest.mark.parametrize("num_kv_heads,group", GQA)
@pytest.mark.parametrize("alpha", (1, 2, 3))
def test_relu_equals_dense(num_tokens, num_kv_heads, group, alpha):
    q, k, v = _inputs(num_tokens, num_kv_heads, group, seed=num_tokens + alpha)
    scale = 1 / math.sqrt(q.shape[1])
    for bias in (-0.5, 0.0, 0.5, 1.5):
        cfg = HSRConfig(mode="relu", alpha=alpha, bias=bias)
        out, stats = sparse_attention(q, k, v, cfg)
        ref = dense64(q, k, v, mode="relu", scale=scale, alpha=alpha, bias=bias)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense_attention(q, k, v, cfg).double(), ref, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(stats.error_bound) == 0


@pytest.mark.parametrize("num_kv_heads,group", GQA)
def test_relu_every_score_below_bias_gives_zeros(num_kv_heads, group):
    q, k, v = _inputs(1000, num_kv_heads, group)
    out, stats = sparse_attention(q, k, v, HSRConfig(mode="relu", alpha=2, bias=1e3))
    assert torch.equal(out, torch.zeros_like(out))
    # every box bound is below the bias: only the partial last cell (no summary) is loaded
    assert stats.keys_read == (1000 % HSRConfig().cell_size) * num_kv_heads


def test_relu_rows_below_bias_mixed_with_active_rows():
    q, k, v = _inputs(500, 2, 4)
    q[:4] *= 0.0                 # KV head 0's group: every score is 0 <= bias
    cfg = HSRConfig(mode="relu", alpha=1, bias=0.25)
    out, _ = sparse_attention(q, k, v, cfg)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    ref = dense64(q, k, v, mode="relu", scale=cfg.resolved_scale(32), alpha=1, bias=0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_relu_skips_keys_on_a_sparse_workload():
    """A few keys aligned with the query: exact output while most keys stay unread."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, head_dim = 4096, 64
    q = torch.randn(4, head_dim, generator=gen)
    k = 0.2 * torch.randn(num_tokens, 1, head_dim, generator=gen)
    v = torch.randn(num_tokens, 1, head_dim, generator=gen)
    hits = torch.tensor([5, 777, 2048, 4000])
    k[hits, 0] = q.mean(0)
    cfg = HSRConfig(mode="relu", alpha=2, bias=2.0)
    out, stats = sparse_attention(q, k, v, cfg)
    ref = dense64(q, k, v, mode="relu", scale=cfg.resolved_scale(head_dim), alpha=2, bias=2.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert stats.keys_read < num_tokens // 10
    assert set(hits.tolist()) <= set(stats.tokens_read[0].tolist())
