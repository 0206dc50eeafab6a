"""The paged torch path equals the dense-interface path: same summaries, same reads, same output."""

import pytest
import torch

from paged_cache import PagedBatch
from reference import dense64
from reference_tree import DenseCellTree, PagedCellTree
from vllm_hsr import HSRConfig, sparse_attention
from vllm_hsr.ops import hsr_decode

SEQ_LENS = (1, 37, 1025, 2011)


@pytest.mark.parametrize("layout", ("flash", "cpu"))
@pytest.mark.parametrize("block_size,cell_size", ((16, 16), (32, 16), (128, 32)))
def test_incremental_summaries_equal_dense_tree(layout, block_size, cell_size):
    cfg = HSRConfig(cell_size=cell_size, fanout=2, tree_levels=3, budget_tokens=max(cell_size, 16))
    batch = PagedBatch((37, 300), 2, 64, block_size, cfg, layout=layout)
    batch.fill(chunks=(0.3, 0.6))
    for seq, n in enumerate(batch.seq_lens):
        paged = PagedCellTree(batch.summaries, batch.block_table[seq].long(), n)
        dense = DenseCellTree(batch.keys[seq], cfg)
        for level in range(cfg.tree_levels + 1):
            nodes = torch.arange(dense.num_nodes(level))
            for head in range(2):
                for got, want in zip(paged.boxes(level, nodes, head), dense.boxes(level, nodes, head)):
                    assert torch.equal(got, want), (level, head)
        cells = torch.arange(dense.num_coded_cells())
        assert torch.equal(paged.codes(cells, 1), dense.codes(cells, 1))


@pytest.mark.parametrize("mode", ("softmax", "relu", "topk"))
@pytest.mark.parametrize("block_size", (16, 128))
@pytest.mark.parametrize("layout", ("flash", "cpu"))
def test_paged_decode_equals_dense_interface(mode, block_size, layout):
    num_kv_heads, group, head_dim = 2, 4, 64
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=0.3, budget_tokens=64, cell_size=16)
    batch = PagedBatch(SEQ_LENS, num_kv_heads, head_dim, block_size, cfg, layout=layout, seed=block_size)
    batch.fill()
    q = torch.randn(len(SEQ_LENS), num_kv_heads * group, head_dim)
    scale = cfg.resolved_scale(head_dim)
    out, bound, stats = hsr_decode(q, batch.cache, batch.layout, batch.summaries, batch.block_table,
                                     torch.tensor(SEQ_LENS), cfg, scale, record_tokens=True)
    assert torch.isfinite(out).all()
    for seq in range(len(SEQ_LENS)):
        k, v = batch.keys[seq], batch.values[seq]
        want, want_stats = sparse_attention(q[seq], k, v, cfg)
        torch.testing.assert_close(out[seq], want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(bound[seq], want_stats.error_bound, rtol=1e-4, atol=1e-12)
        for got, expect in zip(stats.tokens_read[seq * num_kv_heads:], want_stats.tokens_read):
            assert torch.equal(got, expect)
        if mode == "relu":
            ref = dense64(q[seq], k, v, mode="relu", scale=scale, alpha=cfg.alpha, bias=cfg.bias)
            torch.testing.assert_close(out[seq].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,code_bits,copy_keys", ((torch.float32, 8, False), (torch.bfloat16, 4, True),
                                                       (torch.float32, 0, True), (torch.float32, 8, True)))
