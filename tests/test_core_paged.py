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
