"""The batched tree query: fixed-capacity lists, their dense fallback, and no host sync."""

import pytest
import torch

from paged_cache import PagedBatch
from reference import dense64
from vllm_hsr import HSRConfig
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, flat_view
from vllm_hsr.core.query import RowBounds, TreeQuery, TreeRows
from vllm_hsr.ops import hsr_decode

SEQ_LENS = (1, 37, 1025, 2011)


@pytest.mark.parametrize("mode", ("softmax", "relu", "topk"))
def test_overflowing_rows_fall_back_to_dense(mode):
    """A list capacity that the long rows cannot meet: those rows are read whole (exact, certificate 0),
    the others are untouched, and a capacity that fits changes nothing."""
    num_kv_heads, group, head_dim = 2, 4, 64
    base = HSRConfig(mode=mode, eps=1e-2, bias=0.3, budget_tokens=64, cell_size=16)
    batch = PagedBatch(SEQ_LENS, num_kv_heads, head_dim, 16, base, seed=11)
    batch.fill()
    q = torch.randn(len(SEQ_LENS), num_kv_heads * group, head_dim, generator=torch.Generator().manual_seed(3))
    seq_lens = torch.tensor(SEQ_LENS)
    run = {cap: hsr_decode(q, batch.cache, batch.layout, batch.summaries, batch.block_table, seq_lens,
                           HSRConfig(**{**base.__dict__, "max_candidates": cap}), 0.125, record_tokens=True)
           for cap in (0, 4096, 100)}
    sized, roomy, tight = run[0], run[4096], run[100]
    torch.testing.assert_close(roomy[0], sized[0], atol=1e-6, rtol=1e-6)   # list widths differ: sum order too
    assert all(torch.equal(a, b) for a, b in zip(roomy[2].tokens_read, sized[2].tokens_read))
    listed = torch.tensor([t.numel() for t in sized[2].tokens_read]).view(len(SEQ_LENS), num_kv_heads)
    assert (listed > 100).any() and (listed <= 100).any()   # the case has rows on both sides
    for seq, n in enumerate(SEQ_LENS):
        for kv_head in range(num_kv_heads):
            heads = slice(kv_head * group, (kv_head + 1) * group)
            read = tight[2].tokens_read[seq * num_kv_heads + kv_head]
            if listed[seq, kv_head] > 100:
                assert torch.equal(read, torch.arange(n))
                k, v = batch.keys[seq][:, kv_head:kv_head + 1], batch.values[seq][:, kv_head:kv_head + 1]
                ref = dense64(q[seq, heads], k, v, mode="relu" if mode == "relu" else "softmax", scale=0.125,
                              alpha=base.alpha, bias=base.bias)
                torch.testing.assert_close(tight[0][seq, heads].double(), ref, atol=1e-5, rtol=1e-5)
                assert (tight[1][seq, heads] == 0).all()
            else:
                assert torch.equal(read, sized[2].tokens_read[seq * num_kv_heads + kv_head])
                torch.testing.assert_close(tight[0][seq, heads], sized[0][seq, heads], atol=1e-6, rtol=1e-6)


def _on_meta(batch: PagedBatch, cfg: HSRConfig, capacity: int | None):
    """The query over meta tensors: shapes only, so any read of a value on the host raises."""
    meta = lambda t: t.to("meta")  # noqa: E731
    summaries = PagedSummaries(meta(batch.summaries.boxes), meta(batch.summaries.codes), cfg, batch.block_size)
    layout = PagedKVLayout(batch.layout.block_stride, batch.layout.head_stride, meta(batch.layout.key_offsets),
                           meta(batch.layout.value_offsets))
    layout.__dict__["channel_strides"] = batch.layout.channel_strides      # learnt from the real offsets
    q = torch.empty(len(batch.seq_lens), 8, 64, device="meta")
    rows = TreeRows.from_batch(q, summaries, meta(batch.block_table), meta(torch.tensor(batch.seq_lens)), 0.125)
    return TreeQuery(rows, cfg, RowBounds(rows), meta(flat_view(batch.cache)), layout, capacity).run()


@pytest.mark.parametrize("mode", ("softmax", "relu", "topk"))
def test_query_off_the_cpu_has_no_host_sync(mode):
    """Off the CPU the query never reads a device value on the host (a wait in every layer, and what CUDA
    graphs forbid): it runs on meta tensors, which cannot be read, with a fixed capacity and without one
    (lists then keep their full width)."""
    cfg = HSRConfig(mode=mode, budget_tokens=64, code_bits=8, max_candidates=256)
    batch = PagedBatch((37, 300), 2, 64, 16, cfg)
    batch.fill()
    found = _on_meta(batch, cfg, 256)
    assert found.tokens.shape == (2, 2, 256) and found.dense.shape == (2, 2)
    unsized = _on_meta(batch, cfg, None)
    assert unsized.tokens.shape[:2] == (2, 2) and unsized.tokens.shape[2] >= 300


@pytest.mark.parametrize("mode", ("softmax", "relu", "topk"))
def test_full_width_lists_decode_as_compacted_ones(mode, monkeypatch):
    """The accelerator's full-width lists (static_widths) hold the same tokens as the CPU's compacted ones:
    the same output, certificate and reads."""
    from vllm_hsr.core import query
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=0.3, budget_tokens=64, allow_relu_decode=True)
    batch = PagedBatch((1, 37, 700, 1025), 2, 64, 16, cfg, seed=4)
    batch.fill()
    q = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("HSR_KERNELS", "torch")
    runs = []
    for static in (False, True):
        monkeypatch.setattr(query, "static_widths", lambda device, static=static: static)
        runs.append(hsr_decode(q, batch.cache, batch.layout, batch.summaries, batch.block_table,
                               torch.tensor(batch.seq_lens), cfg, 0.125, record_tokens=True))
    (out, bound, stats), (full_out, full_bound, full_stats) = runs
    torch.testing.assert_close(full_out, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full_bound, bound, atol=1e-7, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(stats.tokens_read, full_stats.tokens_read))
    assert full_stats.keys_read == stats.keys_read
