"""HSR attention backend for vLLM: the platform's dense backend, with HSR decode.

The dense impl (CPU_ATTN here) writes the KV cache and computes prefill; decode rows
with enough context go through HSR over the same paged cache. Summaries live beside
each layer's cache and are brought up to date after every KV write, prefill chunks
included. Settings: `--additional-config '{"hsr": {...}}'` and VLLM_HSR_<FIELD>.

CUDA graphs: not supported yet (the torch decode path syncs with the host);
the builder declares so through the dense builder it extends.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_hsr import _vllm
from vllm_hsr.config import HSRConfig
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, SummaryWrite, flat_view
from vllm_hsr.core.paged import summary_dtype
from vllm_hsr.ops import hsr_decode, update_summaries
from vllm_hsr.plugin import BACKEND_NAME
from vllm_hsr.stats import DecodeStatsLog

logger = _vllm.init_logger(__name__)


@dataclasses.dataclass
class HSRMetadata:
    """One step's batch, decode rows first.

    sparse_rows / dense_rows: decode rows (one token each) served by HSR / by the dense kernel;
    dense_decode, prefill: the dense backend's metadata for dense_rows and for the prefill rows;
    dense_all: the dense metadata of the whole batch when no row is sparse (one dense call, as the
    dense backend alone would make; dense_decode and prefill are then None).
    summary_write: the step's SummaryWrite, planned by the first layer and shared by the others.
    """

    num_actual_tokens: int
    num_decode_tokens: int
    slot_mapping: torch.Tensor        # [num_tokens]
    positions: torch.Tensor           # [num_tokens] sequence position of each token
    token_rows: torch.Tensor          # [num_tokens] request index of each token
    block_table: torch.Tensor         # [num_reqs, max_blocks]
    seq_lens: torch.Tensor            # [num_reqs]
    sparse_rows: torch.Tensor
    dense_rows: torch.Tensor
    dense_decode: object | None
    prefill: object | None
    dense_all: object | None = None
    summary_write: SummaryWrite | None = None


def _subset(common, rows: torch.Tensor):
    """CommonAttentionMetadata of decode rows `rows` (each one query token)."""
    n = rows.numel()
    start = torch.arange(n + 1, dtype=common.query_start_loc.dtype)
    seq_lens = common.seq_lens[rows]
    return dataclasses.replace(
        common, query_start_loc=start, query_start_loc_cpu=start, seq_lens=seq_lens, num_reqs=n,
        num_actual_tokens=n, max_query_len=1, max_seq_len=int(seq_lens.max()),
        block_table_tensor=common.block_table_tensor[rows], slot_mapping=common.slot_mapping[rows],
        positions=None, is_prefilling=None)


def _tail(common, first_row: int, first_token: int):
    """CommonAttentionMetadata of rows [first_row, num_reqs) (the prefill rows)."""
    start = common.query_start_loc[first_row:] - first_token
    start_cpu = common.query_start_loc_cpu[first_row:] - first_token
    seq_lens = common.seq_lens[first_row:]
    return dataclasses.replace(
        common, query_start_loc=start, query_start_loc_cpu=start_cpu, seq_lens=seq_lens,
        num_reqs=common.num_reqs - first_row, num_actual_tokens=common.num_actual_tokens - first_token,
        max_seq_len=int(seq_lens.max()), block_table_tensor=common.block_table_tensor[first_row:],
        slot_mapping=common.slot_mapping[first_token:common.num_actual_tokens],
        positions=None if common.positions is None else common.positions[first_token:common.num_actual_tokens],
        is_prefilling=None if common.is_prefilling is None else common.is_prefilling[first_row:])


def _token_rows_and_positions(common) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scheduled token's request row and sequence position, on the metadata's device."""
    n, device = common.num_actual_tokens, common.query_start_loc.device
    query_lens = common.query_start_loc[1:] - common.query_start_loc[:-1]
    if common.max_query_len == 1:     # decode only: token i is request i's last token
        token_rows = torch.arange(n, device=device)
    else:
        token_rows = torch.repeat_interleave(torch.arange(common.num_reqs, device=device), query_lens,
                                             output_size=n)
    if common.positions is not None:
        return token_rows, common.positions[:n]
    offset = torch.arange(n, device=device) - common.query_start_loc[token_rows]
    return token_rows, (common.seq_lens - query_lens)[token_rows] + offset


class HSRMetadataBuilder(_vllm.CPUAttentionMetadataBuilder):
    # Decode rows first, so the batch splits into [decodes | prefills].
    reorder_batch_threshold = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.hsr = HSRConfig.from_vllm(vllm_config.additional_config)
        layers = _vllm.get_layers_from_vllm_config(vllm_config, _vllm.Attention, layer_names)
        # One metadata serves the whole group: if any layer cannot use HSR, every decode row is dense.
        self.min_sparse_tokens = self.hsr.dense_below_tokens if all(
            getattr(layer.impl, "hsr_supported", False) for layer in layers.values()) else math.inf

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> HSRMetadata:
        common = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = _vllm.split_decodes_and_prefills(
            common, decode_threshold=1)
        n = common.num_actual_tokens
        token_rows, positions = _token_rows_and_positions(common)
        if common.max_seq_len < self.min_sparse_tokens:     # no decode row is long enough: skip the split
            sparse_rows = dense_rows = torch.zeros(0, dtype=torch.long)
        else:
            long_enough = common.seq_lens[:num_decodes].cpu() >= self.min_sparse_tokens
            sparse_rows = torch.nonzero(long_enough).flatten()
            dense_rows = torch.nonzero(~long_enough).flatten()
        metadata = HSRMetadata(
            num_actual_tokens=n, num_decode_tokens=num_decode_tokens,
            slot_mapping=common.slot_mapping[:n], positions=positions, token_rows=token_rows,
            block_table=common.block_table_tensor, seq_lens=common.seq_lens,
            sparse_rows=sparse_rows, dense_rows=dense_rows, dense_decode=None, prefill=None)
        if not sparse_rows.numel():
            metadata.dense_all = super().build(common_prefix_len, common, fast_build)
        else:
            if dense_rows.numel():
                metadata.dense_decode = super().build(0, _subset(common, dense_rows))
            if num_prefills:
                metadata.prefill = super().build(0, _tail(common, num_decodes, num_decode_tokens))
        return metadata


