"""The HSR backend composed with each dense partner, and the metadata split, without an engine.

FLASH_ATTN and TRITON_ATTN cannot run on this CPU machine, but their classes load: the
composed backend, builder and impl are checked here, and the composed impl's HSR decode
(which calls no partner kernel when every row is sparse) runs over a cache in their page
layout against the float64 dense reference.
"""

import math

import pytest
import torch

from reference import dense64
from vllm_hsr import _vllm
from vllm_hsr import backend as hsr_backend
from vllm_hsr.backend import HSRMetadata, compose, consecutive, dense_partner_name, request_subset
from vllm_hsr.ops import native_unavailable
from vllm_hsr.stats import DecodeStatsLog

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 2, 64, 16


def test_default_partner_on_cpu_is_cpu_attn():
    assert hsr_backend.HSRAttentionBackend.dense_partner == "CPU_ATTN"
    assert issubclass(hsr_backend.HSRAttentionBackend, _vllm.dense_partner("CPU_ATTN")[0])


def test_partner_choice_is_validated():
    assert dense_partner_name({"HSR_DENSE_BACKEND": "TRITON_ATTN"}) == "TRITON_ATTN"
    with pytest.raises(ValueError, match="HSR_DENSE_BACKEND='FLASHINFER' is invalid"):
        dense_partner_name({"HSR_DENSE_BACKEND": "FLASHINFER"})


@pytest.mark.parametrize("partner", tuple(_vllm.DENSE_PARTNERS))
def test_the_backend_declares_what_its_kernels_read(partner):
    """vLLM's selector refuses, with a reason, what HSR's kernels cannot read, even where the partner could."""
    hsr, dense = compose(partner), _vllm.dense_partner(partner)[0]
    assert set(hsr.supported_dtypes) <= {torch.float16, torch.bfloat16, torch.float32}
    assert set(hsr.supported_dtypes) == set(dense.supported_dtypes) & {torch.float16, torch.bfloat16, torch.float32}
    assert hsr.supports_kv_cache_dtype("auto") and not hsr.supports_kv_cache_dtype("fp8")
    assert hsr.get_supported_head_sizes() == dense.get_supported_head_sizes()
    from vllm.platforms.interface import DeviceCapability
    reasons = hsr.validate_configuration(head_size=64, dtype=torch.float64, kv_cache_dtype="fp8_e4m3",
                                         block_size=None, use_mla=False, has_sink=False, use_sparse=False,
                                         use_mm_prefix=False, use_per_head_quant_scales=False,
                                         device_capability=DeviceCapability(9, 0), attn_type="decoder")
    assert "dtype not supported" in reasons and "kv_cache_dtype not supported" in reasons


@pytest.mark.parametrize("partner", tuple(_vllm.DENSE_PARTNERS))
def test_composed_classes_extend_the_partner(partner):
    backend_cls, builder_cls, impl_cls = _vllm.dense_partner(partner)
    hsr = compose(partner)
    assert hsr.get_name() == "HSR" and issubclass(hsr, backend_cls)
    assert issubclass(hsr.get_builder_cls(), builder_cls) and issubclass(hsr.get_impl_cls(), impl_cls)
    # Inherited support would be wrong: HSR's decode does not claim graph capture.
    assert hsr.get_builder_cls().get_cudagraph_support(None, None) == _vllm.AttentionCGSupport.NEVER


def _impl(partner: str, hsr: dict | None = None, **overrides):
    from vllm.config import VllmConfig, set_current_vllm_config
    settings = dict(num_heads=NUM_HEADS, head_size=HEAD_DIM, scale=HEAD_DIM ** -0.5, num_kv_heads=NUM_KV_HEADS,
                    alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None)
    config = VllmConfig()
    config.additional_config = {"hsr": {"mode": "softmax", "eps": 1e-3, "dense_below_tokens": 0, "window_tokens": 16}
                                | (hsr or {})}
    with set_current_vllm_config(config):
        return compose(partner).get_impl_cls()(**(settings | overrides))


@pytest.mark.parametrize("partner", ("FLASH_ATTN", "TRITON_ATTN"))
def test_unmodelled_features_stay_dense(partner):
    assert _impl(partner).hsr_supported and _impl(partner).dense_reason is None
    assert _impl(partner, sliding_window=128).dense_reason == "sliding window"
    assert _impl(partner, logits_soft_cap=30.0).dense_reason == "logit soft-cap"
    assert _impl(partner, alibi_slopes=[1.0] * NUM_HEADS).dense_reason == "ALiBi"
    assert _impl(partner, attn_type="encoder_only").dense_reason == "encoder_only attention"


