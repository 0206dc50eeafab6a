"""kernels/tree_query.py under TRITON_INTERPRET=1 against its torch twin (core.query.RowBounds),
alone and inside the whole query, and the int64 offsets of the decode path's kernels."""

import pytest
import torch

from paged_cache import PagedBatch
from vllm_hsr import HSRConfig
from vllm_hsr.core.decode import decode_candidates
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, flat_view
from vllm_hsr.core.query import RowBounds, TreeRows
from vllm_hsr.kernels.sparse_decode import sparse_decode
from vllm_hsr.ops import TritonRowBounds, hsr_decode

SEQ_LENS = (1, 37, 1025, 2011)


def _rows(batch: PagedBatch, group: int, seed: int) -> TreeRows:
    q = torch.randn(len(batch.seq_lens), batch.summaries.boxes.shape[3] * group, batch.summaries.head_dim,
                    generator=torch.Generator().manual_seed(seed))
    return TreeRows.from_batch(q, batch.summaries, batch.block_table, torch.tensor(batch.seq_lens), 0.125)


def _random_nodes(rows: TreeRows, level: int, span: int, width: int, seed: int) -> torch.Tensor:
    """Nodes that exist in each row (complete ones above cells), random order: [R, width]"""
    gen = torch.Generator().manual_seed(seed)
    count = rows.num_tokens // span if level else -(-rows.num_tokens // span)
    return (torch.rand(rows.q.shape[0], width, generator=gen) * count.clamp(min=1).unsqueeze(1)).long()


@pytest.mark.parametrize("layout,block_size,cell_size,code_bits",
                         (("flash", 16, 16, 4), ("cpu", 32, 16, 8), ("flash", 128, 32, 8), ("cpu", 16, 16, 2)))
@pytest.mark.parametrize("num_kv_heads,group", ((2, 1), (1, 4), (2, 8)))
@pytest.mark.parametrize("head_dim", (64, 128))
def test_box_and_code_bounds_match_twin(layout, block_size, cell_size, code_bits, num_kv_heads, group, head_dim):
    cfg = HSRConfig(cell_size=cell_size, fanout=2, tree_levels=2, code_bits=code_bits)
    batch = PagedBatch(SEQ_LENS, num_kv_heads, head_dim, block_size, cfg, layout=layout, seed=head_dim + group)
    batch.fill(chunks=(0.7,))
    rows = _rows(batch, group, seed=block_size)
    torch_bounds, triton_bounds = RowBounds(rows), TritonRowBounds(rows)
    for level in range(cfg.tree_levels + 1):
        nodes = _random_nodes(rows, level, batch.summaries.span(level), 24, seed=level)
        has_nodes = (rows.num_tokens >= batch.summaries.span(level)).view(-1, 1, 1)   # rows of 1 token: no node
        for got, want in zip(triton_bounds.box(level, nodes), torch_bounds.box(level, nodes)):
            assert not torch.isnan(got).any()
            torch.testing.assert_close(got * has_nodes, want * has_nodes, rtol=1e-5, atol=1e-5)
    cells = _random_nodes(rows, 1, cell_size, 10, seed=7)            # complete cells only (level-1 count rule)
    coded = (rows.num_tokens >= cell_size).view(-1, 1, 1, 1)
    for planes in (1, None):                                          # the first plane, then all of them
        for got, want in zip(triton_bounds.code(cells, planes), torch_bounds.code(cells, planes)):
            torch.testing.assert_close(got * coded, want * coded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ("softmax", "relu", "topk"))
@pytest.mark.parametrize("num_kv_heads,group,head_dim", ((2, 4, 64), (1, 8, 128)))
def test_query_triton_equals_torch(mode, num_kv_heads, group, head_dim, monkeypatch):
    """The whole query and decode, Triton bounds vs torch bounds: the same tokens, the same output."""
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=8.0, budget_tokens=64, cell_size=16, fanout=4, tree_levels=2,
                    code_bits=8)
    batch = PagedBatch(SEQ_LENS, num_kv_heads, head_dim, 32, cfg, layout="cpu", seed=5)
    batch.fill()
    # sharp queries (scores of std 4), so that softmax has something to skip on random keys
    q = 4 * torch.randn(len(SEQ_LENS), num_kv_heads * group, head_dim, generator=torch.Generator().manual_seed(2))
    results = []
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("HSR_KERNELS", kernels)
        results.append(hsr_decode(q, batch.cache, batch.layout, batch.summaries, batch.block_table,
                                  torch.tensor(SEQ_LENS), cfg, 0.125, record_tokens=True))
    (want, want_bound, want_stats), (got, got_bound, got_stats) = results
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_bound, want_bound, atol=1e-9, rtol=1e-4)
    for a, b in zip(got_stats.tokens_read, want_stats.tokens_read):
        assert torch.equal(a, b)
    assert got_stats.keys_read < got_stats.dense_keys


