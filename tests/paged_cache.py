"""Test helper: paged KV caches in vLLM's layouts, filled step by step like an engine would."""

from __future__ import annotations

import torch

from vllm_hsr import HSRConfig
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries, flat_view
from vllm_hsr.ops import update_summaries


def make_cache(layout: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               dtype=torch.float32, device="cpu"):
    """NaN-filled cache and its PagedKVLayout.

    "flash": FLASH_ATTN's [2, num_blocks, block_size, num_kv_heads, head_dim];
    "cpu": CPU_ATTN's [num_blocks, num_kv_heads, block_size, 2 * head_dim] page holding K
    transposed ([head_dim, block_size]) and then V ([block_size, head_dim]), as its fp32 kernels do.
    """
    if layout == "flash":
        cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), torch.nan, dtype=dtype, device=device)
        keys, values = cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
    else:
        cache = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_dim), torch.nan, dtype=dtype,
                           device=device)
        page = cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
        keys = page[:, :, 0].view(num_blocks, num_kv_heads, head_dim, block_size).transpose(2, 3)
        values = page[:, :, 1].view(num_blocks, num_kv_heads, block_size, head_dim)
    return cache, keys, values, PagedKVLayout.from_views(cache, keys, values)


class PagedBatch:
    """Sequences stored in a shared paged cache with shuffled block tables (block 0 is the null block).
    The contents come from a CPU generator whatever the device, so a batch on a GPU holds the same values."""

    def __init__(self, seq_lens, num_kv_heads, head_dim, block_size, cfg: HSRConfig, layout="flash",
                 seed=0, dtype=torch.float32, summary_dtype=torch.float32, key_copy=False, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.block_size, self.seq_lens = block_size, list(seq_lens)
        blocks_per_seq = [-(-n // block_size) for n in seq_lens]
        num_blocks = 1 + sum(blocks_per_seq) + 3
        self.cache, self.key_view, self.value_view, self.layout = make_cache(
            layout, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
        physical = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        width = max(blocks_per_seq)
        self.block_table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
        for i, count in enumerate(blocks_per_seq):
            self.block_table[i, :count] = torch.tensor([physical.pop() for _ in range(count)])
        self.block_table = self.block_table.to(device)
        self.summaries = PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, block_size, cfg,
                                                 summary_dtype, device, key_dtype=dtype if key_copy else None)
        # Stale content, as in a recycled block: the first write must reset it.
        self.summaries.boxes.copy_(torch.randn(self.summaries.boxes.shape, generator=gen))
        if key_copy:        # only complete cells are copied, and only they may be read from the copy
            self.summaries.keys.fill_(torch.nan)
        self.keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device, dtype) for n in seq_lens]
        self.values = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device, dtype) for n in seq_lens]

    def write(self, seq: int, start: int, end: int) -> None:
        """Write tokens [start, end) of one sequence, then update summaries, as one engine step."""
        device = self.cache.device
        positions = torch.arange(start, end, device=device)
        row = self.block_table[seq].long()
        slots = row[positions // self.block_size] * self.block_size + positions % self.block_size
        blocks, offsets = slots // self.block_size, slots % self.block_size
        for h in range(self.key_view.shape[1]):
            self.key_view[blocks, h, offsets] = self.keys[seq][start:end, h]
            self.value_view[blocks, h, offsets] = self.values[seq][start:end, h]
        write = self.summaries.plan_write(slots, positions, torch.full((end - start,), seq, device=device))
        update_summaries(self.summaries, write, self.block_table, flat_view(self.cache), self.layout)

    def fill(self, chunks=(0.5,)) -> None:
        """Prefill each sequence in chunks (fractions of its length), then decode the rest token by token."""
        for seq, n in enumerate(self.seq_lens):
            cut = [0] + [int(n * c) for c in chunks]
            for start, end in zip(cut, cut[1:]):
                if end > start:
                    self.write(seq, start, end)
            for pos in range(cut[-1], n):
                self.write(seq, pos, pos + 1)