class HSRAttentionBackend(_vllm.CPUAttentionBackend):
    """Registered as HSR (and CUSTOM); CPU_ATTN's KV-cache layout, prefill and KV writes."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_builder_cls():
        return HSRMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return HSRAttentionImpl


def learn_layout(write_kv, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype) -> PagedKVLayout:
    """Find where the dense backend's cache-write op puts each (token, channel) of K and V.

    Writes one scratch block once per bit of an element id (values 0 and 1 are exact in
    every float dtype) and reads the ids back, so packed layouts (e.g. AMX's VNNI tiles)
    are learned as well as plain strided ones.
    """
    count = block_size * head_dim
    ids = torch.arange(1, 2 * count + 1).view(2, block_size, 1, head_dim).expand(-1, -1, num_kv_heads, -1)
    scratch = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    found = torch.zeros(scratch.numel(), dtype=torch.long)
    slots = torch.arange(block_size)
    for bit in range(int(2 * count).bit_length()):
        scratch.zero_()
        bits = ((ids >> bit) & 1).to(dtype)
        write_kv(bits[0].contiguous(), bits[1].contiguous(), scratch, slots)
        found |= (scratch.flatten() != 0).long() << bit
    per_head = found.view(num_kv_heads, -1)
    if not torch.equal(per_head, per_head[:1].expand_as(per_head)):
        raise RuntimeError("HSR: the KV cache layout differs between KV heads; cannot index it")
    where = torch.full((2 * count + 1,), -1, dtype=torch.long)
    where[per_head[0]] = torch.arange(per_head.shape[1])
    if (where[1:] < 0).any():
        raise RuntimeError("HSR: could not locate every key/value element of the KV cache layout")
    offsets = where[1:].view(2, block_size, head_dim)
    return PagedKVLayout(scratch.stride(0), scratch.stride(1), offsets[0], offsets[1])


class HSRAttentionImpl(_vllm.CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vllm_config = _vllm.get_current_vllm_config()
        self.hsr = HSRConfig.from_vllm(vllm_config.additional_config)
        self.summaries: PagedSummaries | None = None
        self.layout: PagedKVLayout | None = None
        self.stats_log = DecodeStatsLog.shared()
        # Features HSR does not model: such a layer stays fully dense.
        self.hsr_supported = (
            self.attn_type == _vllm.AttentionType.DECODER and self.sliding_window in (None, -1)
            and self.alibi_slopes is None and not self.logits_soft_cap and self.sinks is None
            and not self.is_fp8_kv_cache)
        if not self.hsr_supported:
            logger.warning("HSR: a layer uses a feature HSR does not model (sliding window, ALiBi, "
                           "soft-cap, sinks, fp8 KV or encoder attention); it runs dense")

    def _index(self, layer, kv_cache: torch.Tensor) -> PagedSummaries:
        """Summaries beside this layer's cache, allocated on first use (vLLM zeroes only the KV view)."""
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        if self.summaries is None or self.summaries.boxes.shape[0] != num_blocks:
            head_dim = self.head_size
            self.layout = learn_layout(
                lambda k, v, cache, slots: self.do_kv_cache_update(layer, k, v, cache, slots),
                num_kv_heads, block_size, head_dim, kv_cache.dtype)
            self.summaries = PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, block_size, self.hsr,
                                                     summary_dtype(self.hsr, kv_cache.dtype), kv_cache.device)
        return self.summaries

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [num_tokens, num_heads, head_size]; key, value [num_tokens, num_kv_heads, head_size];
        kv_cache [num_blocks, num_kv_heads, block_size, 2 * head_size] (already written this step);
        output [num_tokens, num_heads, head_size], filled in place.
        """
        if attn_metadata is None:  # warm-up
            return output
        m: HSRMetadata = attn_metadata
        n, num_decode = m.num_actual_tokens, m.num_decode_tokens
        if self.hsr_supported:
            summaries = self._index(layer, kv_cache)
            if m.summary_write is None:
                m.summary_write = summaries.plan_write(m.slot_mapping, m.positions, m.token_rows, m.block_table)
            update_summaries(summaries, m.summary_write, m.block_table, flat_view(kv_cache), self.layout)
        if m.dense_all is not None:
            super().forward(layer, query, key, value, kv_cache, m.dense_all, output)
        if m.prefill is not None:
            super().forward(layer, query[num_decode:n], key[num_decode:n], value[num_decode:n], kv_cache,
                            m.prefill, output[num_decode:n])
        if m.dense_decode is not None:
            rows = m.dense_rows
            dense_out = torch.empty_like(output[rows])
            super().forward(layer, query[rows], key[rows], value[rows], kv_cache, m.dense_decode, dense_out)
            output[rows] = dense_out
        stats = None
        if m.sparse_rows.numel():
            rows = m.sparse_rows
            out, _, stats = hsr_decode(query[rows], kv_cache, self.layout, self.summaries, m.block_table[rows],
                                       m.seq_lens[rows], self.hsr, self.scale)
            output[rows] = out.view_as(output[rows])
        if num_decode:
            self.stats_log.record(stats, num_sparse_rows=m.sparse_rows.numel(), num_dense_rows=m.dense_rows.numel())
        return output
