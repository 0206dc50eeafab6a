"""softmax mode: the certificate bounds the true dropped mass, and eps bounds the certificate."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import dense64, dropped_relative_mass
from vllm_hsr import HSRConfig, dense_attention, sparse_attention

WORKLOADS = ("random", "needle", "clusters", "ties", "outlier_channel", "large_scores", "decaying")


def make_workload(kind, num_tokens, num_kv_heads, group, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_kv_heads * group, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    direction = q.view(num_kv_heads, group, head_dim).mean(1)                   # [Hkv, D]
    if kind == "needle":
        k *= 0.1
        k[torch.randint(num_tokens, (1,), generator=gen)] = 3 * direction
    elif kind == "clusters":
        centers = 2 * torch.randn(8, num_kv_heads, head_dim, generator=gen)
        k = centers[torch.randint(8, (num_tokens,), generator=gen)] + 0.05 * k
    elif kind == "ties":
        k = k[:1].expand_as(k).clone()
    elif kind == "outlier_channel":
        k[..., 0] *= 40.0
        q[:, 0] = q[:, 0].abs() + 1
    elif kind == "large_scores":
        k *= 8.0
    elif kind == "decaying":   # recency-weighted: scores grow towards the end
        k = 0.2 * k + torch.linspace(0, 1, num_tokens).view(-1, 1, 1) * direction
    return q, k, v


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(WORKLOADS))
    num_kv_heads = draw(st.sampled_from((1, 2)))
    group = draw(st.sampled_from((1, 2, 4)))
    head_dim = draw(st.sampled_from((8, 16, 64)))
    num_tokens = draw(st.integers(1, 700))
    seed = draw(st.integers(0, 2**31 - 1))
    cell_size = draw(st.sampled_from((1, 4, 16)))
    cfg = HSRConfig(
        mode="softmax",
        eps=draw(st.sampled_from((0.3, 1e-1, 1e-2, 1e-3, 1e-6))),
        cell_size=cell_size,
        budget_tokens=max(cell_size, 16),
        fanout=draw(st.sampled_from((2, 4, 16))),
        tree_levels=draw(st.integers(0, 4)),
        code_bits=draw(st.sampled_from((0, 1, 2, 4, 8))),
        sink_tokens=draw(st.integers(0, 20)),
        window_tokens=draw(st.integers(0, 40)),
        seed_cells=draw(st.integers(0, 4)),
        summary_dtype=draw(st.sampled_from(("auto", "bfloat16", "float16"))),
        tree_budget_share=draw(st.sampled_from((0.0, 0.25, 0.9))),
    )
    return make_workload(kind, num_tokens, num_kv_heads, group, head_dim, seed), cfg


def _check_certificate(q, k, v, cfg, out, stats):
    scale = cfg.resolved_scale(q.shape[1])
    bound = stats.error_bound.double()
    dropped = dropped_relative_mass(q, k, scale, stats.tokens_read)
    assert torch.all(dropped <= bound), (dropped, bound)
    assert torch.all(bound <= cfg.eps), (bound, cfg.eps)
    ref = dense64(q, k, v, mode="softmax", scale=scale)
    v_max = v.double().norm(dim=-1).max()
    err = (out.double() - ref).norm(dim=-1)
    assert torch.all(err <= 2 * bound * v_max + 1e-5 * v_max), (err, bound)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_softmax_certificate_holds(case):
    (q, k, v), cfg = case
    out, stats = sparse_attention(q, k, v, cfg)
    assert torch.isfinite(out).all()
    _check_certificate(q, k, v, cfg, out, stats)


@pytest.mark.parametrize("kind", WORKLOADS)
@pytest.mark.parametrize("key_dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_softmax_certificate_low_precision_keys(kind, key_dtype):
    q, k, v = make_workload(kind, 1500, 2, 4, 64, seed=11)
    q, k, v = q.to(key_dtype), k.to(key_dtype), v.to(key_dtype)
    cfg = HSRConfig(mode="softmax", eps=1e-3)
    out, stats = sparse_attention(q, k, v, cfg)
    assert out.dtype == key_dtype
    bound = stats.error_bound.double()
    dropped = dropped_relative_mass(q, k, cfg.resolved_scale(64), stats.tokens_read)
    assert torch.all(dropped <= bound) and torch.all(bound <= cfg.eps)


@pytest.mark.parametrize("num_tokens", (1, 17, 1000, 4099))
@pytest.mark.parametrize("num_kv_heads,group", ((1, 1), (2, 4), (1, 8)))
def test_eps_zero_equals_dense(num_tokens, num_kv_heads, group):
    q, k, v = make_workload("needle", num_tokens, num_kv_heads, group, 32, seed=num_tokens)
    cfg = HSRConfig(mode="softmax", eps=0.0)
    out, stats = sparse_attention(q, k, v, cfg)
    ref = dense64(q, k, v, mode="softmax", scale=cfg.resolved_scale(32))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_attention(q, k, v, cfg).double(), ref, atol=1e-5, rtol=1e-5)
    assert stats.keys_read == num_tokens * num_kv_heads
    assert torch.count_nonzero(stats.error_bound) == 0


def test_needle_far_from_window_is_found_without_reading_every_key():
    num_tokens, head_dim = 8192, 64
    gen = torch.Generator().manual_seed(5)
    direction = torch.randn(head_dim, generator=gen)
    q = direction + 0.3 * torch.randn(4, head_dim, generator=gen)   # one GQA group, related heads
    k = 0.3 * torch.randn(num_tokens, 1, head_dim, generator=gen)
    v = torch.randn(num_tokens, 1, head_dim, generator=gen)
    needle = 1234
    k[needle, 0] = 3 * direction
    v[needle, 0] = 10.0
    cfg = HSRConfig(mode="softmax", eps=1e-3)
    out, stats = sparse_attention(q, k, v, cfg)
    scale = cfg.resolved_scale(head_dim)
    assert needle in stats.tokens_read[0].tolist()
    assert stats.keys_read < num_tokens // 4
    assert stats.bytes_read_fraction < 0.5
    _check_certificate(q, k, v, cfg, out, stats)
    assert (out.double() - dense64(q, k, v, mode="softmax", scale=scale)).abs().max() < 1e-2


@pytest.mark.parametrize("budget", (16, 100, 1024))
@pytest.mark.parametrize("code_bits", (0, 4))
def test_topk_reads_at_most_budget_sink_window(budget, code_bits):
    q, k, v = make_workload("clusters", 3000, 2, 4, 32, seed=budget)
    cfg = HSRConfig(mode="topk", budget_tokens=budget, sink_tokens=16, window_tokens=64, code_bits=code_bits)
    out, stats = sparse_attention(q, k, v, cfg)
    assert torch.isfinite(out).all()
    for tokens in stats.tokens_read:
        assert tokens.numel() <= budget + 16 + 64
        assert tokens.unique().numel() == tokens.numel()
    dropped = dropped_relative_mass(q, k, cfg.resolved_scale(32), stats.tokens_read)
    assert torch.all(dropped <= stats.error_bound.double())


def test_topk_keeps_the_best_keys_when_bounds_are_tight():
    """With 8-bit codes the selected tokens are the true top ones, up to the bound slack."""
    q, k, v = make_workload("random", 2000, 1, 1, 64, seed=2)
    cfg = HSRConfig(mode="topk", budget_tokens=64, sink_tokens=0, window_tokens=0, code_bits=8)
    _, stats = sparse_attention(q, k, v, cfg)
    x = (k[:, 0] @ q[0]) * cfg.resolved_scale(64)
    true_top = set(x.topk(48).indices.tolist())
    assert true_top <= set(stats.tokens_read[0].tolist())
    assert math.isclose(stats.keys_read, 64)
