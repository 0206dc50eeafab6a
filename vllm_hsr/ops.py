"""hsr_decode: the one entry point of HSR paged decode.

Two stages: the cell-tree query (vllm_hsr.core.query, with its bound evaluations in
kernels/tree_query.py or their torch twins) writes each (sequence, KV head)'s reported
tokens and skipped mass; then attention over those candidate lists runs as the Triton
split-K kernel (kernels/sparse_decode.py) or its torch twin (vllm_hsr.core.decode). On the CPU
both stages run as one compiled kernel (kernels/cpu_decode.py), row by row, and cell summaries
are written by another (kernels/cpu_summary.py). Which path:
HSR_KERNELS=auto (default: Triton on CUDA, the compiled kernel on CPU, the torch twin where
it cannot be built), torch, native (CPU only), or triton (on CPU this needs TRITON_INTERPRET=1:
tests only).
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import NamedTuple

import torch

from vllm_hsr import envs
from vllm_hsr.config import HSRConfig
from vllm_hsr.core.attention import HSRStats
from vllm_hsr.core.decode import decode_candidates
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, SummaryWrite, flat_view
from vllm_hsr.core.query import Candidates, RowBounds, TreeQuery, TreeRows, cell_tokens
from vllm_hsr.core.selection import BUDGET_SLACK, HIST_BINS, HIST_RANGE
from vllm_hsr.core.summaries import code_planes, code_slacks, code_weight_range, margin_terms, plane_bytes
from vllm_hsr.kernels import cpu_decode, cpu_summary
from vllm_hsr.log import init_logger

KERNEL_CHOICES = ("auto", "torch", "triton", "native")
logger = init_logger(__name__)


@functools.cache
def native_unavailable() -> str | None:
    """Why the compiled CPU kernels cannot be used here (said once as a warning), or None where they can."""
    try:
        cpu_decode.library()
        cpu_summary.library()
        return None
    except cpu_decode.NativeBuildError as error:
        logger.warning("HSR: the compiled CPU kernel is unavailable, decoding with the torch twin (slower): %s",
                       error)
        return str(error)


def kernel_fallback(device: torch.device) -> str | None:
    """Why `auto` decodes CPU tensors with the torch twin instead of the compiled kernel, or None."""
    if device.type != "cpu" or (envs.get("KERNELS") or "auto") != "auto":
        return None
    return native_unavailable()


def kernel_path(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Which implementation decodes tensors on `device` (of `dtype`, if given): "triton", "native" or "torch".
    auto sends dtypes the compiled kernel does not read (float64) to the torch twin."""
    choice = envs.get("KERNELS") or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"HSR_KERNELS={choice!r} is invalid: allowed values are {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        if device.type == "cuda":
            return "triton"
        native = device.type == "cpu" and (dtype is None or dtype in cpu_decode.DTYPES)
        return "native" if native and native_unavailable() is None else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("HSR_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1")
    if choice == "native":
        if device.type != "cpu":
            raise ValueError(f"HSR_KERNELS=native decodes CPU tensors only, not {device.type}")
        cpu_decode.library()          # raises NativeBuildError with the compiler's message
        cpu_summary.library()
    return choice


def use_triton(device: torch.device) -> bool:
    return kernel_path(device) == "triton"


def code_plane_shape(code_bits: int, head_dim: int) -> dict:
    """plane_bits and plane_bytes of the kernels' code arguments (0 and 0 without codes)."""
    if not code_bits:
        return dict(plane_bits=0, plane_bytes=0)
    return dict(plane_bits=code_planes(code_bits)[0], plane_bytes=plane_bytes(head_dim, code_bits))


