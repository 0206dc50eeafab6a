"""HSRConfig rejects every bad setting with a ValueError naming it; bad tensors are refused."""

import math

import pytest
import torch

from vllm_hsr import HSRConfig, dense_attention, sparse_attention

BAD_SETTINGS = [
    ("mode", "sparse"), ("mode", None),
    ("eps", -0.1), ("eps", 1.0), ("eps", float("nan")), ("eps", "1e-3"),
    ("alpha", 0), ("alpha", 1.5), ("alpha", True),
    ("bias", float("inf")), ("bias", "0"),
    ("budget_tokens", 8), ("budget_tokens", 100.0),
    ("cell_size", 12), ("cell_size", 0), ("cell_size", -16),
    ("fanout", 1), ("fanout", 2.0), ("tree_levels", -1), ("tree_levels", 9),
    ("code_bits", 3), ("code_bits", 16),
    ("sink_tokens", -1), ("window_tokens", 1.5), ("seed_cells", -2),
    ("scale", 0.0), ("scale", -1.0), ("scale", float("nan")),
    ("summary_dtype", "int8"), ("key_copy", True), ("key_copy", "yes"),
    ("tree_budget_share", 1.0), ("tree_budget_share", -0.5),
    ("dense_below_tokens", -1), ("dense_below_tokens", "always"), ("dense_below_tokens", None),
    ("allow_relu_decode", 1), ("allow_relu_decode", "yes"),
]


@pytest.mark.parametrize("name,value", BAD_SETTINGS)
def test_bad_setting_names_the_field(name, value):
    with pytest.raises(ValueError, match=rf"HSRConfig\.{name}="):
        HSRConfig(**{name: value})


def test_defaults_are_valid_and_documented():
    cfg = HSRConfig()
    assert (cfg.mode, cfg.budget_tokens, cfg.code_bits, cfg.cell_size) == ("topk", 512, 4, 16)
    for name in HSRConfig.field_names():
        assert name in HSRConfig.__doc__


def test_from_mapping_rejects_unknown_keys():
    assert HSRConfig.from_mapping({"mode": "topk", "budget_tokens": 64}).budget_tokens == 64
    with pytest.raises(ValueError, match="unknown HSR setting.*epsilon"):
        HSRConfig.from_mapping({"epsilon": 0.1})


@pytest.mark.parametrize("bad", ("nan_q", "inf_k", "nan_v"))
def test_non_finite_inputs_raise(bad):
    q, k, v = torch.randn(4, 16), torch.randn(40, 2, 16), torch.randn(40, 2, 16)
    {"nan_q": q, "inf_k": k, "nan_v": v}[bad].view(-1)[7] = float("nan") if "nan" in bad else float("inf")
    for fn in (sparse_attention, dense_attention):
        with pytest.raises(ValueError, match="non-finite"):
            fn(q, k, v, HSRConfig())


@pytest.mark.parametrize("shapes,match", [
    (((4, 16), (40, 3, 16), (40, 3, 16)), "multiple"),
    (((4, 16), (40, 2, 8), (40, 2, 8)), "head_dim"),
    (((4, 16), (0, 2, 16), (0, 2, 16)), "empty"),
    (((4, 16), (40, 2, 16), (41, 2, 16)), "expected"),
])
def test_bad_shapes_raise(shapes, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, HSRConfig())


def test_vllm_settings_with_environment_overrides():
    extra = {"hsr": {"mode": "topk", "budget_tokens": 256}, "other": 1}
    cfg = HSRConfig.from_vllm(extra, {"HSR_BUDGET_TOKENS": "512", "HSR_SUMMARY_DTYPE": "bfloat16",
                                      "HSR_SCALE": "null"})
    assert (cfg.mode, cfg.budget_tokens, cfg.summary_dtype, cfg.scale) == ("topk", 512, "bfloat16", None)
    assert HSRConfig.from_vllm(None, {}) == HSRConfig()
    assert HSRConfig.from_vllm(None, {"HSR_KEY_COPY": "off"}).key_copy == "off"
    with pytest.raises(ValueError, match=r"HSRConfig\.eps=2 is invalid.*environment overrides: HSR_EPS=2"):
        HSRConfig.from_vllm({}, {"HSR_EPS": "2"})
    with pytest.raises(ValueError, match=r"HSRConfig\.mode='fast' is invalid.*HSR_MODE='fast'"):
        HSRConfig.from_vllm({}, {"HSR_MODE": "fast"})
    with pytest.raises(ValueError, match="HSRConfig.budget_tokens='many'"):
        HSRConfig.from_vllm({}, {"HSR_BUDGET_TOKENS": "many"})
    with pytest.raises(ValueError, match="unknown HSR setting"):
        HSRConfig.from_vllm({"hsr": {"epsilon": 0.1}}, {})
    with pytest.raises(ValueError, match=r'additional_config\["hsr"\] must be a JSON object'):
        HSRConfig.from_vllm({"hsr": "topk"}, {})


