"""kernels/sparse_decode.py under TRITON_INTERPRET=1 against its torch twin (core.decode)."""

import pytest
import torch

from paged_cache import make_cache
from reference import dense64
from vllm_hsr import HSRConfig
from vllm_hsr.core.decode import decode_candidates
from vllm_hsr.core.paged import flat_view
from vllm_hsr.kernels.sparse_decode import sparse_decode

SEQ_LENS = (1, 37, 1025, 2011)


def _case(layout, block_size, num_kv_heads, group, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = len(SEQ_LENS)
    blocks_per_seq = [-(-n // block_size) for n in SEQ_LENS]
    num_blocks = 1 + sum(blocks_per_seq)
    cache, keys, values, kv_layout = make_cache(layout, num_blocks, block_size, num_kv_heads, head_dim)
    keys.copy_(torch.randn(keys.shape, generator=gen))
    values.copy_(torch.randn(values.shape, generator=gen))
    physical = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()   # block 0: the null block
    table = torch.zeros(batch, max(blocks_per_seq), dtype=torch.int32)
    for b, count in enumerate(blocks_per_seq):
        table[b, :count] = torch.tensor([physical.pop() for _ in range(count)])
    cap = 96
    tokens = torch.zeros(batch, num_kv_heads, cap, dtype=torch.long)
    counts = torch.zeros(batch, num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(SEQ_LENS):
        for h in range(num_kv_heads):
            c = int(torch.randint(0, min(n, cap) + 1, (1,), generator=gen)) if (b + h) % 3 else min(n, cap)
            tokens[b, h, :c] = torch.randperm(n, generator=gen)[:c].sort().values
            counts[b, h] = c
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=gen)
    skipped = torch.randn(batch, num_kv_heads * group, generator=gen)
    skipped[0] = -torch.inf
    dense = torch.zeros(batch, num_kv_heads, dtype=torch.bool)
    dense[2:, 0] = True           # overflowed lists: whole rows of 1025 and 2011 tokens, past the capacity
    return cache, kv_layout, table, tokens, counts, dense, q, skipped


@pytest.mark.parametrize("mode", ("softmax", "relu"))
@pytest.mark.parametrize("layout,block_size", (("flash", 16), ("cpu", 128), ("flash", 128)))
@pytest.mark.parametrize("num_kv_heads,group", ((2, 1), (1, 4), (2, 8)))
@pytest.mark.parametrize("head_dim", (64, 128))
def test_kernel_matches_twin(mode, layout, block_size, num_kv_heads, group, head_dim):
    cache, kv_layout, table, tokens, counts, dense, q, skipped = _case(
        layout, block_size, num_kv_heads, group, head_dim, seed=block_size + head_dim + group)
    seq_lens = torch.tensor(SEQ_LENS)
    cfg = HSRConfig(mode=mode, alpha=3, bias=0.2)
    scale = head_dim ** -0.5
    flat = flat_view(cache)
    out = torch.full(q.shape, torch.nan)            # poison: an unwritten element shows
    got, got_bound = sparse_decode(q, flat, kv_layout.block_stride, kv_layout.head_stride, kv_layout.key_offsets,
                                   kv_layout.value_offsets, table, seq_lens, tokens, counts, dense, skipped,
                                   relu=mode == "relu", alpha=cfg.alpha, bias=cfg.bias, scale=scale, out=out,
                                   block_n=128)
    want, want_bound = decode_candidates(q, flat, kv_layout, table, seq_lens, tokens, counts, dense, skipped, cfg,
                                         scale)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_bound, want_bound, atol=1e-6, rtol=1e-4)
    for b, h in dense.nonzero().tolist():   # a dense row is plain attention over the whole sequence
        k, v = kv_layout.gather_rows(flat, table[b:b + 1], torch.tensor([h]), torch.arange(SEQ_LENS[b])[None])
        heads = slice(h * group, (h + 1) * group)
        ref = dense64(q[b, heads], k[0].unsqueeze(1), v[0].unsqueeze(1), mode=mode, scale=scale, alpha=cfg.alpha,
                      bias=cfg.bias)
        torch.testing.assert_close(got[b, heads].double(), ref, atol=1e-5, rtol=1e-5)
    empty = (counts == 0) & ~dense
    empty = empty.repeat_interleave(group, dim=1)
    assert torch.equal(got[empty], torch.zeros_like(got[empty]))  # pruned everywhere: zeros, never NaN


@pytest.mark.parametrize("mode", ("softmax", "relu"))
@pytest.mark.parametrize("num_splits", (1, 3))
def test_splits_walk_their_share(mode, num_splits):
    """Few splits over long rows: each program loops over many BLOCK_N steps of its share (the dense rows of
    1025 and 2011 tokens: 32 to 63 steps), the running max and normaliser carried across them."""
    cache, kv_layout, table, tokens, counts, dense, q, skipped = _case("cpu", 128, 2, 3, 64, seed=num_splits)
    seq_lens = torch.tensor(SEQ_LENS)
    cfg = HSRConfig(mode=mode, alpha=2, bias=0.1)
    flat = flat_view(cache)
    got, got_bound = sparse_decode(q, flat, kv_layout.block_stride, kv_layout.head_stride, kv_layout.key_offsets,
                                   kv_layout.value_offsets, table, seq_lens, tokens, counts, dense, skipped,
                                   relu=mode == "relu", alpha=cfg.alpha, bias=cfg.bias, scale=0.125,
                                   out=torch.full(q.shape, torch.nan), block_n=16, num_splits=num_splits)
    want, want_bound = decode_candidates(q, flat, kv_layout, table, seq_lens, tokens, counts, dense, skipped, cfg,
                                         0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_bound, want_bound, atol=1e-6, rtol=1e-4)


def test_nothing_compiled_depends_on_lengths():
    """The kernels' compile-time parameters are shapes of the model and the launch, never a list width or a
    sequence length: those would compile a new kernel whenever a step's lists or sequences grow."""
    import inspect

    from vllm_hsr.kernels import sparse_decode as module

    def constexprs(kernel):
        fn = getattr(kernel, "fn", kernel)
        return {name for name, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}

    assert constexprs(module._sparse_decode_split_kernel) == {
        "NUM_KV_HEADS", "GROUP", "GROUP_PAD", "HEAD_DIM", "HEAD_DIM_PAD", "BLOCK_SIZE", "BLOCK_N", "NUM_SPLITS",
        "RELU", "ALPHA"}
    assert constexprs(module._merge_splits_kernel) == {"HEAD_DIM", "HEAD_DIM_PAD", "NUM_SPLITS", "SPLITS_PAD",
                                                       "RELU"}
    assert "max_seq_len" not in inspect.signature(module.sparse_decode).parameters


def test_same_result_for_block_sizes_16_and_128():
    """The same sequences and candidate lists, paged with two block sizes: the same attention."""
    gen = torch.Generator().manual_seed(99)
    contents = [(torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen)) for n in SEQ_LENS]
    q = torch.randn(len(SEQ_LENS), 8, 64, generator=gen)
    skipped = torch.randn(len(SEQ_LENS), 8, generator=gen)
    counts = torch.tensor([[min(n, 60)] * 2 for n in SEQ_LENS], dtype=torch.int32)
    tokens = torch.zeros(len(SEQ_LENS), 2, 60, dtype=torch.long)
    for b, n in enumerate(SEQ_LENS):
        for h in range(2):
            picked = torch.randperm(n, generator=gen)[:60]
            tokens[b, h, :picked.numel()] = picked
    results = []
    for block_size in (16, 128):
        cache, kv_layout, table, *_ = _case("flash", block_size, 2, 4, 64, seed=7)
        no_dense = torch.zeros(len(SEQ_LENS), 2, dtype=torch.bool)
        keys_view, values_view = cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
        for b, (k, v) in enumerate(contents):
            pos = torch.arange(k.shape[0])
            blocks = table[b].long()[pos // block_size]
            for h in range(2):
                keys_view[blocks, h, pos % block_size] = k[:, h]
                values_view[blocks, h, pos % block_size] = v[:, h]
        out, bound = sparse_decode(q, flat_view(cache), kv_layout.block_stride, kv_layout.head_stride,
                                   kv_layout.key_offsets, kv_layout.value_offsets, table, torch.tensor(SEQ_LENS), tokens,
                                   counts, no_dense, skipped, relu=False, alpha=1, bias=0.0, scale=0.125)
        results.append((out, bound))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ("softmax", "relu", "topk"))
def test_hsr_decode_pipeline_triton_equals_torch(mode, monkeypatch):
    from paged_cache import PagedBatch
    from vllm_hsr.ops import hsr_decode
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=0.3, budget_tokens=64)
    batch = PagedBatch(SEQ_LENS, 2, 64, 16, cfg, seed=3)
    batch.fill()
    q = torch.randn(len(SEQ_LENS), 8, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("HSR_KERNELS", kernels)
        results.append(hsr_decode(q, batch.cache, batch.layout, batch.summaries, batch.block_table,
                                  torch.tensor(SEQ_LENS), cfg, 0.125)[:2])
    torch.testing.assert_close(results[1], results[0], atol=2e-5, rtol=1e-4)