def update_summaries(summaries: PagedSummaries, write: SummaryWrite, block_table: torch.Tensor,
                     flat_cache: torch.Tensor, layout: PagedKVLayout) -> None:
    """After a KV write: summarise the cells it filled (read back from the cache) and the union boxes
    it completed. write: the step's SummaryWrite (summaries.plan_write), whose token_rows index
    block_table. The Triton kernels keep boxes in the cache dtype, the CPU kernel in fp32 or bf16; other
    summary dtypes use the torch path. The union boxes above the cells always come from the torch path.
    """
    path = kernel_path(flat_cache.device)
    if path == "native" and summaries.boxes.dtype in cpu_summary.BOX_DTYPES:
        cfg = summaries.cfg
        if write.filled_blocks is not None:
            cpu_summary.summarise_cells_cpu(
                write.filled_blocks, write.filled_offsets, flat_cache, layout.block_stride, layout.head_stride,
                layout.key_offsets, summaries.boxes, summaries.codes, summaries.keys, cell_size=cfg.cell_size,
                code_bits=cfg.code_bits, **code_plane_shape(cfg.code_bits, summaries.head_dim))
        summaries.apply_unions(write, block_table)
        return
    if not (path == "triton" and flat_cache.dtype == summaries.boxes.dtype):
        summaries.apply(write, block_table, flat_cache, layout)
        return
    from vllm_hsr.kernels.summary_update import update_cells, update_union
    cfg = summaries.cfg
    update_cells(write.slot_mapping, write.positions, summaries.boxes, summaries.codes, flat_cache,
                 layout.block_stride, layout.head_stride, layout.key_offsets, cfg.cell_size, cfg.code_bits,
                 code_plane_shape(cfg.code_bits, summaries.head_dim)["plane_bits"])
    summaries.copy_keys(write, flat_cache, layout)
    for level, (nodes, rows) in enumerate(write.levels, start=1):
        update_union(summaries.boxes, nodes, rows, block_table, summaries.span(level - 1),
                     summaries.slots[level - 1][0], summaries.span(level), summaries.slots[level][0], cfg.fanout,
                     summaries.block_size)


class TritonRowBounds(RowBounds):
    """RowBounds evaluated by the kernels of kernels/tree_query.py."""

    def box(self, level, nodes):
        from vllm_hsr.kernels.tree_query import node_box_bounds
        rows, summaries = self.rows, self.rows.summaries
        return node_box_bounds(rows.q, nodes, rows.tables, rows.kv_heads, summaries.boxes, span=summaries.span(level),
                               first_slot=summaries.slots[level][0], block_size=summaries.block_size,
                               scale=rows.scale, **self._margins())

    def code(self, cells, planes=None):
        from vllm_hsr.kernels.tree_query import token_code_bounds
        rows, summaries = self.rows, self.rows.summaries
        bits, size = summaries.cfg.code_bits, summaries.cfg.cell_size
        plane_bits, num_planes = code_planes(bits)
        step_slack, magnitude_slack, abs_slack = code_slacks()
        ub, lb = token_code_bounds(rows.q, cell_tokens(cells, size).flatten(1), rows.tables, rows.kv_heads,
                                   summaries.boxes, summaries.codes, cell_size=size, block_size=summaries.block_size,
                                   bits=bits, plane_bits=plane_bits, planes=num_planes if planes is None else planes,
                                   scale=rows.scale, step_slack=step_slack, magnitude_slack=magnitude_slack,
                                   abs_slack=abs_slack, weight_range=code_weight_range(rows.q.shape[-1], bits),
                                   **self._margins())
        return ub.view(*cells.shape, size, -1), lb.view(*cells.shape, size, -1)

    def _margins(self) -> dict:
        relative, absolute = margin_terms(self.rows.q.shape[-1])
        return dict(margin_rel=relative, margin_abs=absolute)


def query_candidates(q: torch.Tensor, flat_cache: torch.Tensor, layout: PagedKVLayout,
                     summaries: PagedSummaries, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cfg: HSRConfig, scale: float) -> Candidates:
    """The cell-tree query of every (sequence, KV head), bounds from Triton or torch."""
    rows = TreeRows.from_batch(q, summaries, block_table, seq_lens, scale)
    bounds = TritonRowBounds(rows) if use_triton(q.device) else RowBounds(rows)
    return TreeQuery(rows, cfg, bounds, flat_cache, layout, cfg.max_candidates or None).run()