def test_relu_mode_is_for_the_torch_api_unless_the_engine_is_told():
    HSRConfig(mode="relu").bias                              # the torch API takes it
    with pytest.raises(ValueError, match="refused in vLLM.*allow_relu_decode"):
        HSRConfig(mode="relu").check_engine_use()
    HSRConfig(mode="relu", allow_relu_decode=True).check_engine_use()
    HSRConfig(mode="relu", allow_relu_decode=True, dense_below_tokens=0).check_engine_use()
    with pytest.raises(ValueError, match="dense_below_tokens=4096 is refused.*softmax attention, not ReLU"):
        HSRConfig(mode="relu", allow_relu_decode=True, dense_below_tokens=4096).check_engine_use()
    HSRConfig(mode="topk").check_engine_use()


@pytest.mark.parametrize("key_copy,scattered,copies", (("auto", True, True), ("auto", False, False),
                                                       ("on", False, True), ("off", True, False)))
def test_key_copy_follows_the_partner_unless_forced(key_copy, scattered, copies):
    assert HSRConfig(key_copy=key_copy).copies_keys(partner_scatters_keys=scattered) is copies


def test_dense_below_tokens_auto_follows_the_mode_unless_set():
    # certified softmax pays from ~5.5K tokens at eps 1e-2, later for tighter eps, never at eps 0
    assert HSRConfig(mode="softmax", eps=1e-2).min_sparse_tokens() == 5500
    assert HSRConfig(mode="softmax").min_sparse_tokens() == round(5500 * 10 ** 0.13) == 7419
    assert HSRConfig(mode="softmax", eps=0.1).min_sparse_tokens() < 5500
    assert HSRConfig(mode="softmax", eps=0).min_sparse_tokens() == math.inf
    assert HSRConfig(mode="softmax", eps=1e-320).min_sparse_tokens() == math.inf     # (a subnormal eps overflows)
    # the dense kernel computes softmax, never ReLU^alpha: relu rows all go through HSR
    assert HSRConfig(mode="relu").min_sparse_tokens() == 0
    # topk keeps sink + window + budget tokens; it pays off well above them, further with two code planes
    assert HSRConfig().min_sparse_tokens() == 2048 + 4 * (16 + 64 + 512) == 4416
    assert HSRConfig(mode="topk", budget_tokens=1024, code_bits=8).min_sparse_tokens() == 2 * (2048 + 4 * 1104)
    small = dict(mode="topk", budget_tokens=256, sink_tokens=0, window_tokens=32)
    assert HSRConfig(**small, code_bits=2).min_sparse_tokens() == 2048 + 4 * 288
    assert HSRConfig(**small, code_bits=0).min_sparse_tokens() == 2048 + 4 * 288
    # 64-token cells (vLLM's on CPU_ATTN) set up their query weights a quarter as often: they pay off sooner
    assert HSRConfig(cell_size=64).min_sparse_tokens() == 1024 + 3 * (16 + 64 + 512) == 2800
    assert HSRConfig(cell_size=128).min_sparse_tokens() == 2800
    assert HSRConfig(cell_size=32).min_sparse_tokens() == 4416
    for mode in ("softmax", "topk"):
        assert HSRConfig(mode=mode, dense_below_tokens=0).min_sparse_tokens() == 0
        assert HSRConfig(mode=mode, dense_below_tokens=5000).min_sparse_tokens() == 5000
    assert HSRConfig.from_vllm(None, {"HSR_DENSE_BELOW_TOKENS": "auto"}).dense_below_tokens == "auto"


@pytest.mark.parametrize("block_size,budget,want", (
    (128, 512, 64),     # CPU_ATTN's blocks: 64-token cells
    (16, 512, 16),      # FLASH_ATTN's: a cell per block
    (32, 512, 32),
    (48, 512, 16),      # not a power of two: the largest power of two dividing it
    (256, 512, 64),     # never above ENGINE_CELL_SIZE
    (128, 40, 32),      # topk keeps at least one cell
))
def test_engine_cell_size_follows_the_block_size_unless_set(block_size, budget, want, monkeypatch):
    monkeypatch.delenv("HSR_CELL_SIZE", raising=False)
    given = {"hsr": {"budget_tokens": budget}}
    cfg = HSRConfig.from_vllm(given, environ={}, block_size=block_size)
    assert cfg.cell_size == want and block_size % cfg.cell_size == 0
    assert HSRConfig.from_vllm(given, environ={}).cell_size == HSRConfig.cell_size       # block size unknown
    assert HSRConfig.from_vllm({"hsr": {"budget_tokens": budget, "cell_size": 8}}, environ={},
                               block_size=block_size).cell_size == 8                        # set: kept
    assert HSRConfig.from_vllm(given, environ={"HSR_CELL_SIZE": "4"}, block_size=block_size).cell_size == 4