def test_dense_layers_are_named_once_at_start_up(monkeypatch, caplog):
    """The builder of a KV cache group names each layer HSR leaves dense and why, in one warning, and its
    metadata marks the group's decode rows as dense for that feature (counted in the metrics)."""
    from types import SimpleNamespace
    from vllm_hsr.backend import _HSRBuilder

    class PartnerBuilder:            # stands in for the dense partner's builder
        def __init__(self, *args):
            pass

        def build(self, *args, **kwargs):
            return "partner metadata"

    impls = {"layers.0.attn": SimpleNamespace(dense_reason=None),
             "layers.1.attn": SimpleNamespace(dense_reason="sliding window"),
             "layers.2.attn": SimpleNamespace(dense_reason="sliding window"),
             "layers.3.attn": SimpleNamespace(dense_reason="logit soft-cap")}
    layers = {name: SimpleNamespace(impl=impl) for name, impl in impls.items()}
    monkeypatch.setattr(_vllm, "get_layers_from_vllm_config", lambda config, kind, names: layers)
    builder_cls = type("Builder", (_HSRBuilder, PartnerBuilder), {})
    config = SimpleNamespace(additional_config={"hsr": {"dense_below_tokens": 0}})
    spec = SimpleNamespace(block_size=128)
    with caplog.at_level("WARNING"):
        builder = builder_cls(spec, list(layers), config, "cpu")
    assert builder.min_sparse_tokens == math.inf
    assert builder.dense_feature == "logit soft-cap, sliding window"
    assert ("3 of 4 attention layers use a feature HSR does not handle" in caplog.text
            and "logit soft-cap: layers.3.attn; sliding window: layers.1.attn, layers.2.attn" in caplog.text)
    del layers["layers.1.attn"], layers["layers.2.attn"], layers["layers.3.attn"]
    builder = builder_cls(spec, list(layers), config, "cpu")
    assert builder.min_sparse_tokens == 0 and builder.dense_feature is None
    # the auto threshold follows the cell size the block size gives (64 on 128-token blocks, 16 on 16)
    config.additional_config = {}
    assert builder_cls(spec, list(layers), config, "cpu").min_sparse_tokens == 2800
    assert builder_cls(SimpleNamespace(block_size=16), list(layers), config, "cpu").min_sparse_tokens == 4416
    config.additional_config = {"hsr": {"dense_below_tokens": 0}}
    # A batch carrying state the row split would drop runs dense whole, said once, marked for the metrics.
    import dataclasses
    common = dataclasses.replace(_common([1, 1, 5], [40, 9, 12]), encoder_seq_lens=torch.tensor([3, 4, 5]))
    caplog.clear()
    with caplog.at_level("WARNING"):
        metadata = builder.build(0, common)
        builder.build(0, common)
    assert metadata.sparse_rows.numel() == 0 and metadata.dense_all == "partner metadata"
    assert metadata.dense_feature == "encoder_seq_lens"
    assert caplog.text.count("batches carrying encoder_seq_lens run through the dense backend") == 1
    assert builder.build(0, _common([1, 1, 5], [40, 9, 12])).dense_feature is None
    # the block table goes out cut to the columns the longest sequence uses (1 of 3 at 40 tokens in 128)
    assert metadata.block_table.tolist() == [[0], [3], [6]]
    assert builder_cls(SimpleNamespace(block_size=16), list(layers), config, "cpu").build(
        0, _common([1, 1, 5], [40, 9, 12])).block_table.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_fused_output_quantization_is_refused():
    """vLLM asks for it through output_scale; dropping the scale would hand back unquantized values."""
    impl = _impl("FLASH_ATTN")
    assert not impl.fused_output_quant_supported(None)
    out = torch.zeros(1, NUM_HEADS, HEAD_DIM)
    for scales in (dict(output_scale=torch.ones(1)), dict(output_block_scale=torch.ones(1))):
        with pytest.raises(NotImplementedError, match="fused output quantization"):
            impl.forward(None, out, out, out, None, None, out, **scales)


