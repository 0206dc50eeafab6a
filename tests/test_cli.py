"""`vllm-hsr`: argument handling, and `vllm-hsr serve` answering a completion over loopback."""

import os

import pytest

from vllm_hsr import cli
from vllm_hsr.cli import with_backend
from vllm_hsr.server import LocalServer


def test_engine_commands_get_the_hsr_backend_unless_one_is_chosen():
    assert with_backend(["serve", "m"]) == ["serve", "m", "--attention-backend", "HSR"]
    assert with_backend(["bench", "throughput", "--model", "m"])[-2:] == ["--attention-backend", "HSR"]
    assert with_backend(["serve", "m", "--attention-backend", "CPU_ATTN"]) == [
        "serve", "m", "--attention-backend", "CPU_ATTN"]
    assert with_backend(["serve", "m", "--attention-backend=CUSTOM"])[-1] == "--attention-backend=CUSTOM"
    assert with_backend(["--version"]) == ["--version"]


@pytest.mark.parametrize("argv,huge_pages", ((["bench", "throughput", "--model", "m"], "1"), (["--version"], None)))
def test_engine_commands_ask_for_huge_pages_unless_set(argv, huge_pages, monkeypatch):
    """Engine commands hand THP_MEM_ALLOC_ENABLE=1 to the engine process (a value already set wins)."""
    seen = []
    monkeypatch.setattr(cli._vllm, "cli_main", lambda: seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE")))
    monkeypatch.setattr(cli, "_let_vllm_find_its_version", lambda: None)
    monkeypatch.setattr(cli.sys, "argv", ["vllm-hsr"])       # main() sets it for vLLM's parser
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    cli.main(argv)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    cli.main(argv)
    assert seen == [huge_pages, "0"]


def test_vllm_hsr_serve_answers_a_completion(tiny_model, tmp_path):
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HSR_DENSE_BELOW_TOKENS": "0"}
    with LocalServer(tiny_model, tmp_path / "server.log", args, env) as server:
        assert server.command[1:3] == ["serve", str(tiny_model)] and server.command[0].endswith("vllm-hsr")
        body = server.complete("the quick fox", max_tokens=8)
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 8
        assert "vllm:" in server.get("/metrics")
        metrics = server.hsr_metrics()
        assert metrics.get('vllm_hsr_decode_rows_total{path="hsr"}', 0) > 0, metrics
        assert metrics.get("vllm_hsr_kv_bytes_read_total", 0) > 0, metrics