def test_summaries_in_page_padding_equal_side_tensors(dtype, code_bits, copy_keys):
    """Summaries in the KV pages' padding (as customize_spec sizes them) read and decode like side
    tensors, and never touch the KV bytes of their page. A key copy holds exactly the keys of complete
    cells, and nothing is written for the partial last cell."""
    from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, SummaryWrite, flat_view, page_layout
    from vllm_hsr.ops import update_summaries
    cfg = HSRConfig(mode="topk", budget_tokens=32, cell_size=16, fanout=2, tree_levels=2, code_bits=code_bits)
    num_blocks, num_kv_heads, block_size, head_dim = 12, 2, 32, 64
    item = dtype.itemsize
    dense_bytes = num_kv_heads * block_size * 2 * head_dim * item
    key_dtype = dtype if copy_keys else None
    end = page_layout(dense_bytes, block_size, num_kv_heads, head_dim, cfg, dtype, key_dtype).end
    pages = torch.full((num_blocks, end // item), torch.nan, dtype=dtype)
    kv_cache = pages[:, :dense_bytes // item].view(num_blocks, num_kv_heads, block_size, 2 * head_dim)
    keys_view, values_view = kv_cache.split(head_dim, dim=-1)
    layout = PagedKVLayout.from_views(kv_cache, keys_view, values_view)
    padded = PagedSummaries.in_pages(kv_cache, dense_bytes, head_dim, cfg, dtype, copy_keys)
    side = PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, block_size, cfg, dtype, key_dtype=key_dtype)
    assert padded.boxes.untyped_storage().data_ptr() == kv_cache.untyped_storage().data_ptr()
    assert PagedSummaries.in_pages(kv_cache.contiguous(), dense_bytes, head_dim, cfg, dtype, copy_keys) is None
    assert (padded.keys is None) == (side.keys is None) == (not copy_keys)
    if copy_keys:
        side.keys.fill_(torch.nan)

    gen = torch.Generator().manual_seed(1)
    seq_lens = (150, 77)
    table = (torch.randperm(num_blocks - 1, generator=gen)[:10] + 1).view(2, 5)
    seqs = []
    for row, n in enumerate(seq_lens):
        keys = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        positions = torch.arange(n)
        blocks, offsets = table[row][positions // block_size], positions % block_size
        keys_view[blocks, :, offsets], values_view[blocks, :, offsets] = keys, values
        seqs.append((keys, values))
        for start, stop in ((0, n // 2), *((p, p + 1) for p in range(n // 2, n))):   # a prefill chunk, then decode
            part = positions[start:stop]
            write = SummaryWrite.plan(blocks[start:stop] * block_size + offsets[start:stop], part,
                                      torch.full_like(part, row), block_size, cfg)
            for summaries in (padded, side):
                update_summaries(summaries, write, table, flat_view(kv_cache), layout)
    for row, (keys, values) in enumerate(seqs):         # the KV bytes are untouched
        n = seq_lens[row]
        positions = torch.arange(n)
        blocks, offsets = table[row][positions // block_size], positions % block_size
        assert torch.equal(keys_view[blocks, :, offsets], keys) and torch.equal(values_view[blocks, :, offsets], values)
        complete = n // cfg.cell_size * cfg.cell_size
        for summaries in (padded, side) if copy_keys else ():
            assert torch.equal(summaries.keys[blocks[:complete], offsets[:complete]], keys[:complete])
            assert summaries.keys[blocks[complete:], offsets[complete:]].isnan().all()     # the partial cell
        trees = [PagedCellTree(s, table[row], n) for s in (padded, side)]
        for level in range(cfg.tree_levels + 1):
            nodes = torch.arange(trees[0].num_nodes(level))
            for head in range(num_kv_heads):
                for got, want in zip(trees[0].boxes(level, nodes, head), trees[1].boxes(level, nodes, head)):
                    assert torch.equal(got, want)
    q = torch.randn(2, 4 * num_kv_heads, head_dim, generator=gen).to(dtype)
    runs = [hsr_decode(q, kv_cache, layout, s, table, torch.tensor(seq_lens), cfg, head_dim ** -0.5,
                       record_tokens=True) for s in (padded, side)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.isfinite(runs[0][0].float()).all()
    for got, want in zip(runs[0][2].tokens_read, runs[1][2].tokens_read):
        assert torch.equal(got, want)
