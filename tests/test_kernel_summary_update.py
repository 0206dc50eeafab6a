"""kernels/summary_update.py under TRITON_INTERPRET=1 against its torch twin (PagedSummaries.update)."""

import pytest
import torch

from paged_cache import PagedBatch
from vllm_hsr import HSRConfig
from reference_tree import PagedCellTree


@pytest.mark.parametrize("layout,block_size,cell_size", (("flash", 16, 16), ("cpu", 32, 16), ("flash", 128, 32)))
@pytest.mark.parametrize("fanout,code_bits", ((2, 4), (3, 2), (16, 8), (2, 0)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_kernel_summaries_equal_twin(layout, block_size, cell_size, fanout, code_bits, dtype, monkeypatch):
    cfg = HSRConfig(cell_size=cell_size, fanout=fanout, tree_levels=2, code_bits=code_bits,
                    budget_tokens=max(16, cell_size))
    import vllm_hsr.kernels.summary_update as kernel_module
    launches = []
    original = kernel_module.update_cells
    monkeypatch.setattr(kernel_module, "update_cells", lambda *a, **k: (launches.append(1), original(*a, **k)))
    batches = []
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("HSR_KERNELS", kernels)
        batch = PagedBatch((37, 300), 2, 64, block_size, cfg, layout=layout, dtype=dtype, summary_dtype=dtype)
        batch.fill(chunks=(0.3, 0.6))
        batches.append(batch)
    torch_batch, triton_batch = batches
    assert launches, "the kernel path was not taken"
    assert torch.equal(triton_batch.summaries.boxes, torch_batch.summaries.boxes)
    if code_bits:  # codes exist for complete cells only (the rest of the storage is never written)
        for seq, num_tokens in enumerate(torch_batch.seq_lens):
            row = torch_batch.block_table[seq].long()
            trees = [PagedCellTree(b.summaries, row, num_tokens) for b in batches]
            cells = torch.arange(trees[0].num_coded_cells())
            for head in range(2):
                assert torch.equal(trees[1].codes(cells, head), trees[0].codes(cells, head))
