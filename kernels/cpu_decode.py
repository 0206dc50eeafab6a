"""HSR paged decode on the CPU (kernels/cpu/hsr_decode.cpp) and its thin launcher.

Twin: vllm_hsr.core.query.TreeQuery + vllm_hsr.core.decode.decode_candidates. Built with the other CPU
kernels by kernels/cpu_build.py; one OpenMP task per (sequence, KV head) row. On x86 with AVX-512 the
code-bound dots take a vectorized path; every other build takes the portable one.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from . import cpu_build
from .cpu_build import DTYPES, NativeBuildError

# HSRStats' names; dense_keys: the tokens a dense read of the rows would load
COUNTERS = ("keys_read", "cells_read", "summary_nodes_read", "code_cells_read", "refined_cells", "seed_keys_read",
            "overflow_rows", "dense_keys")
MODES = {"relu": 0, "softmax": 1, "topk": 2}

_I, _D, _P = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class HsrArgs(ctypes.Structure):
    """Mirror of HsrArgs in kernels/cpu/decode_args.h (every field 8 bytes wide, in the same order)."""

    _fields_ = [(name, kind) for kind, names in (
        (_I, "batch num_q_heads num_kv_heads head_dim"), (_P, "q block_table"), (_I, "table_width"),
        (_P, "seq_lens cache"), (_I, "cache_dtype block_stride head_stride block_size"),
        (_P, "key_offsets value_offsets boxes"),
        (_I, "box_dtype box_block_stride box_slot_stride box_side_stride box_head_stride"),
        (_P, "level_first_slot codes"),
        (_I, "code_block_stride code_head_stride code_token_stride code_bits plane_bits plane_bytes"),
        (_P, "key_rows"), (_I, "key_rows_block_stride key_rows_head_stride"),
        (_I, "mode alpha budget_tokens cell_size fanout tree_levels sink_tokens window_tokens seed_cells capacity"),
        (_D, "eps bias tree_budget_share scale margin_rel margin_abs step_slack magnitude_slack "
             "abs_slack"),
        (_I, "hist_bins"), (_D, "hist_range budget_slack"), (_I, "code_weight_range"),
        (_P, "out error_bound counters tokens"),
        (_I, "token_capacity"), (_P, "counts dense skipped"), (_I, "num_threads"), (_P, "totals max_error_bound"),
    ) for name in names.split()]


def library() -> ctypes.CDLL:
    """The CPU kernels' library with hsr_decode's signature checked (built once). Raises NativeBuildError."""
    return _checked(cpu_build.library())


@functools.cache
def _checked(lib: ctypes.CDLL) -> ctypes.CDLL:     # once per loaded library, not per call
    if lib.hsr_args_size() != ctypes.sizeof(HsrArgs) or lib.hsr_num_counters() != len(COUNTERS):
        raise NativeBuildError("the CPU kernels' library does not match this launcher's HsrArgs")
    lib.hsr_decode.argtypes = [ctypes.POINTER(HsrArgs)]
    lib.hsr_decode.restype = None
    return lib


def _dtype_code(tensor: torch.Tensor, what: str) -> int:
    if tensor.dtype not in DTYPES:
        raise ValueError(f"the CPU HSR kernel reads {what} in float32, bfloat16 or float16, not {tensor.dtype}")
    return DTYPES[tensor.dtype]


class NativeDecoder:
    """The compiled kernel's decode over one paged cache and its summaries, with fixed settings.

    Everything that stays the same from one decode step to the next (the cache, its layout, the summaries,
    the settings and constants) is checked and packed into HsrArgs once, here; a call fills in only the
    batch's tensors. A vLLM layer calls it every step: building the arguments afresh each time cost about
    as much host time as a tenth of the kernel's own at 7.5K tokens.

    flat_cache: 1-D cache, K and V at block * block_stride + kv_head * head_stride + key_offsets /
    value_offsets [block_size, head_dim]; boxes: [blocks, slots, 2, kv_heads, head_dim] (any strides);
    codes: [blocks, block_size, kv_heads, bytes] uint8 (token stride = bytes) or None with code_bits=0.
    key_rows: [blocks, block_size, kv_heads, head_dim] in the cache dtype (token stride = head_dim), a copy
    of complete cells' keys read in place of the cache's, or None.
    margins: (relative, absolute); code_slacks: (step, magnitude, absolute); histogram: (bins, range, slack);
    code_weight_range: the largest |integer code weight| (core.summaries.code_weight_range).
    """

    def __init__(self, flat_cache: torch.Tensor, block_stride: int, head_stride: int, key_offsets: torch.Tensor,
                 value_offsets: torch.Tensor, boxes: torch.Tensor, level_first_slots: list[int],
                 codes: torch.Tensor | None, key_rows: torch.Tensor | None = None, *, mode: str, eps: float,
                 alpha: int, bias: float, budget_tokens: int, cell_size: int, fanout: int, tree_levels: int,
                 code_bits: int, plane_bits: int, plane_bytes: int, sink_tokens: int, window_tokens: int,
                 seed_cells: int, capacity: int, tree_budget_share: float, scale: float,
                 margins: tuple[float, float], code_slacks: tuple[float, float, float],
                 histogram: tuple[int, float, float], code_weight_range: int):
        self.lib = library()
        self.num_kv_heads = boxes.shape[3]
        if codes is None and code_bits:
            raise ValueError("code_bits > 0 needs the code tensor")
        self.block_size, head_dim = key_offsets.shape
        if key_rows is not None and (key_rows.dtype != flat_cache.dtype or key_rows.stride(3) != 1
                                     or key_rows.stride(1) != head_dim
                                     or tuple(key_rows.shape[1:]) != (self.block_size, self.num_kv_heads, head_dim)):
            raise ValueError("key_rows must be [blocks, block_size, kv_heads, head_dim] rows in the cache dtype")
        # the tensors the arguments point into, kept alive as long as the arguments are
        self.held = (flat_cache, boxes, codes, key_rows, key_offsets.long().contiguous(),
                     value_offsets.long().contiguous(), torch.tensor(level_first_slots, dtype=torch.int64))
        _, _, _, _, key_offsets, value_offsets, first_slots = self.held
        box_strides = boxes.stride()
        code_strides = codes.stride() if codes is not None else (0, 0, 0, 0)
        key_strides = key_rows.stride() if key_rows is not None else (0, 0, 0, 0)
        self.args = HsrArgs(
            num_kv_heads=self.num_kv_heads, head_dim=head_dim, cache=_ptr(flat_cache),
            cache_dtype=_dtype_code(flat_cache, "the KV cache"), block_stride=block_stride, head_stride=head_stride,
            block_size=self.block_size, key_offsets=_ptr(key_offsets), value_offsets=_ptr(value_offsets),
            boxes=_ptr(boxes), box_dtype=_dtype_code(boxes, "boxes"), box_block_stride=box_strides[0],
            box_slot_stride=box_strides[1], box_side_stride=box_strides[2], box_head_stride=box_strides[3],
            level_first_slot=_ptr(first_slots), codes=_ptr(codes), code_block_stride=code_strides[0],
            code_head_stride=code_strides[2], code_token_stride=code_strides[1], key_rows=_ptr(key_rows),
            key_rows_block_stride=key_strides[0], key_rows_head_stride=key_strides[2], code_bits=code_bits,
            plane_bits=plane_bits, plane_bytes=plane_bytes, mode=MODES[mode], alpha=alpha, budget_tokens=budget_tokens,
            cell_size=cell_size, fanout=fanout, tree_levels=tree_levels, sink_tokens=sink_tokens,
            window_tokens=window_tokens, seed_cells=seed_cells, capacity=capacity, eps=eps, bias=bias,
            tree_budget_share=tree_budget_share, scale=scale, margin_rel=margins[0],
            margin_abs=margins[1], step_slack=code_slacks[0], magnitude_slack=code_slacks[1],
            abs_slack=code_slacks[2], hist_bins=histogram[0], hist_range=histogram[1], budget_slack=histogram[2],
            code_weight_range=code_weight_range)
        self.totals = (ctypes.c_int64 * len(COUNTERS))()
        self.args.totals = ctypes.addressof(self.totals)
        self.largest_bound = ctypes.c_double()
        self.args.max_error_bound = ctypes.addressof(self.largest_bound)
        # per-row scratch, grown to the largest batch: the rows' counters, and their bounds where no call asks
        self.counters = torch.empty(0, dtype=torch.int64)
        self.bounds = torch.empty(0, dtype=torch.float32)
        self.lock = threading.Lock()

    def __call__(self, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 out: torch.Tensor | None = None, candidates: bool = False, num_threads: int | None = None,
                 bounds: bool = True):
        """Query and attention of one decode token per sequence, every (sequence, KV head) row at once.

        q: [batch, num_q_heads, head_dim]; block_table: [batch, max_blocks]; seq_lens: [batch]; out: where
        to write the output (contiguous fp32 shaped like q) or None.
        bounds=False: return only the largest error bound, a float (a layer's step statistics keep no more; with
        caches cold between layers, the tensor's allocation costs more than the rest of this call).
        returns out [batch, num_q_heads, head_dim] fp32, error_bound [batch, num_q_heads] fp32 (or its maximum),
        counters {name: int} summed over rows, and with candidates=True (tokens [rows, max_tokens] int64, counts
        [rows], dense [rows] bool, skipped [batch, num_q_heads] fp32) as the query left them
        (rows = batch * kv_heads)
        """
        batch, num_q_heads, head_dim = q.shape
        if num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if head_dim != self.args.head_dim:
            raise ValueError(f"q has head_dim {head_dim}, the cache {self.args.head_dim}")
        rows = batch * self.num_kv_heads
        q32, table, lens = _as(q, torch.float32), _as(block_table, torch.int64), _as(seq_lens, torch.int64)
        if out is None:
            out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float32)
        if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != q.shape:
            raise ValueError("out must be a contiguous float32 tensor shaped like q")
        token_capacity = table.shape[1] * self.block_size
        found = None
        if candidates:
            found = (torch.empty(rows, token_capacity, dtype=torch.int64), torch.empty(rows, dtype=torch.int64),
                     torch.empty(rows, dtype=torch.uint8), torch.empty(batch, num_q_heads, dtype=torch.float32))
        # one call at a time: the argument block, counters and totals are this decoder's, and the kernel runs
        # without the GIL
        with self.lock:
            if self.counters.numel() < rows * len(COUNTERS):
                self.counters = torch.empty(rows * len(COUNTERS), dtype=torch.int64)
            if bounds:
                bound = torch.empty(batch, num_q_heads, dtype=torch.float32)
            elif self.bounds.numel() < batch * num_q_heads:
                self.bounds = torch.empty(batch * num_q_heads, dtype=torch.float32)
            args = self.args
            args.batch, args.num_q_heads, args.q = batch, num_q_heads, q32.data_ptr()
            args.block_table, args.table_width, args.seq_lens = table.data_ptr(), table.shape[1], lens.data_ptr()
            args.out, args.counters = out.data_ptr(), self.counters.data_ptr()
            args.error_bound = bound.data_ptr() if bounds else self.bounds.data_ptr()
            args.token_capacity = token_capacity
            args.tokens, args.counts, args.dense, args.skipped = (_ptr(t) for t in found) if found else (None,) * 4
            args.num_threads = num_threads or torch.get_num_threads()
            self.lib.hsr_decode(ctypes.byref(args))
            totals = dict(zip(COUNTERS, self.totals[:]))
            if not bounds:
                bound = self.largest_bound.value
        if found:
            found = (found[0], found[1], found[2].bool(), found[3])
        return out, bound, totals, found


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, contiguous: t itself where it is (no torch call: with caches cold between layers, each one
    costs several microseconds)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def hsr_decode_cpu(q: torch.Tensor, flat_cache: torch.Tensor, block_stride: int, head_stride: int,
                   key_offsets: torch.Tensor, value_offsets: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, boxes: torch.Tensor, level_first_slots: list[int],
                   codes: torch.Tensor | None, key_rows: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                   candidates: bool = False, num_threads: int | None = None, **settings):
    """One call of a NativeDecoder built for it (arguments as NativeDecoder's and its call's)."""
    decoder = NativeDecoder(flat_cache, block_stride, head_stride, key_offsets, value_offsets, boxes,
                            level_first_slots, codes, key_rows, **settings)
    return decoder(q, block_table, seq_lens, out, candidates, num_threads)
