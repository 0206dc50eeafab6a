"""HSR on the reference model's real keys (benchmarks/fidelity.py): certificates hold, both paths agree.

One forward pass of SmolLM2-135M over ~1K tokens of the shipped text; three layers (the dense
first one, a middle and the last), the last 4 positions as decode queries, through the compiled
CPU kernel and the torch twin.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fidelity  # noqa: E402
from bench_decode import parse_mode  # noqa: E402
from real_attention import capture, load_model  # noqa: E402

from vllm_hsr.corpus import Needle, needle_prompt  # noqa: E402

MODES = ["softmax:1e-3", "softmax:1e-2:4", "topk:128:4"]
KERNELS_BEFORE = os.environ.get("HSR_KERNELS")
LAYERS = [0, 14, 29]


@pytest.fixture(scope="module")
def records(real_model):
    model, tokenizer = load_model(real_model)
    return fidelity.run([1024], 4, [parse_mode(m) for m in MODES], ["native", "torch"], LAYERS, model, tokenizer)


def test_capture_matches_the_models_own_attention(real_model):
    """The captured keys and queries give the attention the model computed: its output equals the
    capture's softmax(q k^T) v for the last query of a layer."""
    model, tokenizer = load_model(real_model)
    ids = tokenizer(needle_prompt(tokenizer, 300, Needle("red", 11111, 0.5)).prompt).input_ids
    (attn,) = capture(model, ids, 2, [5])
    assert attn.keys.shape == (len(ids), 3, 64) and attn.queries.shape == (2, 9, 64)
    assert attn.scale == pytest.approx(64 ** -0.5)
    weights = fidelity.exact_weights(attn.queries[-1], attn.keys, attn.scale)
    out = torch.einsum("hn,nhd->hd", weights, attn.values.double().repeat_interleave(3, 1))
    captured = {}
    layer = model.model.layers[5].self_attn
    handle = layer.o_proj.register_forward_hook(lambda m, args, result: captured.setdefault("in", args[0]))
    with torch.inference_mode():
        model(torch.tensor([ids]), use_cache=False)
    handle.remove()
    assert torch.allclose(captured["in"][0, -1].view(9, 64).double(), out, atol=1e-4)


def test_the_kernel_choice_is_put_back(records):
    """fidelity switches HSR_KERNELS per call; later tests (and the engines they spawn) must not inherit it."""
    assert os.environ.get("HSR_KERNELS") == KERNELS_BEFORE


def test_no_certificate_is_violated_on_real_keys(records):
    assert len(records) == len(LAYERS) * len(MODES) * 2
    assert sum(r["certificate_violations"] for r in records) == 0
    for r in records:
        assert r["max_true_dropped"] <= r["max_certificate"] * (1 + fidelity.CERTIFICATE_SLACK) + 1e-12
        if r["mode"] == "softmax":
            assert r["max_certificate"] <= r["eps"] and r["overflow_rows"] == 0
            # dropping mass d of the total moves the output by at most 2d max||v|| (docs/design.md §2)
            assert r["max_rel_error"] < 1


def test_softmax_skips_on_real_keys_and_stays_near_the_oracle(records):
    """Middle and last layers are not dense: eps 1e-2 leaves tokens out, never many more than the oracle reads."""
    loose = [r for r in records if r["mode"] == "softmax" and r["eps"] == 1e-2 and r["layer"] > 0]
    assert all(r["tokens_read_fraction"] < 0.95 for r in loose)
    assert all(r["tokens_read_fraction"] <= 1.5 * r["oracle_fraction"] for r in loose)


def test_topk_reads_its_budget_and_reports_its_dropped_mass(records):
    for r in (r for r in records if r["mode"] == "topk"):
        # sink 16 + window 64 + budget 128 of the ~1K tokens up to each query
        assert 0.18 < r["tokens_read_fraction"] < 0.23
        assert r["oracle_dropped_mass"] <= r["max_true_dropped"] + 1e-9


def test_kernel_and_twin_select_the_same_tokens(records):
    by_key = {}
    for r in records:
        by_key.setdefault((r["layer"], r["mode"], r["eps"], r["budget_tokens"]), {})[r["kernel"]] = r
    assert len(by_key) == len(LAYERS) * len(MODES)
    for pair in by_key.values():
        native, twin = pair["native"], pair["torch"]
        assert native["tokens_read_fraction_per_head"] == twin["tokens_read_fraction_per_head"]
        assert native["max_certificate"] == pytest.approx(twin["max_certificate"], rel=1e-4, abs=1e-30)
        assert native["max_rel_error"] == pytest.approx(twin["max_rel_error"], rel=1e-2, abs=1e-5)


def test_layer_call_on_real_rows(real_model, tmp_path):
    """bench_layer_call --workload real: rows from the sampled layers at a ragged context; eps=0 reads every
    token and equals CPU_ATTN, top-k reads its budget (plus sink and window) of the real keys."""
    import json
    import bench_layer_call
    import real_attention
    common = ["--workload", "real", "--contexts", "300", "--batch", "2", "--repeat", "1",
              "--threads", str(torch.get_num_threads()), "--json", str(tmp_path / "r.json"),
              "--plot", str(tmp_path / "r.png")]
    exact, topk = bench_layer_call.main([*common, "--hsr", json.dumps({"mode": "softmax", "eps": 0}),
                                         "--hsr", json.dumps({"mode": "topk", "budget_tokens": 64, "code_bits": 4,
                                                              "sink_tokens": 16, "window_tokens": 32})])
    assert (exact["num_heads"], exact["num_kv_heads"], exact["head_dim"]) == (9, 3, 64)
    assert exact["tokens_read_fraction"] == 1.0 and exact["max_rel_diff_vs_cpu_attn"] < 1e-5
    # sink, budget, and the window or the partial cell (a seed), whichever is longer (cells of 64 tokens here)
    partial = 300 % topk["cell_size"]
    assert topk["cell_size"] == 64
    assert topk["tokens_read_fraction"] == pytest.approx((64 + 16 + max(32, partial)) / 300, abs=2 / 300)
    keys, values, query = real_attention.decode_row(1, 300, 300 + bench_layer_call.REAL_MARGIN)
    layer = real_attention.decode_rows(300 + bench_layer_call.REAL_MARGIN)[1]
    assert layer.layer == real_attention.SAMPLE_LAYERS[1] and keys.shape == (300, 3, 64)
    assert torch.equal(query, layer.queries[299]) and torch.equal(values, layer.values[:300])
