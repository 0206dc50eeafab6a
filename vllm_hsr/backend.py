"""HSR attention backend for vLLM: the platform's dense backend, with HSR decode.

The dense partner (CPU_ATTN on CPU; FLASH_ATTN, or TRITON_ATTN with
HSR_DENSE_BACKEND=TRITON_ATTN, on CUDA) writes the KV cache and computes prefill;
decode rows with enough context go through HSR over the same paged cache. Summaries
live in the padding customize_spec adds to every KV page (so vLLM counts them) and are
brought up to date after every KV write, prefill chunks included. Settings:
`--additional-config '{"hsr": {...}}'` and HSR_<FIELD> (vllm_hsr.envs).

The partner is picked when this module loads (vLLM asks for the backend's classes
before any engine config exists), so it is an environment setting only. The classes
below are the partner's own, subclassed: `HSRAttentionBackend` is the partner's
backend with HSR's builder and impl.

CUDA graphs: declared NEVER. The decode is written to be capturable (fixed-width lists
with `max_candidates`, overflow to dense, no data-dependent shapes in the kernels), but
the dense/sparse row split, the per-step stats and the summary update's union step
read values on the host, and none of it has run on a GPU. vLLM then keeps attention
outside its captured graphs (piecewise mode).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict

import torch

from vllm_hsr import _vllm, envs
from vllm_hsr.config import HSRConfig
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, SummaryWrite, flat_view, page_layout, summary_dtype
from vllm_hsr.log import init_logger, warning_once
from vllm_hsr.ops import hsr_decode, kernel_fallback, kernel_path, update_summaries
from vllm_hsr.plugin import BACKEND_NAME
from vllm_hsr.stats import DecodeStatsLog
from vllm_hsr.verify import stale_summaries

logger = init_logger(__name__)

# What HSR's kernels read (any head size: they pad to a power of two); the partner's own lists narrow it.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Quantized caches (fp8 and the like) would leave every layer dense: the kernels read plain floats.
PLAIN_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Partners whose pages hold each (token, KV head)'s K then V as plain rows; CPU_ATTN's
# packing depends on dtype and ISA and is learned through its own cache-write op, and scatters a
# token's key over many cache lines (HSRConfig.key_copy "auto" keeps a copy there).
SPLIT_PAGE_PARTNERS = ("FLASH_ATTN", "TRITON_ATTN")
# CommonAttentionMetadata fields of features HSR's row split does not carry over: a batch
# that sets one runs through the dense partner whole.
UNSPLIT_FIELDS = ("encoder_seq_lens", "dcp_local_seq_lens", "mm_req_doc_ranges", "rswa_prefix_lens",
                  "replayssm_decode_base_cpu", "logits_indices_padded")


def dense_partner_name(environ=os.environ) -> str:
    """HSR_DENSE_BACKEND: auto (CPU_ATTN on CPU, FLASH_ATTN elsewhere) or a DENSE_PARTNERS name."""
    choice = envs.get("DENSE_BACKEND", environ) or "auto"
    if choice == "auto":
        return "CPU_ATTN" if _vllm.current_platform.is_cpu() else "FLASH_ATTN"
    if choice not in _vllm.DENSE_PARTNERS:
        raise ValueError(f"HSR_DENSE_BACKEND={choice!r} is invalid: allowed values are auto, "
                         f"{', '.join(_vllm.DENSE_PARTNERS)}")
    return choice


@dataclasses.dataclass
class HSRMetadata:
    """One step's batch, decode rows first.

    sparse_rows / dense_rows: decode rows (one token each) served by HSR / by the dense kernel;
    dense_decode, prefill: the dense backend's metadata for dense_rows and for the prefill rows;
    dense_all: the dense metadata of the whole batch when no row is sparse (one dense call, as the
    dense backend alone would make; dense_decode and prefill are then None).
    summary_write: the step's SummaryWrite, planned by the first layer and shared by the others.
    dense_feature: why every decode row is dense when a model or batch feature HSR does not handle is the cause
    (counted in the metrics), else None.
    sparse_slice: sparse_rows as a slice where they are consecutive (then the layers read and write those rows
    of query and output in place), else None; sparse_block_table, sparse_seq_lens: the sparse rows' block table
    (int64) and lengths. All three are worked out here, once per step rather than once per layer.
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
    dense_decode: object | None = None
    prefill: object | None = None
    dense_all: object | None = None
    summary_write: SummaryWrite | None = None
    dense_feature: str | None = None
    sparse_slice: slice | None = None
    sparse_block_table: torch.Tensor | None = None
    sparse_seq_lens: torch.Tensor | None = None

    def __post_init__(self):
        rows = self.sparse_rows
        if self.sparse_slice is None and rows.numel() and rows.device.type == "cpu":
            self.sparse_slice = consecutive(rows)
        self.sparse_block_table = self.block_table[self.sparse_rows_index()].long().contiguous()
        self.sparse_seq_lens = self.seq_lens[self.sparse_rows_index()].long().contiguous()

    def sparse_rows_index(self) -> slice | torch.Tensor:
        """The sparse rows, as a slice where they are consecutive (views, not copies)."""
        return self.sparse_slice if self.sparse_slice is not None else self.sparse_rows


