"""Summaries and token codes never bound below the true scores (fuzzed, low precision, extremes)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_hsr import HSRConfig
from vllm_hsr.core.summaries import box_bounds, code_bounds, code_planes, pack_codes, unpack_codes
from reference_tree import DenseCellTree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest decimal exponent whose keys still fit the dtype with room for the scores.
MAX_EXP = {torch.float32: 30, torch.bfloat16: 30, torch.float16: 4}


@st.composite
def trees(draw):
    key_dtype = DTYPES[draw(st.sampled_from(tuple(DTYPES)))]
    exponent = draw(st.integers(-30 if key_dtype != torch.float16 else -4, MAX_EXP[key_dtype]))
    num_tokens = draw(st.integers(1, 300))
    head_dim = draw(st.sampled_from((1, 3, 8, 64)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_tokens, 2, head_dim, generator=gen)
    if draw(st.booleans()):  # heavy-tailed channels and exact repeats
        keys = keys ** 3
        keys[: num_tokens // 2] = keys[:1]
    keys = (keys * 10.0 ** exponent).to(key_dtype)
    q = torch.randn(3, head_dim, generator=gen) * 10.0 ** draw(st.integers(-3, 3))
    cfg = HSRConfig(
        cell_size=draw(st.sampled_from((1, 2, 16, 32))),
        fanout=draw(st.sampled_from((2, 3, 16))),
        tree_levels=draw(st.integers(0, 4)),
        code_bits=draw(st.sampled_from((1, 2, 4, 8))),
        summary_dtype=draw(st.sampled_from(("auto",) + tuple(DTYPES))),
    )
    return keys, q, cfg


def _true_scores(q, keys, scale):
    """[N, G] in float64 and as fp32 dense computes them."""
    exact = (keys.double() @ q.double().T) * scale
    fp32 = (keys.float() @ q.T) * scale
    return exact, fp32


@settings(max_examples=300, deadline=None)
@given(trees())
def test_bounds_never_below_true_scores(case):
    keys, q, cfg = case
    tree = DenseCellTree(keys, cfg)
    scale = cfg.resolved_scale(keys.shape[-1])
    num_tokens, num_cells = keys.shape[0], tree.levels[0][0].shape[0]
    for head in range(keys.shape[1]):
        exact, fp32 = _true_scores(q, keys[:, head], scale)
        pad = num_cells * cfg.cell_size - num_tokens
        cell_of = torch.arange(num_tokens) // cfg.cell_size
        # cells
        lo, hi = tree.levels[0]
        ub, lb = box_bounds(q, lo[:, head], hi[:, head], scale)
        for true in (exact, fp32.double()):
            finite = torch.isfinite(true)
            assert torch.all((ub.double()[cell_of] >= true) | ~finite)
            assert torch.all((lb.double()[cell_of] <= true) | ~finite)
        # token codes (complete cells only)
        coded = tree.num_coded_cells()
        codes = tree.codes(torch.arange(coded), head)
        for planes in range(1, code_planes(cfg.code_bits)[1] + 1):   # a prefix of the planes bounds too
            tub, tlb = code_bounds(q, lo[:coded, head], hi[:coded, head], codes, cfg.code_bits, scale, planes)
            tub, tlb = tub.flatten(0, 1), tlb.flatten(0, 1)
            assert pad >= 0 and tub.shape[0] == coded * cfg.cell_size
            for true in (exact[:tub.shape[0]], fp32[:tub.shape[0]].double()):
                finite = torch.isfinite(true)
                assert torch.all((tub.double() >= true) | ~finite)
                assert torch.all((tlb.double() <= true) | ~finite)
        # every level contains the level below it
        for level in range(1, tree.num_levels):
            p_lo, p_hi = tree.levels[level]
            assert p_lo.shape[0] == num_tokens // tree.span(level)
            c_lo, c_hi = tree.levels[level - 1]
            c_lo, c_hi = c_lo[:p_lo.shape[0] * cfg.fanout], c_hi[:p_lo.shape[0] * cfg.fanout]
            parent = torch.arange(c_lo.shape[0]) // cfg.fanout
            assert torch.all(p_lo[parent].float() <= c_lo.float())
            assert torch.all(p_hi[parent].float() >= c_hi.float())


def test_boxes_are_rounded_outward_in_narrow_dtypes():
    keys = torch.tensor([[1.0 + 2**-20], [-(1.0 + 2**-20)], [0.3]]).view(3, 1, 1)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        tree = DenseCellTree(keys, HSRConfig(cell_size=4, summary_dtype=name, code_bits=0))
        lo, hi = tree.levels[0]
        assert lo.dtype == dtype and hi.dtype == dtype
        assert lo.float().item() <= -(1.0 + 2**-20) and hi.float().item() >= 1.0 + 2**-20


@given(st.sampled_from((1, 2, 4, 8)), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(bits, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (5, head_dim), generator=gen).to(torch.uint8)
    packed = pack_codes(codes, bits)
    plane_bits, planes = code_planes(bits)
    assert packed.shape[-1] == planes * -(-head_dim * plane_bits // 8)
    assert torch.equal(unpack_codes(packed, bits, head_dim), codes)
    if planes > 1:   # the first plane alone holds the high bits
        high = unpack_codes(packed[..., :packed.shape[-1] // planes], plane_bits, head_dim)
        assert torch.equal(high, codes >> (bits - plane_bits))
