"""The compiled CPU summary kernel (kernels/cpu_summary.py) against its torch twin, bit for bit."""

import pytest
import torch

from paged_cache import PagedBatch
from vllm_hsr import HSRConfig

SEQ_LENS = (5, 70, 301)


def _filled(cfg: HSRConfig, kernels: str, monkeypatch, *, layout, dtype, summary_dtype, head_dim) -> PagedBatch:
    monkeypatch.setenv("HSR_KERNELS", kernels)
    batch = PagedBatch(SEQ_LENS, 2, head_dim, 32, cfg, layout=layout, seed=3, dtype=dtype,
                       summary_dtype=summary_dtype, key_copy=True)
    if batch.summaries.codes is not None:
        batch.summaries.codes.zero_()
    keys = batch.keys[2]
    keys[:, 0, 5] = 1.5                                     # a flat channel: step 0
    keys[:16, 1, 7] = torch.tensor([3e38, -3e38] * 8)      # a box too wide for its dtype: step inf
    keys[20:40, 0, :3] = torch.tensor(1 + 2.0 ** -10)      # values a bf16 box must round outward
    keys[50, 1, 9] = torch.nan                             # a NaN key spreads to its cell's box, as amin does
    batch.fill(chunks=(0.3, 0.9))                          # prefill chunks, then single tokens
    return batch


@pytest.mark.parametrize("head_dim", (64, 36))
@pytest.mark.parametrize("code_bits", (8, 4, 2, 1, 0))
@pytest.mark.parametrize("layout,dtype,summary_dtype", (
    ("flash", torch.float32, torch.float32), ("cpu", torch.float32, torch.float32),
    ("cpu", torch.bfloat16, torch.bfloat16), ("flash", torch.float32, torch.bfloat16),
    ("flash", torch.float16, torch.float16),              # fp16 boxes: the twin writes them
))
def test_native_summaries_equal_the_twin(layout, dtype, summary_dtype, code_bits, head_dim, monkeypatch):
    cfg = HSRConfig(code_bits=code_bits, fanout=2, tree_levels=2)
    twin, native = (_filled(cfg, kernels, monkeypatch, layout=layout, dtype=dtype, summary_dtype=summary_dtype,
                            head_dim=head_dim) for kernels in ("torch", "native"))
    a, b = twin.summaries, native.summaries
    torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b.keys, a.keys, rtol=0, atol=0, equal_nan=True)   # NaN: never copied
    if code_bits:
        assert torch.equal(b.codes, a.codes)
    assert not b.keys.isnan().all()


def test_bf16_boxes_round_outward(monkeypatch):
    """A bf16 box holds its fp32 keys: lo rounds down and hi up where bf16 cannot hold them."""
    cfg = HSRConfig(code_bits=8)
    batch = _filled(cfg, "native", monkeypatch, layout="flash", dtype=torch.float32, summary_dtype=torch.bfloat16,
                    head_dim=64)
    boxes = batch.summaries.boxes
    for seq, n in enumerate(SEQ_LENS):
        keys = batch.keys[seq]
        for cell in range(n // cfg.cell_size):
            position = cell * cfg.cell_size
            block = int(batch.block_table[seq, position // 32])
            box = boxes[block, (position % 32) // cfg.cell_size].float()      # [2, heads, D]
            cell_keys = keys[position:position + cfg.cell_size].float()      # [T, heads, D]
            finite = cell_keys.isfinite().all(0)
            assert (box[0] <= cell_keys.amin(0))[finite].all() and (box[1] >= cell_keys.amax(0))[finite].all()