def consecutive(rows: torch.Tensor) -> slice | None:
    """rows (host indices, at least one) as a slice if they are first, first + 1, ..., else None."""
    first, count = int(rows[0]), rows.numel()
    in_order = torch.equal(rows, torch.arange(first, first + count, dtype=rows.dtype))
    return slice(first, first + count) if in_order else None


def request_subset(common, rows: torch.Tensor):
    """CommonAttentionMetadata of the requests `rows` (ascending host indices) and their tokens."""
    starts = common.query_start_loc_cpu
    query_lens = (starts[1:] - starts[:-1])[rows]
    new_starts = torch.zeros(rows.numel() + 1, dtype=starts.dtype)
    torch.cumsum(query_lens, 0, out=new_starts[1:])
    tokens = torch.repeat_interleave(starts[rows] - new_starts[:-1], query_lens) + torch.arange(int(new_starts[-1]))
    device = common.query_start_loc.device
    rows_dev, tokens_dev = rows.to(device), tokens.to(device)
    upper = common.seq_lens_cpu_upper_bound
    seq_lens_cpu = upper[rows] if upper is not None else common.seq_lens[rows_dev].cpu()
    pick = lambda value, index: None if value is None else value[index]  # noqa: E731
    return _vllm.CommonAttentionMetadata(
        query_start_loc=new_starts.to(device), query_start_loc_cpu=new_starts, seq_lens=common.seq_lens[rows_dev],
        num_reqs=rows.numel(), num_actual_tokens=tokens.numel(), max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens_cpu.max()), block_table_tensor=common.block_table_tensor[rows_dev],
        slot_mapping=common.slot_mapping[tokens_dev], causal=common.causal,
        positions=pick(common.positions, tokens_dev), is_prefilling=pick(common.is_prefilling, rows_dev),
        seq_lens_cpu_upper_bound=pick(upper, rows))


