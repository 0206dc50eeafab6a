"""HSR cell summaries on the CPU (kernels/cpu/summary_update.cpp) and its thin launcher.

Twin: vllm_hsr.core.paged.PagedSummaries._summarise_cells, bit for bit. Built with the other CPU kernels
by kernels/cpu_build.py; one OpenMP task per (cell, KV head).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu_build
from .cpu_build import DTYPES, NativeBuildError

BOX_DTYPES = (torch.float32, torch.bfloat16)                        # what the kernel rounds boxes to

_I, _P = ctypes.c_int64, ctypes.c_void_p


class SummaryArgs(ctypes.Structure):
    """Mirror of SummaryArgs in summary_update.cpp (every field 8 bytes wide, in the same order)."""

    _fields_ = [(name, kind) for kind, names in (
        (_I, "num_cells num_kv_heads head_dim cell_size"), (_P, "blocks first_offsets cache"),
        (_I, "cache_dtype block_stride head_stride"), (_P, "key_offsets boxes"),
        (_I, "box_dtype box_block_stride box_slot_stride box_side_stride box_head_stride"), (_P, "codes"),
        (_I, "code_block_stride code_head_stride code_token_stride code_bits plane_bits plane_bytes"),
        (_P, "key_rows"), (_I, "key_rows_block_stride key_rows_head_stride num_threads"),
    ) for name in names.split()]


def library() -> ctypes.CDLL:
    """The CPU kernels' library with hsr_summarise_cells' signature checked. Raises NativeBuildError."""
    return _checked(cpu_build.library())


@functools.cache
def _checked(lib: ctypes.CDLL) -> ctypes.CDLL:     # once per loaded library, not per call
    if lib.hsr_summary_args_size() != ctypes.sizeof(SummaryArgs):
        raise NativeBuildError("the CPU kernels' library does not match this launcher's SummaryArgs")
    lib.hsr_summarise_cells.argtypes = [ctypes.POINTER(SummaryArgs)]
    lib.hsr_summarise_cells.restype = None
    return lib


def summarise_cells_cpu(blocks: torch.Tensor, first_offsets: torch.Tensor, flat_cache: torch.Tensor,
                        block_stride: int, head_stride: int, key_offsets: torch.Tensor, boxes: torch.Tensor,
                        codes: torch.Tensor | None, key_rows: torch.Tensor | None, *, cell_size: int,
                        code_bits: int, plane_bits: int, plane_bytes: int, num_threads: int | None = None) -> None:
    """Box (level-0 slot first_offsets // cell_size), codes and key copy of the cells starting at in-block
    offsets first_offsets [c] of blocks [c], from their keys in flat_cache (at block * block_stride +
    kv_head * head_stride + key_offsets [block_size, head_dim]).

    boxes: [blocks, slots, 2, kv_heads, head_dim] float32 or bfloat16; codes: [blocks, block_size, kv_heads,
    bytes] uint8 or None; key_rows: [blocks, block_size, kv_heads, head_dim] in the cache dtype or None.
    """
    if boxes.dtype not in BOX_DTYPES or flat_cache.dtype not in DTYPES:
        raise ValueError(f"the CPU summary kernel stores boxes in {BOX_DTYPES} from float caches, not "
                         f"{boxes.dtype} from {flat_cache.dtype}")
    lib = library()
    blocks, first_offsets = blocks.long().contiguous(), first_offsets.long().contiguous()
    key_offsets = key_offsets.long().contiguous()
    box_strides = boxes.stride()
    code_strides = codes.stride() if codes is not None else (0, 0, 0, 0)
    row_strides = key_rows.stride() if key_rows is not None else (0, 0, 0, 0)
    args = SummaryArgs(
        num_cells=blocks.numel(), num_kv_heads=boxes.shape[3], head_dim=boxes.shape[4], cell_size=cell_size,
        blocks=blocks.data_ptr(), first_offsets=first_offsets.data_ptr(), cache=flat_cache.data_ptr(),
        cache_dtype=DTYPES[flat_cache.dtype], block_stride=block_stride, head_stride=head_stride,
        key_offsets=key_offsets.data_ptr(), boxes=boxes.data_ptr(), box_dtype=DTYPES[boxes.dtype],
        box_block_stride=box_strides[0], box_slot_stride=box_strides[1], box_side_stride=box_strides[2],
        box_head_stride=box_strides[3], codes=codes.data_ptr() if codes is not None else None,
        code_block_stride=code_strides[0], code_head_stride=code_strides[2], code_token_stride=code_strides[1],
        code_bits=code_bits, plane_bits=plane_bits, plane_bytes=plane_bytes,
        key_rows=key_rows.data_ptr() if key_rows is not None else None, key_rows_block_stride=row_strides[0],
        key_rows_head_stride=row_strides[2], num_threads=num_threads or torch.get_num_threads())
    lib.hsr_summarise_cells(ctypes.byref(args))
