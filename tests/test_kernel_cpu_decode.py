"""The compiled CPU kernel (kernels/cpu_decode.py) against its torch twin and the float64 dense reference."""

import logging
import math

import pytest
import torch

from paged_cache import PagedBatch
from reference import dense64
from vllm_hsr import HSRConfig
from vllm_hsr.kernels import cpu_build, cpu_decode
from vllm_hsr.ops import hsr_decode, kernel_path, native_settings, native_unavailable

SEQ_LENS = (1, 37, 1025, 2011)
COUNTERS = ("keys_read", "cells_read", "summary_nodes_read", "code_cells_read", "refined_cells", "seed_keys_read",
            "overflow_rows")


def _decode(batch: PagedBatch, q: torch.Tensor, cfg: HSRConfig, kernels: str, monkeypatch):
    monkeypatch.setenv("HSR_KERNELS", kernels)
    return hsr_decode(q, batch.cache, batch.layout, batch.summaries, batch.block_table,
                      torch.tensor(batch.seq_lens), cfg, cfg.resolved_scale(q.shape[-1]), record_tokens=True)


def _check_against_twin(batch: PagedBatch, q: torch.Tensor, cfg: HSRConfig, monkeypatch) -> None:
    """Same reads as the twin (a near-tie may flip a token or two), same output and certificate where the reads
    agree, the same counters, and on every row what the mode promises against the float64 dense reference."""
    out, bound, stats = _decode(batch, q, cfg, "native", monkeypatch)
    want_out, want_bound, want = _decode(batch, q, cfg, "torch", monkeypatch)
    assert torch.isfinite(out).all() and torch.isfinite(bound).all()
    num_kv_heads = batch.summaries.boxes.shape[3]
    group = q.shape[1] // num_kv_heads
    same_rows = 0
    for row, (got, expect) in enumerate(zip(stats.tokens_read, want.tokens_read)):
        differ = set(got.tolist()) ^ set(expect.tolist())
        assert len(differ) <= max(2, expect.numel() // 100), (row, sorted(differ)[:10])
        assert torch.equal(got, got.unique()), row                  # ascending, no repeats
        if not differ:
            same_rows += 1
            seq, kv_head = divmod(row, num_kv_heads)
            heads = slice(kv_head * group, (kv_head + 1) * group)
            close = dict(atol=2e-5, rtol=2e-5) if out.dtype == torch.float32 else {}   # else: an ulp of q's dtype
            torch.testing.assert_close(out[seq, heads], want_out[seq, heads], **close)
            torch.testing.assert_close(bound[seq, heads], want_bound[seq, heads], rtol=1e-4, atol=1e-30)
    assert same_rows >= len(stats.tokens_read) // 2       # coarse codes tie: the two may break ties apart
    if same_rows == len(stats.tokens_read) and not want.overflow_rows:   # an overflowed row stops early here
        assert {name: getattr(stats, name) for name in COUNTERS} == {name: getattr(want, name) for name in COUNTERS}
    scale = cfg.resolved_scale(q.shape[-1])
    for seq in range(len(batch.seq_lens)):
        k, v = batch.keys[seq], batch.values[seq]
        if cfg.mode == "relu":
            ref = dense64(q[seq], k, v, mode="relu", scale=scale, alpha=cfg.alpha, bias=cfg.bias)
            torch.testing.assert_close(out[seq].double(), ref, atol=2e-2 if k.dtype != torch.float32 else 1e-5,
                                       rtol=1e-3)
            continue
        ref = dense64(q[seq].float(), k.float(), v.float(), mode="softmax", scale=scale)
        err = (out[seq].double() - ref).norm(dim=-1)
        rounding = 1e-4 if out.dtype == torch.float32 else 2.0 ** -7 * ref.abs().max()   # out comes in q's dtype
        allowed = 2 * bound[seq].double() * v.double().norm(dim=-1).max() + rounding
        assert (err <= allowed).all(), (seq, err, allowed)


def _batch(cfg: HSRConfig, *, num_kv_heads=2, head_dim=64, block_size=16, layout="flash", dtype=torch.float32,
           seed=0, key_copy=False) -> PagedBatch:
    batch = PagedBatch(SEQ_LENS, num_kv_heads, head_dim, block_size, cfg, layout=layout, seed=seed, dtype=dtype,
                       summary_dtype=dtype, key_copy=key_copy)
    batch.fill(chunks=(0.4, 0.99))          # two prefill chunks, then a few single-token steps
    return batch


def _query(batch: PagedBatch, group: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    num_kv_heads, head_dim = batch.summaries.boxes.shape[3], batch.summaries.head_dim
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(len(SEQ_LENS), num_kv_heads * group, head_dim, generator=gen)).to(dtype)


@pytest.mark.parametrize("layout", ("flash", "cpu"))
@pytest.mark.parametrize("code_bits", (8, 4, 0))
@pytest.mark.parametrize("mode", ("topk", "softmax", "relu"))
def test_native_equals_torch_twin(mode, code_bits, layout, monkeypatch):
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=0.3, budget_tokens=64, code_bits=code_bits, fanout=4, tree_levels=2)
    batch = _batch(cfg, layout=layout, block_size=32 if layout == "cpu" else 16, seed=code_bits)
    _check_against_twin(batch, _query(batch, 4, seed=1), cfg, monkeypatch)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("mode", ("topk", "softmax", "relu"))