def decode_found(q: torch.Tensor, flat_cache: torch.Tensor, layout: PagedKVLayout, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, found: Candidates, cfg: HSRConfig, scale: float,
                 triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the query's candidate lists: the Triton split-K kernel or its torch twin."""
    if not triton:
        return decode_candidates(q, flat_cache, layout, block_table, seq_lens, found.tokens, found.counts,
                                 found.dense, found.skipped, cfg, scale)
    from vllm_hsr.kernels.sparse_decode import sparse_decode
    return sparse_decode(q, flat_cache, layout.block_stride, layout.head_stride, layout.key_offsets,
                         layout.value_offsets, block_table, seq_lens, found.tokens, found.counts, found.dense,
                         found.skipped, relu=cfg.mode == "relu", alpha=cfg.alpha, bias=cfg.bias, scale=scale)


def native_settings(cfg: HSRConfig, head_dim: int) -> dict:
    """The compiled CPU kernel's keyword arguments for `cfg`: the settings and the numeric constants the
    torch twin uses (margins, code slacks, histogram)."""
    bits = cfg.code_bits
    return dict(mode=cfg.mode, eps=cfg.eps, alpha=cfg.alpha, bias=cfg.bias, budget_tokens=cfg.budget_tokens,
                cell_size=cfg.cell_size, fanout=cfg.fanout, tree_levels=cfg.tree_levels, code_bits=bits,
                **code_plane_shape(bits, head_dim),
                sink_tokens=cfg.sink_tokens, window_tokens=cfg.window_tokens, seed_cells=cfg.seed_cells,
                capacity=cfg.max_candidates, tree_budget_share=cfg.tree_budget_share,
                margins=margin_terms(head_dim), code_slacks=code_slacks(),
                histogram=(HIST_BINS, HIST_RANGE, BUDGET_SLACK),
                code_weight_range=code_weight_range(head_dim, bits) if bits else 0)


class _KeptDecoder(NamedTuple):
    """A summaries' NativeDecoder and what it was built for."""
    cache: torch.Tensor         # the tensor passed (a layer passes the same one every step)
    layout: PagedKVLayout
    decoder: cpu_decode.NativeDecoder
    settings: tuple             # (cfg, scale, head_dim)
    cache_key: tuple            # the cache's data_ptr, dtype, shape and strides


# Each summaries' kept decoder: a layer's decode steps share one
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_key(cache: torch.Tensor) -> tuple:
    return cache.data_ptr(), cache.dtype, cache.shape, cache.stride()


def native_decoder(cache: torch.Tensor, layout: PagedKVLayout, summaries: PagedSummaries, cfg: HSRConfig,
                   scale: float, head_dim: int) -> cpu_decode.NativeDecoder:
    """The compiled kernel's decoder for this cache (the layer's KV cache, or its flat view), layout, summaries
    and settings: built on first use, then kept beside the summaries for as long as they live and nothing else
    changes. (The flat view is taken only then: with caches cold between layers, each torch call of a decode
    step costs several microseconds.)"""
    built, settings = _DECODERS.get(summaries), (cfg, scale, head_dim)
    # the same cache tensor as before is the same memory: its attributes (microseconds each with caches cold
    # between layers) are read only for another tensor
    if (built is not None and built.layout is layout and built.settings == settings
            and (built.cache is cache or built.cache_key == _cache_key(cache))):
        return built.decoder
    decoder = cpu_decode.NativeDecoder(
        flat_view(cache), layout.block_stride, layout.head_stride, layout.key_offsets, layout.value_offsets,
        summaries.boxes, [first for first, _ in summaries.slots], summaries.codes if cfg.code_bits else None,
        summaries.keys, scale=scale, **native_settings(cfg, head_dim))
    _DECODERS[summaries] = _KeptDecoder(cache, layout, decoder, settings, _cache_key(cache))
    return decoder


def native_decode(q: torch.Tensor, cache: torch.Tensor, layout: PagedKVLayout, summaries: PagedSummaries,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, cfg: HSRConfig, scale: float,
                  candidates: bool = False, out: torch.Tensor | None = None, bounds: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | float, dict[str, int], Candidates | None]:
    """Query and attention in the compiled CPU kernel (cache: the layer's KV cache or its flat view). -> out
    [B, Hq, D] fp32 (`out` itself where given), error bound [B, Hq] (bounds=False: its maximum, a float), the
    counters (host ints) and, with candidates=True, the Candidates the query left."""
    decoder = native_decoder(cache, layout, summaries, cfg, scale, q.shape[-1])
    out, bound, counters, found = decoder(q, block_table, seq_lens, out, candidates, bounds=bounds)
    if found is not None:
        batch, num_kv_heads = q.shape[0], summaries.boxes.shape[3]
        tokens, counts, dense, skipped = found
        found = Candidates(tokens.view(batch, num_kv_heads, -1), counts.view(batch, num_kv_heads).to(torch.int32),
                           dense.view(batch, num_kv_heads), skipped, counters)
    return out, bound, counters, found


def hsr_decode(q: torch.Tensor, cache: torch.Tensor, layout: PagedKVLayout, summaries: PagedSummaries,
               block_table: torch.Tensor, seq_lens: torch.Tensor, cfg: HSRConfig, scale: float,
               record_tokens: bool = False, host_stats: bool = True, out: torch.Tensor | None = None,
               path: str | None = None, bounds: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | float, HSRStats]:
    """HSR attention of one decode query per sequence over a paged KV cache.

    q: [batch, num_q_heads, head_dim]; cache: the layer's KV cache (indexed through `layout`);
    block_table: [batch, max_blocks]; seq_lens: [batch] cached tokens, this step's included.
    record_tokens: fill stats.tokens_read (one list per sequence and KV head; a host sync).
    host_stats: False leaves the stats' counters as 0-dim device tensors (no host sync; the compiled CPU
    kernel's are host ints anyway).
    out: where to write the output (shaped like q, in its dtype), or None.
    path: the implementation, as kernel_path(q.device, cache.dtype) gives it (a layer resolves it once), or None
    to resolve it here (HSR_KERNELS is read per call).
    bounds: False keeps only the largest error bound (stats.error_bound: a host float from the compiled kernel, a
    0-dim tensor from the others), which is all a layer's step statistics keep.
    returns out [batch, num_q_heads, head_dim] (q's dtype; `out` where given), error_bound [batch,
    num_q_heads] (its maximum with bounds=False), stats
    """
    path = path or kernel_path(q.device, cache.dtype)
    if path == "native":
        # the kernel writes fp32 rows: straight into `out` where that is what it holds
        direct = out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.shape == q.shape
        result, bound, counters, found = native_decode(q, cache, layout, summaries, block_table, seq_lens, cfg,
                                                       scale, candidates=record_tokens, out=out if direct else None,
                                                       bounds=bounds)
        stats = HSRStats(**counters)
        dense_tokens = counters["dense_keys"]           # each row counts its sequence's tokens
    else:
        direct = False
        flat_cache, num_kv_heads = flat_view(cache), summaries.boxes.shape[3]
        found = query_candidates(q, flat_cache, layout, summaries, block_table, seq_lens, cfg, scale)
        result, bound = decode_found(q, flat_cache, layout, block_table, seq_lens, found, cfg, scale,
                                     path == "triton")
        stats = found.stats(host_stats)
        bound = bound if bounds else bound.max()
        dense_tokens = seq_lens.long().sum() * num_kv_heads
        dense_tokens = int(dense_tokens) if host_stats else dense_tokens
    head_dim = q.shape[-1]
    stats.set_bytes(2 * head_dim * summaries.boxes.element_size(), cfg, head_dim, 2 * cache.element_size(),
                    dense_tokens)
    stats.error_bound = bound
    if record_tokens:
        stats.tokens_read = found.token_lists(seq_lens)
    if direct:
        return out, bound, stats
    if out is None:
        return result.to(q.dtype), bound, stats
    out.copy_(result.view_as(out))
    return out, bound, stats
