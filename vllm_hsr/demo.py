"""`make demo`: build the tiny local model, generate with `--attention-backend HSR`, and show HSR's reads.

    python -m vllm_hsr.demo [--model-dir DIR] [--context 32768]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from vllm_hsr import HSRConfig, sparse_attention
from vllm_hsr.tiny_model import build_tiny_model


def _generate(model: Path, backend: str) -> tuple[str, float]:
    from vllm import LLM, SamplingParams
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=2048,
              attention_backend=backend, seed=0)
    start = time.perf_counter()
    out = llm.generate(["the quick fox jumps over the lazy dog"], SamplingParams(max_tokens=16, temperature=0))
    return out[0].outputs[0].text, time.perf_counter() - start


def _core_demo(context: int) -> None:
    """One decode query over a synthetic sequence with a few relevant keys far from the window."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim = 8, 2, 128
    direction = torch.randn(kv_heads, 1, head_dim, generator=gen)
    q = (direction + 0.3 * torch.randn(kv_heads, heads // kv_heads, head_dim, generator=gen)).flatten(0, 1)
    k = 0.3 * torch.randn(context, kv_heads, head_dim, generator=gen)
    v = torch.randn(context, kv_heads, head_dim, generator=gen)
    k[torch.randint(context, (8,), generator=gen)] += 3 * direction.squeeze(1)
    print(f"\nHSR core on one sequence of {context} tokens ({heads} q heads, {kv_heads} kv heads, d={head_dim}):")
    print(f"{'mode':<8} {'setting':<14} {'keys read':>10} {'bytes read':>11} {'certificate':>12}")
    for cfg, setting in ((HSRConfig(mode="softmax", eps=1e-3), "eps=1e-3"),
                         (HSRConfig(mode="softmax", eps=0.0), "eps=0"),
                         (HSRConfig(mode="relu", alpha=2, bias=2.0), "alpha=2 b=2"),
                         (HSRConfig(mode="topk", budget_tokens=512), "budget=512")):
        _, stats = sparse_attention(q, k, v, cfg)
        print(f"{cfg.mode:<8} {setting:<14} {stats.keys_read / (context * kv_heads):>10.2%} "
              f"{stats.bytes_read_fraction:>11.2%} {stats.error_bound.max().item():>12.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".tiny-model/demo"))
    parser.add_argument("--context", type=int, default=32768)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = build_tiny_model(args.model_dir)
    for backend in ("HSR", "CPU_ATTN"):
        text, seconds = _generate(model, backend)
        print(f"[{backend:>8}] {seconds:5.2f}s  {text!r}")
    _core_demo(args.context)


if __name__ == "__main__":
    main()