def test_native_half_precision_cache_and_boxes(mode, dtype, monkeypatch):
    cfg = HSRConfig(mode=mode, eps=1e-2, budget_tokens=64)
    batch = _batch(cfg, dtype=dtype, seed=3)
    _check_against_twin(batch, _query(batch, 2, seed=4, dtype=dtype), cfg, monkeypatch)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", ("flash", "cpu"))
@pytest.mark.parametrize("mode", ("topk", "softmax", "relu"))
def test_native_reads_the_key_copy(mode, layout, dtype, monkeypatch):
    """With a key copy (NaN wherever no complete cell was copied) the kernel scores complete cells from it,
    the partial cell from the cache, and matches the twin, which reads the cache only; a changed copy
    changes the output, so the copy is what was read."""
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=0.3, budget_tokens=64)
    batch = _batch(cfg, layout=layout, block_size=32, dtype=dtype, seed=5, key_copy=True)
    q = _query(batch, 2, seed=6, dtype=dtype)
    _check_against_twin(batch, q, cfg, monkeypatch)
    out, _, _ = _decode(batch, q, cfg, "native", monkeypatch)
    batch.summaries.keys.mul_(0.5)
    changed, _, _ = _decode(batch, q, cfg, "native", monkeypatch)
    long_rows = [seq for seq, n in enumerate(SEQ_LENS) if n >= cfg.cell_size]
    assert all(not torch.equal(out[seq], changed[seq]) for seq in long_rows)
    assert torch.equal(out[0], changed[0])       # one token: no complete cell, nothing read from the copy


@pytest.mark.parametrize("num_kv_heads,group,head_dim,cell_size,code_bits", (
    (1, 1, 64, 16, 8),      # one query head per KV head
    (2, 3, 48, 16, 8),      # an odd group: the vectorized path's three-head pass
    (1, 6, 72, 16, 8),      # six heads: a pass of four and one of two; 72 channels: a masked last chunk
    (2, 2, 36, 16, 8),      # a plane of 18 bytes: the portable path on every CPU
    (1, 4, 64, 32, 4),      # 32-token cells: two 16-token passes per cell with the cell's weights
    (2, 3, 64, 64, 4),      # a cell per 64-token block
    (2, 3, 64, 64, 8),      # and both planes' bounds from one pass over the 64 tokens
    (1, 2, 64, 8, 4),       # 8-token cells: the portable path
    (2, 2, 64, 16, 2),      # 2-bit codes: whole bytes of 4 channels
    (2, 2, 64, 16, 1),
    (1, 2, 128, 16, 8),     # a 64-byte code plane: one token row per vector
    (1, 2, 160, 16, 4),     # an 80-byte plane: gathered code words
    (1, 2, 160, 16, 8),     # and two of them: each plane gathered on its own (both planes at once: up to 64 bytes)
    (1, 20, 64, 16, 4),     # 20 query heads per KV head: past the 16 phases of the vector softmax weights
))
@pytest.mark.parametrize("mode", ("topk", "softmax"))
def test_native_shapes(mode, num_kv_heads, group, head_dim, cell_size, code_bits, monkeypatch):
    cfg = HSRConfig(mode=mode, eps=1e-2, budget_tokens=64, cell_size=cell_size, code_bits=code_bits)
    batch = _batch(cfg, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=64, seed=head_dim)
    _check_against_twin(batch, _query(batch, group, seed=group), cfg, monkeypatch)


