"""The reference model through vLLM (benchmarks/retrieval.py's engines, float32, prefix caching).

On a ~2K-token needle prompt (16 KV blocks): with eps=0, HSR's greedy tokens equal CPU_ATTN's
and it reads every key; topk (budget 256, 4-bit codes) still answers what dense answers; the
dense engine scores another continuation below its own greedy one.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import retrieval  # noqa: E402

CONTEXTS, DEPTHS, MAX_TOKENS = [2048], [0.3], 16
EXACT = {"mode": "softmax", "eps": 0}
TOPK = {"mode": "topk", "budget_tokens": 256, "code_bits": 4, "dense_below_tokens": 0}     # HSR at every step


@pytest.fixture(scope="module")
def runs(real_model, tmp_path_factory):
    exact = retrieval.engine(real_model, CONTEXTS, DEPTHS, MAX_TOKENS, EXACT)
    topk = retrieval.engine(real_model, CONTEXTS, DEPTHS, MAX_TOKENS, TOPK)
    tokens = exact["prompts"][0]["token_ids"]
    other = tokens[:3] + [(tokens[3] + 1) % 1000 + 2] + tokens[4:]     # one token changed
    score_file = tmp_path_factory.mktemp("scores") / "continuations.json"
    continuations = {json.dumps(EXACT, sort_keys=True): [tokens], json.dumps(TOPK, sort_keys=True):
                     [topk["prompts"][0]["token_ids"]], "changed": [other]}
    score_file.write_text(json.dumps(continuations))
    dense = retrieval.engine(real_model, CONTEXTS, DEPTHS, MAX_TOKENS, None, score_file)
    return dense, exact, topk


def test_eps_zero_tokens_equal_cpu_attn(runs):
    dense, exact, _ = runs
    assert dense["backend"] == "CPU_ATTN" and exact["backend"] == "HSR"
    assert 1800 < dense["prompts"][0]["context"] <= 2048
    assert exact["prompts"][0]["token_ids"] == dense["prompts"][0]["token_ids"]
    stats = exact["stats"]
    assert stats["sparse_rows"] == (MAX_TOKENS - 1) * 30 and stats["dense_rows"] == 0   # every step, 30 layers
    assert stats["keys_read"] == stats["dense_keys"] and stats["max_error_bound"] == 0


def test_topk_answers_what_dense_answers(runs):
    dense, _, topk = runs
    assert dense["prompts"][0]["correct"], dense["prompts"][0]["text"]
    assert topk["prompts"][0]["correct"], topk["prompts"][0]["text"]
    stats = topk["stats"]
    assert stats["keys_read"] < 0.25 * stats["dense_keys"]


def test_dense_scores_other_continuations(runs):
    dense, exact, topk = runs
    scores = dense["scores"]
    assert scores[json.dumps(EXACT, sort_keys=True)] == [None]           # same tokens: nothing to score
    changed = scores["changed"][0]
    assert changed is not None and changed < dense["prompts"][0]["logprob"] - 0.1
    for run in (dense, exact, topk):
        run["prompts"][0]["context_target"] = CONTEXTS[0]
    records = retrieval.summarise(dense, [exact, topk])
    assert [(r["backend"], r["correct"], r["total"]) for r in records] == [
        ("CPU_ATTN", 1, 1), ("HSR", 1, 1), ("HSR", 1, 1)]
    assert records[1]["max_logprob_gap"] == 0 and records[1]["tokens_equal_dense"] == 1
    assert records[2]["bytes_read_fraction"] < 0.5 and records[2]["max_logprob_gap"] >= 0