def _top_blocks(block_stride: int, count: int) -> tuple[int, torch.Tensor]:
    """A block count whose last blocks start past 2**31 elements, and a shuffled table of them."""
    num_blocks = 2 ** 31 // block_stride + count + 1
    ids = num_blocks - 1 - torch.randperm(count, generator=torch.Generator().manual_seed(count))
    assert int(ids.min()) * block_stride >= 2 ** 31
    return num_blocks, ids.to(torch.int32).unsqueeze(0)


@pytest.mark.parametrize("code_bits", (0, 4))
def test_bound_offsets_are_int64(code_bits):
    """Box and code bounds of blocks whose offsets pass 2**31 elements. The summaries are
    allocated, not touched: only the blocks in use get pages (and random content)."""
    num_kv_heads, head_dim, block_size = 8, 128, 16
    cfg = HSRConfig(cell_size=16, tree_levels=0, code_bits=code_bits)
    stride = block_size * num_kv_heads * head_dim // 2 if code_bits else 2 * num_kv_heads * head_dim
    num_blocks, table = _top_blocks(stride, 6)
    summaries = PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, block_size, cfg, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    blocks = table[0].long()
    lo = torch.randn(6, num_kv_heads, head_dim, generator=gen)
    summaries.boxes[blocks, 0, 0] = lo.to(torch.bfloat16)
    summaries.boxes[blocks, 0, 1] = (lo + torch.rand(lo.shape, generator=gen)).to(torch.bfloat16)
    if code_bits:
        summaries.codes[blocks] = torch.randint(0, 256, summaries.codes[blocks].shape, generator=gen,
                                                dtype=torch.uint8)
    q = torch.randn(1, num_kv_heads * 2, head_dim, generator=gen)
    rows = TreeRows.from_batch(q, summaries, table, torch.tensor([6 * block_size]), 0.09)
    cells = torch.randperm(6, generator=gen).expand(num_kv_heads, -1)
    for got, want in zip(TritonRowBounds(rows).box(0, cells), RowBounds(rows).box(0, cells)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if code_bits:
        for got, want in zip(TritonRowBounds(rows).code(cells), RowBounds(rows).code(cells)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_offsets_are_int64():
    """Sparse decode (listed and dense rows) over cache blocks whose offsets pass 2**31 elements."""
    num_kv_heads, head_dim, block_size, n = 8, 128, 16, 90
    num_blocks, table = _top_blocks(num_kv_heads * block_size * 2 * head_dim, 6)
    cache = torch.empty(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=torch.bfloat16)
    page = cache.view(num_blocks, num_kv_heads, block_size, 2, head_dim)      # K and V interleaved per token
    layout = PagedKVLayout.from_views(cache, page[..., 0, :], page[..., 1, :])
    gen = torch.Generator().manual_seed(2)
    blocks = table[0].long()
    page[blocks] = torch.randn(page[blocks].shape, generator=gen).to(torch.bfloat16)
    q = torch.randn(1, num_kv_heads * 2, head_dim, generator=gen)
    tokens = torch.stack([torch.randperm(n, generator=gen)[:40] for _ in range(num_kv_heads)]).unsqueeze(0)
    counts = torch.full((1, num_kv_heads), 40, dtype=torch.int32)
    skipped = torch.full((1, 2 * num_kv_heads), -torch.inf)
    dense = torch.zeros(1, num_kv_heads, dtype=torch.bool)
    dense[0, 3] = True
    seq_lens = torch.tensor([n])
    got, _ = sparse_decode(q, flat_view(cache), layout.block_stride, layout.head_stride, layout.key_offsets,
                           layout.value_offsets, table, seq_lens, tokens, counts, dense, skipped,
                           relu=False, alpha=1, bias=0.0, scale=0.09, block_n=64)
    want, _ = decode_candidates(q, flat_view(cache), layout, table, seq_lens, tokens, counts, dense, skipped,
                                HSRConfig(), 0.09)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