@pytest.mark.parametrize("mode", ("softmax", "relu"))
def test_native_tree_spans_past_int64(mode, monkeypatch):
    """fanout**tree_levels far past 2**63 tokens (the config allows it): the levels that no sequence reaches
    hold no node, and a bias that fp32 rounds up compares as the twin's fp32 bounds do."""
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=0.1, budget_tokens=64, fanout=256, tree_levels=8)
    batch = _batch(cfg, seed=12)
    _check_against_twin(batch, _query(batch, 2, seed=13), cfg, monkeypatch)


@pytest.mark.parametrize("eps", (0.0, 1e-3))
def test_native_softmax_budgets(eps, monkeypatch):
    """eps=0 skips nothing (the dense result, certificate 0); a tight eps holds on every head."""
    cfg = HSRConfig(mode="softmax", eps=eps, budget_tokens=64)
    batch = _batch(cfg, seed=7)
    q = _query(batch, 2, seed=8)
    _check_against_twin(batch, q, cfg, monkeypatch)
    if eps == 0:
        out, bound, _ = _decode(batch, q, cfg, "native", monkeypatch)
        assert (bound == 0).all()
        for seq, n in enumerate(SEQ_LENS):
            ref = dense64(q[seq], batch.keys[seq], batch.values[seq], mode="softmax", scale=0.125)
            torch.testing.assert_close(out[seq].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eps", (1e-3, 1e-2))
@pytest.mark.parametrize("fanout,tree_levels", ((4, 2), (16, 3)))
def test_native_softmax_levels_spend_their_share(eps, fanout, tree_levels, monkeypatch):
    """Keys in tight clusters, one per node of the first level above the cells, far apart: the boxes prune
    whole nodes, and what the levels skip leaves the token level less budget. The kernel reads the twin's
    tokens and certifies the same bound (a walk that forgot what its levels spent would skip more)."""
    cfg = HSRConfig(mode="softmax", eps=eps, cell_size=16, fanout=fanout, tree_levels=tree_levels)
    lens, span = (3000, 1700), 16 * fanout
    batch = PagedBatch(lens, 2, 64, 64, cfg, seed=5)
    gen = torch.Generator().manual_seed(5)
    for seq, n in enumerate(lens):
        centres = 4 * torch.randn(-(-n // span), 2, 64, generator=gen)
        batch.keys[seq] = 0.1 * torch.randn(n, 2, 64, generator=gen) + centres.repeat_interleave(span, 0)[:n]
    batch.fill(chunks=(0.9,))
    q = 3 * torch.randn(2, 4, 64, generator=gen)
    _check_against_twin(batch, q, cfg, monkeypatch)
    _, bound, stats = _decode(batch, q, cfg, "native", monkeypatch)
    _, want_bound, want = _decode(batch, q, cfg, "torch", monkeypatch)
    cells = sum(-(-n // 16) for n in lens) * 2
    assert stats.code_cells_read < 0.9 * cells           # the levels pruned
    assert [t.tolist() for t in stats.tokens_read] == [t.tolist() for t in want.tokens_read]
    torch.testing.assert_close(bound, want_bound, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("budget", (32, 100, 1000))
def test_native_topk_long_rows(budget, monkeypatch):
    """Top-k over rows longer than the radix select's 4,096-value switch: every bound selected from (budget 32,
    11-bit digits), candidates from a sampled floor (100: 8-bit digits), and a budget that keeps most of a row."""
    cfg = HSRConfig(mode="topk", budget_tokens=budget, code_bits=4)
    batch = PagedBatch((6000, 4500, 700), 1, 64, 64, cfg, seed=budget)
    batch.fill(chunks=(0.9,))
    gen = torch.Generator().manual_seed(budget)
    q = 3 * torch.randn(3, 2, 64, generator=gen)
    _check_against_twin(batch, q, cfg, monkeypatch)


@pytest.mark.parametrize("mode", ("topk", "softmax", "relu"))
def test_native_overflowing_rows_read_densely(mode, monkeypatch):
    """A capacity the long rows cannot meet: those rows are read whole, exactly as the twin decides."""
    cfg = HSRConfig(mode=mode, eps=1e-2, bias=0.3, budget_tokens=64, max_candidates=100)
    batch = _batch(cfg, seed=11)
    q = _query(batch, 4, seed=3)
    _check_against_twin(batch, q, cfg, monkeypatch)
    _, bound, stats = _decode(batch, q, cfg, "native", monkeypatch)
    assert stats.overflow_rows > 0
    for row, tokens in enumerate(stats.tokens_read):
        seq = row // 2
        if tokens.numel() == SEQ_LENS[seq] and SEQ_LENS[seq] > 100:
            assert torch.equal(tokens, torch.arange(SEQ_LENS[seq]))


def _decode_alone(batch: PagedBatch, q: torch.Tensor, cfg: HSRConfig, rows: list[int], **call):
    """hsr_decode_cpu (a NativeDecoder built for this call alone) over batch's sequences `rows`, scale 0.125."""
    from vllm_hsr.core.paged import flat_view
    layout, summaries = batch.layout, batch.summaries
    return cpu_decode.hsr_decode_cpu(
        q[rows], flat_view(batch.cache), layout.block_stride, layout.head_stride, layout.key_offsets,
        layout.value_offsets, batch.block_table[rows], torch.tensor(batch.seq_lens)[rows], summaries.boxes,
        [first for first, _ in summaries.slots], summaries.codes, scale=0.125, **call,
        **native_settings(cfg, q.shape[-1]))


def test_native_writes_every_output_element():
    """A NaN-poisoned output buffer comes back finite: every (sequence, head, channel) is written."""
    cfg = HSRConfig(mode="topk", budget_tokens=64)
    batch = _batch(cfg, seed=2)
    q = _query(batch, 2, seed=5)
    out = torch.full(q.shape, torch.nan)
    from vllm_hsr.core.paged import flat_view
    from vllm_hsr.ops import native_decode
    want, _, _, _ = native_decode(q, flat_view(batch.cache), batch.layout, batch.summaries, batch.block_table,
                               torch.tensor(SEQ_LENS), cfg, 0.125)
    _decode_alone(batch, q, cfg, list(range(len(SEQ_LENS))), out=out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ("topk", "softmax"))
def test_rows_reuse_their_threads_buffers(mode, monkeypatch):
    """Each thread hands its rows' freed buffers to the next rows it decodes (kernels/cpu/scratch.h): calls
    with one and two threads, over batches of other shapes in between (other buffer sizes, rows on either
    thread), give each batch bit for bit what its first call gave, and that agrees with the twin."""
    cfg = HSRConfig(mode=mode, eps=1e-2, budget_tokens=64, code_bits=8)
    wide = _batch(cfg, num_kv_heads=2, seed=14)
    narrow = _batch(cfg, num_kv_heads=1, head_dim=48, block_size=32, seed=15)
    batches = [(wide, _query(wide, 3, seed=16)), (narrow, _query(narrow, 2, seed=17))]
    _check_against_twin(*batches[0], cfg, monkeypatch)

    def decode(which: int, rows: list[int], threads: int):
        out, bound, _, found = _decode_alone(*batches[which], cfg, rows, candidates=True, num_threads=threads)
        tokens, counts = found[0], found[1]
        return out, bound, counts, [tokens[r, :n] for r, n in enumerate(counts.tolist())]

    calls = [(0, [0, 1, 2, 3], 1), (1, [3, 2, 1, 0], 2), (0, [3, 1], 2), (1, [2], 1), (0, [0, 1, 2, 3], 2),
             (1, [3, 2, 1, 0], 1), (0, [3, 1], 1)]
    first = {}
    for which, rows, threads in calls:
        got = decode(which, rows, threads)
        expect = first.setdefault((which, tuple(rows)), got)
        for a, b in zip((*got[:3], *got[3]), (*expect[:3], *expect[3])):
            assert torch.equal(a, b), (which, rows, threads)


@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
def test_a_kept_decoder_serves_every_batch_and_writes_in_place(out_dtype, monkeypatch):
    """hsr_decode keeps one compiled-kernel decoder per summaries; reused for batches of other sizes, tables
    and queries, with `out` given (in place, or through a copy where its dtype is not fp32), it returns what
    a decoder built for the call alone returns, and writes every element of `out`."""
    monkeypatch.setenv("HSR_KERNELS", "native")
    from vllm_hsr import ops
    cfg = HSRConfig(mode="topk", budget_tokens=64)
    batch = _batch(cfg, seed=4)
    q = _query(batch, 2, seed=6)
    lens = torch.tensor(SEQ_LENS)
    layout, summaries = batch.layout, batch.summaries
    for rows in ([3, 1], [0, 1, 2, 3], [2]):               # a permuted subset, all, one: the decoder is kept
        table = batch.block_table[rows]
        alone, alone_bound, _, _ = _decode_alone(batch, q, cfg, rows)
        out = torch.full(q[rows].shape, torch.nan, dtype=out_dtype)
        got, bound, stats = hsr_decode(q[rows], batch.cache, layout, summaries, table, lens[rows], cfg, 0.125,
                                       out=out)
        assert got is out and torch.isfinite(out).all()
        torch.testing.assert_close(out, alone.to(out_dtype), atol=0, rtol=0)
        torch.testing.assert_close(bound, alone_bound, atol=0, rtol=0)
        assert stats.dense_keys == sum(SEQ_LENS[r] for r in rows) * 2          # both KV heads of each row
    kept = ops._DECODERS[summaries][2]
    hsr_decode(q, batch.cache, layout, summaries, batch.block_table, lens, cfg, 0.125)
    assert ops._DECODERS[summaries][2] is kept
    hsr_decode(q, batch.cache, layout, summaries, batch.block_table, lens, HSRConfig(mode="topk", budget_tokens=32),
               0.125)
    assert ops._DECODERS[summaries][2] is not kept                         # other settings: built anew


def _decode_built_with(flags, batch, q, cfg, monkeypatch, tmp_path):
    """The native decode from a second build of the library with extra compiler flags."""
    monkeypatch.setenv("HSR_CXXFLAGS", flags)
    monkeypatch.setenv("HSR_BUILD_DIR", str(tmp_path))
    cpu_build.library.cache_clear()
    try:
        out = _decode(batch, q, cfg, "native", monkeypatch)
    finally:
        cpu_build.library.cache_clear()
    assert list(tmp_path.glob("hsr_cpu-*.so"))               # it really was a second build
    return out


def _cpu_flags() -> set[str]:
    return set(cpu_build.cpu_flags_line().split())


# Where the CPU lacks the instructions a flag turns off, both builds are the same code and cannot differ.
@pytest.mark.skipif("avx512f" not in _cpu_flags(), reason="needs AVX-512: without it both builds are portable")
@pytest.mark.parametrize("settings", [dict(mode="topk", budget_tokens=64), dict(mode="softmax", eps=1e-2)])
def test_portable_build_equals_vectorized(settings, monkeypatch, tmp_path):
    """The library built without AVX-512 (the portable code bounds and selection rules) decodes like the
    default build."""
    cfg = HSRConfig(**settings)
    batch = _batch(cfg, seed=9)
    q = _query(batch, 2, seed=6)
    default = _decode(batch, q, cfg, "native", monkeypatch)
    portable = _decode_built_with("-mno-avx512f", batch, q, cfg, monkeypatch, tmp_path)
    for got, want in zip(portable[2].tokens_read, default[2].tokens_read):
        assert len(set(got.tolist()) ^ set(want.tolist())) <= 2
    torch.testing.assert_close(portable[0], default[0], atol=1e-3, rtol=1e-3)


@pytest.mark.skipif("avx512_vnni" not in _cpu_flags(), reason="needs AVX-512 VNNI: without it both builds are the same")
def test_build_without_vnni_equals_default(monkeypatch, tmp_path):
    """Without AVX-512 VNNI the code dots take vpmaddwd and an add instead of vpdpwssd: the same integers, so
    the same output to the bit."""
    cfg = HSRConfig(mode="topk", budget_tokens=64)
    batch = _batch(cfg, seed=10)
    q = _query(batch, 2, seed=7)
    default = _decode(batch, q, cfg, "native", monkeypatch)
    without = _decode_built_with("-mno-avx512vnni", batch, q, cfg, monkeypatch, tmp_path)
    assert torch.equal(without[0], default[0]) and torch.equal(without[1], default[1])


def test_missing_compiler_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    """No compiler: auto decodes with the torch twin and says why once; asking for native is an error."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("HSR_BUILD_DIR", str(tmp_path))
    cpu_build.library.cache_clear()
    native_unavailable.cache_clear()
    try:
        with pytest.raises(cpu_decode.NativeBuildError, match="no-such-compiler"):
            cpu_decode.library()
        monkeypatch.setenv("HSR_KERNELS", "auto")
        with caplog.at_level(logging.WARNING):
            assert kernel_path(torch.device("cpu")) == "torch"
        assert "compiled CPU kernel is unavailable" in caplog.text
        monkeypatch.setenv("HSR_KERNELS", "native")
        with pytest.raises(cpu_decode.NativeBuildError):
            kernel_path(torch.device("cpu"))
    finally:
        cpu_build.library.cache_clear()
        native_unavailable.cache_clear()


def test_native_rejects_what_it_cannot_read():
    cfg = HSRConfig(mode="topk", budget_tokens=64)
    batch = _batch(cfg, seed=1)
    from vllm_hsr.ops import native_decode
    from vllm_hsr.core.paged import flat_view
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        native_decode(torch.randn(4, 4, 64), flat_view(batch.cache).to(torch.float64), batch.layout,
                      batch.summaries, batch.block_table, torch.tensor(SEQ_LENS), cfg, 0.125)
    with pytest.raises(ValueError, match="multiple"):
        native_decode(torch.randn(4, 3, 64), flat_view(batch.cache), batch.layout, batch.summaries,
                      batch.block_table, torch.tensor(SEQ_LENS), cfg, 0.125)


@pytest.mark.parametrize("kernels", ("native", "torch"))
def test_a_layers_statistics_keep_the_largest_bound(kernels, monkeypatch):
    """bounds=False (as a layer's step statistics ask): the largest of the bounds a full call returns, from the
    kernel's own reduction on the native path (a host float: no tensor of them)."""
    cfg = HSRConfig(mode="softmax", eps=1e-2, code_bits=4)
    batch = _batch(cfg, seed=3)
    q = _query(batch, 2, seed=4)
    monkeypatch.setenv("HSR_KERNELS", kernels)
    args = (q, batch.cache, batch.layout, batch.summaries, batch.block_table, torch.tensor(batch.seq_lens), cfg,
            cfg.resolved_scale(64))
    _, bounds, _ = hsr_decode(*args)
    _, largest, stats = hsr_decode(*args, bounds=False)
    assert stats.error_bound is largest and isinstance(largest, float) == (kernels == "native")
    assert float(largest) == float(bounds.max()) > 0


@pytest.mark.parametrize("kernels", ("native", "torch"))
@pytest.mark.parametrize("poison", (math.nan, math.inf))
@pytest.mark.parametrize("mode", ("softmax", "topk"))
def test_a_non_finite_key_is_never_certified_away(mode, poison, kernels, monkeypatch):
    """A NaN or inf key far from the window (its cell's box and codes become non-finite). Where a head's
    output and certificate come back finite, the dense answer must be finite and within the certificate:
    HSR may not certify away a key whose mass it cannot know. A NaN key makes every head of its KV head
    NaN in dense attention, so none of them may be claimed; the other KV head's rows stay as they were."""
    cfg = HSRConfig(mode=mode, eps=1e-2, budget_tokens=64, code_bits=4)
    batch = PagedBatch([2011], 2, 64, 16, cfg, seed=3)
    batch.keys[0][700, 1, 5] = poison
    batch.fill(chunks=(0.99,))
    q = _query(batch, 2, seed=4)[:1]
    q[0, 2, 5], q[0, 3, 5] = 1.0, -1.0         # inf: a +inf score for head 2, a -inf one (weight 0) for head 3
    out, bound, _ = _decode(batch, q, cfg, kernels, monkeypatch)
    ref = dense64(q[0], batch.keys[0], batch.values[0], mode="softmax", scale=cfg.resolved_scale(64))
    for head in range(4):
        claimed = bool(torch.isfinite(out[0, head]).all() and torch.isfinite(bound[0, head]))
        if head < 2:                           # KV head 0: no poison
            assert claimed, head
        if claimed:
            assert torch.isfinite(ref[head]).all(), (head, out[0, head, :4], bound[0, head])
            allowed = 2 * bound[0, head].double() * batch.values[0][:, head // 2].double().norm(dim=-1).max() + 1e-4
            assert (out[0, head].double() - ref[head]).norm() <= allowed, head
