"""`make demo`: build the tiny local model, serve it with HSR on loopback, ask it, compare backends.

    python -m vllm_hsr.demo [--model-dir DIR] [--input-lens 512,16384] [--output-len 64]

Steps: (1) build the tiny Llama model (no hub needed); (2) `vllm-hsr serve` it on
127.0.0.1 and send one completion, then show the server's HSR metrics; (3) stop it and run
a short `vllm bench throughput` comparison of HSR against the dense backend
(benchmarks/compare_backends.py), printing its table. Outputs go to .demo/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from vllm_hsr.server import LocalServer
from vllm_hsr.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".tiny-model/demo"))
    # 16K: above where topk decodes sparsely by default (dense_below_tokens="auto": 13,248 tokens at 8-bit)
    parser.add_argument("--input-lens", default="512,16384")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    print("== 1. tiny local model", flush=True)
    model = build_tiny_model(args.model_dir, max_position=32768)

    print("\n== 2. vllm-hsr serve (HSR decode from the first token: dense_below_tokens=0)", flush=True)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HSR_DENSE_BELOW_TOKENS": "0"}
    serve_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096"]
    with LocalServer(model, args.out / "server.log", serve_args, env) as server:
        print(f"   serving on {server.base} (log: {args.out / 'server.log'})")
        prompt = "the quick fox jumps over the lazy dog"
        body = server.complete(prompt, max_tokens=24)
        print(f"   POST /v1/completions {prompt!r} -> {body['choices'][0]['text']!r}")
        for name, value in sorted(server.hsr_metrics().items()):
            print(f"   /metrics {name} {value:g}")
    print("   server stopped")

    print("\n== 3. vllm bench throughput: HSR vs the dense backend (random weights: plumbing, not sparsity)",
          flush=True)
    script = ROOT / "benchmarks" / "compare_backends.py"
    if not script.exists():
        sys.exit(f"{script} not found: the comparison step runs from a source checkout")
    subprocess.run([sys.executable, str(script), "--model", str(model), "--input-lens", args.input_lens,
                    "--output-len", str(args.output_len), "--num-prompts", "2",
                    "--json", str(args.out / "compare.json"), "--plot", str(args.out / "compare.png"),
                    "--log", str(args.out / "compare.log")], check=True)


if __name__ == "__main__":
    main()