def test_relu_decode_is_refused_in_the_engine_unless_allowed():
    with pytest.raises(ValueError, match="allow_relu_decode"):
        _impl("FLASH_ATTN", hsr={"mode": "relu"})
    assert _impl("FLASH_ATTN", hsr={"mode": "relu", "allow_relu_decode": True}).hsr.mode == "relu"


@pytest.mark.parametrize("partner", ("FLASH_ATTN", "TRITON_ATTN"))
@pytest.mark.parametrize("sparse_rows", ((0, 1), (1, 0)))
def test_sparse_decode_over_the_partner_page_layout(partner, sparse_rows, monkeypatch):
    """Two decode rows, ragged lengths, shuffled blocks: out equals dense within the certificate. Consecutive
    sparse rows are read and written in place (a slice), others gathered and scattered back."""
    gen = torch.Generator().manual_seed(0)
    seq_lens = [300, 77]
    num_blocks = 1 + sum(-(-n // BLOCK_SIZE) for n in seq_lens)
    # FLASH_ATTN / TRITON_ATTN pages: [blocks, kv heads, block_size, K | V]; vLLM fills them through
    # kv_cache.transpose(1, 2).split(head_size, -1), as here
    kv_cache = torch.full((num_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM), math.nan)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    physical = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(seq_lens), max(-(-n // BLOCK_SIZE) for n in seq_lens), dtype=torch.int32)
    keys, values, slots, positions, rows = [], [], [], [], []
    for row, n in enumerate(seq_lens):
        blocks = [physical.pop() for _ in range(-(-n // BLOCK_SIZE))]
        table[row, :len(blocks)] = torch.tensor(blocks)
        k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        k[n // 3] *= 4                          # a heavy key far from the window
        v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        pos = torch.arange(n)
        slot = table[row].long()[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        key_cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = k         # [blocks, block_size, kv heads, D]
        value_cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = v
        keys.append(k), values.append(v), slots.append(slot), positions.append(pos)
        rows.append(torch.full((n,), row))
    impl = _impl(partner)
    impl.stats_log = DecodeStatsLog()
    q = 6 * torch.randn(len(seq_lens), NUM_HEADS, HEAD_DIM, generator=gen)    # peaked attention: skippable
    # The whole history as one write (the summaries see it), then the decode step itself.
    history = HSRMetadata(num_actual_tokens=0, num_decode_tokens=0, slot_mapping=torch.cat(slots),
                          positions=torch.cat(positions), token_rows=torch.cat(rows), block_table=table,
                          seq_lens=torch.tensor(seq_lens), sparse_rows=torch.zeros(0, dtype=torch.long),
                          dense_rows=torch.zeros(0, dtype=torch.long))
    impl.forward(None, q[:0], None, None, kv_cache, history, torch.empty(0, NUM_HEADS, HEAD_DIM))
    step = HSRMetadata(num_actual_tokens=2, num_decode_tokens=2, slot_mapping=torch.stack([s[-1] for s in slots]),
                       positions=torch.tensor(seq_lens) - 1, token_rows=torch.arange(2), block_table=table,
                       seq_lens=torch.tensor(seq_lens), sparse_rows=torch.tensor(sparse_rows),
                       dense_rows=torch.zeros(0, dtype=torch.long))
    assert (step.sparse_slice is not None) == (sparse_rows == (0, 1))
    assert torch.equal(step.sparse_seq_lens, torch.tensor(seq_lens)[list(sparse_rows)])
    step.summary_write = impl.summaries.plan_write(step.slot_mapping, step.positions, step.token_rows)
    output = torch.full((2, NUM_HEADS, HEAD_DIM), math.nan)
    monkeypatch.setenv("HSR_KERNELS", "torch")        # read when the layer set up its summaries, not per call
    impl.forward(None, q, None, None, kv_cache, step, output)
    assert impl.decode_path == impl.stats_log.kernel == ("native" if native_unavailable() is None else "torch")
    stats = impl.stats_log
    stats.flush()
    assert stats.sparse_rows == 2 and stats.keys_read < stats.dense_keys       # something was skipped
    for row in range(2):
        want = dense64(q[row], keys[row], values[row], mode="softmax", scale=impl.scale)
        # |out - dense| <= 2 * certificate * max |v| (docs/design.md §2)
        tolerance = 2 * stats.max_error_bound * values[row].norm(dim=-1).max() + 1e-5
        assert (output[row].double() - want).norm(dim=-1).max() <= tolerance, row


def test_only_rows_in_order_and_without_gaps_are_a_slice():
    assert consecutive(torch.tensor([3])) == slice(3, 4)
    assert consecutive(torch.tensor([1, 2, 3])) == slice(1, 4)
    assert consecutive(torch.tensor([1, 2, 3], dtype=torch.int32)) == slice(1, 4)
    for rows in ([0, 10, 2], [2, 1, 0], [0, 2, 3], [1, 1, 2]):
        assert consecutive(torch.tensor(rows)) is None, rows


def _common(query_lens, seq_lens, positions=True):
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(query_lens).cumsum(0)
    n = int(starts[-1])
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    pos = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)])
    return _vllm.CommonAttentionMetadata(
        query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=seq, num_reqs=len(query_lens),
        num_actual_tokens=n, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_table_tensor=torch.arange(len(query_lens) * 3).view(-1, 3), slot_mapping=torch.arange(100, 100 + n),
        positions=pos if positions else None, seq_lens_cpu_upper_bound=seq.clone())


def test_request_subset_slices_every_per_request_and_per_token_field():
    common = _common([1, 1, 1, 5, 3], [40, 9, 70, 5, 12])
    part = request_subset(common, torch.tensor([0, 2, 4]))
    assert part.num_reqs == 3 and part.num_actual_tokens == 5 and part.max_query_len == 3 and part.max_seq_len == 70
    assert part.query_start_loc_cpu.tolist() == [0, 1, 2, 5]
    assert part.seq_lens.tolist() == [40, 70, 12] and part.seq_lens_cpu_upper_bound.tolist() == [40, 70, 12]
    assert part.block_table_tensor.tolist() == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
    # tokens: request 0 -> 0, request 2 -> 2, request 4 -> 8, 9, 10
    assert part.slot_mapping.tolist() == [100, 102, 108, 109, 110]
    assert part.positions.tolist() == [39, 69, 9, 10, 11]


def test_positions_are_derived_when_the_runner_gives_none():
    from vllm_hsr.backend import _token_rows_and_positions
    for query_lens, seq_lens in (([1, 1, 4], [10, 3, 8]), ([1, 1], [5, 6])):
        rows, positions = _token_rows_and_positions(_common(query_lens, seq_lens, positions=False))
        want = _common(query_lens, seq_lens).positions
        assert positions.tolist() == want.tolist()
        assert rows.tolist() == torch.repeat_interleave(torch.arange(len(query_lens)),
                                                        torch.tensor(query_lens)).tolist()


@pytest.mark.parametrize("partner", tuple(_vllm.DENSE_PARTNERS))
def test_customize_spec_pads_each_page_for_its_summaries(partner):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
    from vllm_hsr import HSRConfig
    from vllm_hsr.core.paged import page_layout
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM,
                             dtype=torch.bfloat16)
    hsr = compose(partner)
    padded = hsr.customize_spec(spec)
    copy = torch.bfloat16 if partner == "CPU_ATTN" else None     # key_copy=auto: where a key is scattered
    want = page_layout(spec.page_size_bytes, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, HSRConfig(), torch.bfloat16, copy)
    assert padded.page_size_bytes == want.end > spec.page_size_bytes
    assert want.end - want.keys == (BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2 if copy else 0)
    assert hsr.customize_spec(padded) == padded                      # applying it twice changes nothing
    window = SlidingWindowSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM,
                               dtype=torch.bfloat16, sliding_window=128)
    assert hsr.customize_spec(window) == window                      # layers HSR leaves dense


def test_batches_with_features_the_split_drops_stay_whole():
    """A batch carrying per-request state HSR's split would lose (here encoder lengths) is not split."""
    import dataclasses
    from vllm_hsr.backend import _HSRBuilder
    common = _common([1, 1, 5], [40, 9, 12])
    feature = _HSRBuilder.unsplittable_feature
    assert feature(common) is None
    assert feature(dataclasses.replace(common, mm_req_doc_ranges={})) is None
    assert feature(dataclasses.replace(common, encoder_seq_lens=torch.tensor([3, 4, 5]))) == "encoder_seq_lens"
    assert feature(dataclasses.replace(common, causal=torch.ones(3, dtype=torch.bool))) == "causal"
