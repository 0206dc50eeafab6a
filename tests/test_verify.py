"""The stale-summary check (vllm_hsr.verify) finds a skipped write and a write on the wrong block."""

import pytest
import torch

from paged_cache import PagedBatch
from vllm_hsr import HSRConfig
from vllm_hsr.core.paged import flat_view
from vllm_hsr.verify import stale_summaries

SEQ_LENS = (1100, 300, 37)


@pytest.fixture(params=("flash", "cpu"))
def batch(request) -> PagedBatch:
    cfg = HSRConfig(mode="topk", budget_tokens=64, code_bits=8, tree_levels=2, fanout=4)
    batch = PagedBatch(SEQ_LENS, 2, 64, 64, cfg, layout=request.param, seed=1, key_copy=True)
    batch.fill(chunks=(0.3, 0.9))
    return batch


def _stale(batch: PagedBatch) -> list[str]:
    return stale_summaries(batch.summaries, batch.block_table, torch.tensor(batch.seq_lens), flat_view(batch.cache),
                           batch.layout)


def _block(batch: PagedBatch, seq: int, position: int) -> int:
    return int(batch.block_table[seq, position // batch.block_size])


def test_up_to_date_summaries_pass(batch):
    assert _stale(batch) == []


def test_a_skipped_cell_write_is_found(batch):
    """Cell 3 of sequence 1 keeps what its block held before (a write that never happened)."""
    block, slot = _block(batch, 1, 3 * 16), (3 * 16 % batch.block_size) // 16
    batch.summaries.boxes[block, slot] += 1.0
    batch.summaries.codes[block, 3 * 16 % batch.block_size] ^= 1
    stale = _stale(batch)
    assert f"row 1: level-0 box of node 3 in block {block}" in stale
    assert f"row 1: codes of position 48 in block {block}" in stale


def test_a_write_on_the_wrong_block_is_found(batch):
    """Sequence 0's first cell summarised into another sequence's block instead of its own."""
    own, other = _block(batch, 0, 0), _block(batch, 1, 0)
    batch.summaries.boxes[other, 0] = batch.summaries.boxes[own, 0]
    batch.summaries.keys[other, :16] = batch.summaries.keys[own, :16]
    batch.summaries.boxes[own, 0] = torch.randn_like(batch.summaries.boxes[own, 0])
    stale = _stale(batch)
    assert f"row 0: level-0 box of node 0 in block {own}" in stale
    assert f"row 1: level-0 box of node 0 in block {other}" in stale
    assert f"row 1: key copy of position 0 in block {other}" in stale


def test_a_stale_union_box_is_found(batch):
    """A level-2 node (256 tokens) of sequence 0 that missed its union update."""
    node = 1
    blocks, slots = batch.summaries.locate(2, torch.tensor([node]), batch.block_table[0].long())
    batch.summaries.boxes[blocks, slots, 1] -= 1.0
    assert _stale(batch) == [f"row 0: level-2 box of node {node} in block {int(blocks[0])}"]