def _token_rows_and_positions(common) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scheduled token's request row and sequence position, on the metadata's device."""
    n, device, starts = common.num_actual_tokens, common.query_start_loc.device, common.query_start_loc
    if common.max_query_len == 1:     # decode only: token i is request i's last token
        token_rows = torch.arange(n, device=device)
    else:
        token_rows = torch.repeat_interleave(torch.arange(common.num_reqs, device=device), starts[1:] - starts[:-1],
                                             output_size=n)
    if common.positions is not None:
        return token_rows, common.positions[:n]
    # a request's last scheduled token sits at position seq_len - 1
    return token_rows, common.seq_lens[token_rows] - (starts[token_rows + 1] - torch.arange(n, device=device))


def dense_layers_by_feature(layers) -> dict[str, list[str]]:
    """{feature: layer names} of the layers (name -> vLLM Attention layer) whose impl HSR leaves dense."""
    dense = defaultdict(list)
    for name, layer in layers.items():
        feature = getattr(layer.impl, "dense_reason", "not an HSR layer")
        if feature is not None:
            dense[feature].append(name)
    return dict(dense)


class _HSRBuilder:
    """HSR's part of the metadata builder; composed in front of the partner's builder."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decode rows first, so the batch splits into [decodes | prefills] (after the partner's
        # __init__, which may set its own threshold).
        self.reorder_batch_threshold = 1
        self.block_size = kv_cache_spec.block_size
        self.hsr = HSRConfig.from_vllm(vllm_config.additional_config, block_size=self.block_size)
        layers = _vllm.get_layers_from_vllm_config(vllm_config, _vllm.Attention, layer_names)
        dense_layers = dense_layers_by_feature(layers)
        # One metadata serves the whole group: if any layer cannot use HSR, every decode row is dense.
        self.min_sparse_tokens = math.inf if dense_layers else self.hsr.min_sparse_tokens()
        self.dense_feature = ", ".join(sorted(dense_layers)) or None
        if dense_layers:
            logger.warning("HSR: %d of %d attention layers use a feature HSR does not handle, so every decode row of "
                           "their KV cache group is read densely: %s", sum(map(len, dense_layers.values())),
                           len(layers),
                           "; ".join(f"{reason}: {', '.join(names)}" for reason, names in sorted(dense_layers.items())))

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        return _vllm.AttentionCGSupport.NEVER     # see the module docstring

    @staticmethod
    def unsplittable_feature(common) -> str | None:
        """The batch feature HSR's row split would drop (a CommonAttentionMetadata field), or None."""
        def is_set(value) -> bool:
            return value is not None and not (isinstance(value, (dict, list, tuple)) and not value)
        if not isinstance(common.causal, bool):
            return "causal"
        return next((name for name in UNSPLIT_FIELDS if is_set(getattr(common, name, None))), None)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> HSRMetadata:
        common = common_attn_metadata
        n = common.num_actual_tokens
        if common.max_query_len == 1:     # decode only
            num_decodes, num_prefills, num_decode_tokens = common.num_reqs, 0, n
        else:
            num_decodes, num_prefills, num_decode_tokens, _ = _vllm.split_decodes_and_prefills(
                common, decode_threshold=1)
        token_rows, positions = _token_rows_and_positions(common)
        # no decode row long enough (or a batch the split cannot carry): skip the split, every decode row is dense
        sparse_rows, dense_rows = torch.zeros(0, dtype=torch.long), torch.arange(num_decodes)
        dense_feature = self.dense_feature
        if common.max_seq_len >= self.min_sparse_tokens:
            dense_feature = self.unsplittable_feature(common)
            if dense_feature is not None:
                warning_once(logger, "HSR: batches carrying %s run through the dense backend whole (HSR's row "
                             "split does not carry it); counted in vllm_hsr_feature_dense_rows", dense_feature)
            else:
                long_enough = common.seq_lens[:num_decodes].cpu() >= self.min_sparse_tokens
                sparse_rows = torch.nonzero(long_enough).flatten()
                dense_rows = torch.nonzero(~long_enough).flatten()
        metadata = HSRMetadata(
            num_actual_tokens=n, num_decode_tokens=num_decode_tokens,
            slot_mapping=common.slot_mapping[:n], positions=positions, token_rows=token_rows,
            # only the columns the batch's longest sequence uses: the table is max_model_len wide, and lists that
            # keep their full width (off the CPU) are as long as the table addresses
            block_table=common.block_table_tensor[:, :-(-common.max_seq_len // self.block_size)],
            seq_lens=common.seq_lens,
            sparse_rows=sparse_rows.to(common.seq_lens.device), dense_rows=dense_rows.to(common.seq_lens.device),
            dense_feature=dense_feature, sparse_slice=consecutive(sparse_rows) if sparse_rows.numel() else None)
        if not sparse_rows.numel():
            metadata.dense_all = super().build(common_prefix_len, common, fast_build)
            return metadata
        if dense_rows.numel():
            metadata.dense_decode = super().build(0, request_subset(common, dense_rows))
        if num_prefills:
            metadata.prefill = super().build(0, request_subset(common, torch.arange(num_decodes, common.num_reqs)))
        return metadata


def learn_layout(write_kv, kv_cache: torch.Tensor, head_dim: int) -> PagedKVLayout:
    """Find where the dense backend's cache-write op puts each (token, channel) of K and V in a
    page of `kv_cache` [num_blocks, num_kv_heads, block_size, 2 * head_dim] (padding included).

    Writes one scratch page, strided like kv_cache's, once per bit of an element id (values 0
    and 1 are exact in every float dtype) and reads the ids back, so packed layouts (e.g. AMX's
    VNNI tiles) are learned as well as plain strided ones.
    """
    _, num_kv_heads, block_size, _ = kv_cache.shape
    dtype, device, strides = kv_cache.dtype, kv_cache.device, kv_cache.stride()
    count = block_size * head_dim
    ids = torch.arange(1, 2 * count + 1, device=device).view(2, block_size, 1, head_dim)
    ids = ids.expand(-1, -1, num_kv_heads, -1)
    page = torch.zeros(strides[0], dtype=dtype, device=device)
    scratch = page.as_strided((1, *kv_cache.shape[1:]), strides)
    found = torch.zeros(page.numel(), dtype=torch.long, device=device)
    slots = torch.arange(block_size, device=device)
    for bit in range(int(2 * count).bit_length()):
        page.zero_()
        bits = ((ids >> bit) & 1).to(dtype)
        write_kv(bits[0].contiguous(), bits[1].contiguous(), scratch, slots)
        found |= (page != 0).long() << bit
    found = found.cpu()
    heads_end = num_kv_heads * strides[1]
    per_head = found[:heads_end].view(num_kv_heads, -1)
    if not torch.equal(per_head, per_head[:1].expand_as(per_head)) or found[heads_end:].any():
        raise RuntimeError("HSR: the KV cache layout differs between KV heads or spills into the page padding; "
                           "cannot index it")
    where = torch.full((2 * count + 1,), -1, dtype=torch.long)
    where[per_head[0]] = torch.arange(per_head.shape[1])
    if (where[1:] < 0).any():
        raise RuntimeError("HSR: could not locate every key/value element of the KV cache layout")
    offsets = where[1:].view(2, block_size, head_dim).to(device)
    return PagedKVLayout(strides[0], strides[1], offsets[0], offsets[1])


def split_page_layout(kv_cache: torch.Tensor, head_dim: int) -> PagedKVLayout:
    """The layout of [num_blocks, num_kv_heads, block_size, 2 * head_dim] pages holding K then V
    per row, as FLASH_ATTN and TRITON_ATTN split them."""
    keys, values = kv_cache.split(head_dim, dim=-1)
    return PagedKVLayout.from_views(kv_cache, keys, values)


class _HSRImpl:
    """HSR's part of the attention impl; composed in front of the partner's impl."""

    learned_layout = True     # set per partner by compose()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vllm_config = _vllm.get_current_vllm_config()
        # checked now, on the configured block size; the cell size then follows the cache's own block size,
        # known at the first forward (_index)
        self.additional_config = vllm_config.additional_config
        configured = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
        self.hsr = HSRConfig.from_vllm(self.additional_config, block_size=configured)
        self.summaries: PagedSummaries | None = None
        self.layout: PagedKVLayout | None = None
        self.decode_path: str | None = None       # kernel_path of the cache, resolved with the summaries
        self.indexed_cache: torch.Tensor | None = None   # the cache they were last checked against
        self.hsr.check_engine_use()
        self.verify_summaries = envs.get("VERIFY_SUMMARIES") == "1"
        self.stats_log = DecodeStatsLog.shared()
        self.dense_reason = self._dense_reason()     # the builder warns once, naming the layers

    def _dense_reason(self) -> str | None:
        """The feature of this layer HSR does not model (it then stays fully dense), or None. Partners spell
        "none" differently (CPU_ATTN: None or -1; FLASH_ATTN/TRITON_ATTN: (-1, -1), soft-cap 0)."""
        if self.attn_type != _vllm.AttentionType.DECODER:
            return f"{self.attn_type} attention"
        if getattr(self, "sliding_window", None) not in (None, -1, (-1, -1)):
            return "sliding window"
        if getattr(self, "alibi_slopes", None) is not None:
            return "ALiBi"
        if getattr(self, "logits_soft_cap", None):
            return "logit soft-cap"
        if getattr(self, "sinks", None) is not None:
            return "attention sinks"
        if _vllm.is_quantized_kv_cache(getattr(self, "kv_cache_dtype", "auto")):
            return f"quantized KV cache ({self.kv_cache_dtype})"
        return None

    @property
    def hsr_supported(self) -> bool:
        return self.dense_reason is None

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False      # so vLLM's fusion pass never asks (forward refuses it too)

    def _index(self, layer, kv_cache: torch.Tensor) -> PagedSummaries:
        """This layer's summaries, set up on first use: in the padding customize_spec added to every
        KV page (memory vLLM counts), or beside the cache where the pages have no room for them."""
        if kv_cache is self.indexed_cache:      # every step after the first (the same tensor object)
            return self.summaries
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        if self.summaries is None or self.summaries.boxes.shape[0] != num_blocks:
            self.hsr = HSRConfig.from_vllm(self.additional_config, block_size=block_size)
            # once per layer, not per call: with caches cold between layers the lookup costs ~50 us
            self.decode_path = kernel_path(kv_cache.device, kv_cache.dtype)
            self.stats_log.set_kernel(self.decode_path, kernel_fallback(kv_cache.device))
            head_dim = self.head_size
            if self.learned_layout:
                self.layout = learn_layout(
                    lambda k, v, cache, slots: self.do_kv_cache_update(layer, k, v, cache, slots), kv_cache, head_dim)
            else:
                self.layout = split_page_layout(kv_cache, head_dim)
            dtype = summary_dtype(self.hsr, kv_cache.dtype)
            copy_keys = self.hsr.copies_keys(partner_scatters_keys=self.learned_layout)
            self.summaries = PagedSummaries.in_pages(kv_cache, kv_cache[0].numel() * kv_cache.element_size(),
                                                     head_dim, self.hsr, dtype, copy_keys)
            if self.summaries is None:
                logger.warning_once("HSR: the KV pages have no room for the summaries (settings differ from those "
                                    "the cache was sized with?); they are allocated beside the cache, outside "
                                    "vLLM's memory accounting")
                self.summaries = PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, block_size, self.hsr,
                                                         dtype, kv_cache.device,
                                                         key_dtype=kv_cache.dtype if copy_keys else None)
        self.indexed_cache = kv_cache
        return self.summaries

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [num_tokens, num_heads, head_size]; key, value [num_tokens, num_kv_heads, head_size];
        kv_cache [num_blocks, num_kv_heads, block_size, 2 * head_size] (already written this step);
        output [num_tokens, num_heads, head_size], filled in place.
        output_scale, output_block_scale: fused output quantization, which HSR does not do (refused, as
        vLLM's own backends refuse it, rather than returning unquantized values).
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the HSR backend")
        if attn_metadata is None:  # warm-up
            return output
        m: HSRMetadata = attn_metadata
        n, num_decode = m.num_actual_tokens, m.num_decode_tokens
        if self.hsr_supported:
            summaries = self._index(layer, kv_cache)
            if m.summary_write is None:
                m.summary_write = summaries.plan_write(m.slot_mapping, m.positions, m.token_rows)
            if m.summary_write.filled_blocks is not None:     # most decode steps fill no cell
                update_summaries(summaries, m.summary_write, m.block_table, flat_view(kv_cache), self.layout)
            if self.verify_summaries:
                stale = stale_summaries(summaries, m.block_table, m.seq_lens, flat_view(kv_cache), self.layout)
                if stale:
                    raise RuntimeError(f"HSR: {len(stale)} summaries differ from the KV cache they summarise: "
                                       + "; ".join(stale[:8]))
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
            rows = m.sparse_rows_index()
            # consecutive rows: written in place (a view of output), else gathered and scattered back; every row
            # of query and output (a decode-only step): no view to take (with caches cold between layers, each
            # torch call costs tens of microseconds)
            whole = m.sparse_slice == slice(0, query.shape[0]) and output.shape[0] == query.shape[0]
            q = query if whole else query[rows]
            target = output if whole else output[rows] if m.sparse_slice is not None else None
            out, _, stats = hsr_decode(q, kv_cache, self.layout, self.summaries, m.sparse_block_table,
                                       m.sparse_seq_lens, self.hsr, self.scale, host_stats=False, out=target,
                                       path=self.decode_path, bounds=False)
            if target is None:
                output[rows] = out.view_as(output[rows])
        if num_decode:
            self.stats_log.record(stats, num_sparse_rows=m.sparse_rows.numel(), num_dense_rows=m.dense_rows.numel(),
                                  dense_feature=m.dense_feature)
        return output


class _HSRBackend:
    """HSR's part of the backend class; composed in front of the partner's backend. compose() narrows the
    partner's supported dtypes and KV-cache dtypes to those HSR's kernels read, so vLLM's selector refuses
    the rest with a reason (head sizes: any the partner takes)."""

    @classmethod
    def customize_spec(cls, spec):
        """The partner's spec with each KV page padded to hold its summaries (see core.paged.page_layout),
        so vLLM counts them when it sizes the cache. Settings come from the engine's config when one
        is current; a layer that ends up needing more falls back to side tensors (and says so)."""
        spec = super().customize_spec(spec)
        if type(spec) is not _vllm.FullAttentionSpec or spec.state_content_bytes is not None:
            return spec        # sliding window, packed or quantized pages: HSR leaves those layers dense
        config = _vllm.get_current_vllm_config_or_none()
        hsr = HSRConfig.from_vllm(config.additional_config if config is not None else None,
                                  block_size=spec.block_size)
        # from the unpadded page, so applying it twice changes nothing
        copy_keys = hsr.copies_keys(partner_scatters_keys=cls.dense_partner not in SPLIT_PAGE_PARTNERS)
        layout = page_layout(spec.unpadded_page_size_bytes, spec.block_size, spec.num_kv_heads, spec.head_size, hsr,
                             summary_dtype(hsr, spec.dtype), spec.dtype if copy_keys else None)
        return dataclasses.replace(spec, page_size_padded=layout.end)


def compose(partner: str) -> type:
    """The HSR backend over dense partner `partner` (a DENSE_PARTNERS name): its backend class,
    whose get_builder_cls / get_impl_cls give the partner's builder and impl with HSR's parts."""
    backend, builder, impl = _vllm.dense_partner(partner)
    module = {"__module__": __name__}
    builder_cls = type("HSRMetadataBuilder", (_HSRBuilder, builder), dict(module))
    impl_cls = type("HSRAttentionImpl", (_HSRImpl, impl),
                    dict(module, learned_layout=partner not in SPLIT_PAGE_PARTNERS))
    return type("HSRAttentionBackend", (_HSRBackend, backend), dict(
        module,
        supported_dtypes=[dtype for dtype in backend.supported_dtypes if dtype in KERNEL_DTYPES],
        supported_kv_cache_dtypes=[dtype for dtype in backend.supported_kv_cache_dtypes
                                   if dtype in PLAIN_KV_CACHE_DTYPES],
        __doc__=f"Registered as {BACKEND_NAME} (and CUSTOM): {partner}'s KV-cache layout, prefill and "
                        "KV writes, HSR decode, summaries in the KV pages.",
        dense_partner=partner,
        get_name=staticmethod(lambda: BACKEND_NAME),
        get_builder_cls=staticmethod(lambda: builder_cls),
        get_impl_cls=staticmethod(lambda: impl_cls)))


HSRAttentionBackend = compose(dense_partner_name())
HSRMetadataBuilder = HSRAttentionBackend.get_builder_cls()
HSRAttentionImpl = HSRAttentionBackend.get_impl_cls()
