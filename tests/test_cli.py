"""`vllm-hsr`: argument handling, and `vllm-hsr serve` answering a completion over loopback."""

from vllm_hsr.cli import with_backend
from vllm_hsr.server import LocalServer


def test_engine_commands_get_the_hsr_backend_unless_one_is_chosen():
    assert with_backend(["serve", "m"]) == ["serve", "m", "--attention-backend", "HSR"]
    assert with_backend(["bench", "throughput", "--model", "m"])[-2:] == ["--attention-backend", "HSR"]
    assert with_backend(["serve", "m", "--attention-backend", "CPU_ATTN"]) == [
        "serve", "m", "--attention-backend", "CPU_ATTN"]
    assert with_backend(["serve", "m", "--attention-backend=CUSTOM"])[-1] == "--attention-backend=CUSTOM"
    assert with_backend(["--version"]) == ["--version"]


def test_vllm_hsr_serve_answers_a_completion(tiny_model, tmp_path):
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HSR_DENSE_BELOW_TOKENS": "0"}
    with LocalServer(tiny_model, tmp_path / "server.log", args, env) as server:
        assert server.command[1:3] == ["serve", str(tiny_model)] and server.command[0].endswith("vllm-hsr")
        body = server.complete("the quick fox", max_tokens=8)
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 8
        assert "vllm:" in server.get("/metrics")
        metrics = server.hsr_metrics()
        assert metrics.get('vllm_hsr_decode_rows_total{path="hsr"}', 0) > 0, metrics
        assert metrics.get("vllm_hsr_kv_bytes_read_total", 0) > 0, metrics
