"""One engine's decode timings on a warm prefix cache (compare_backends.py --warm-prefix runs it per backend).

    python benchmarks/warm_decode.py --model DIR --backend HSR|CPU_ATTN|FLASH_ATTN [--hsr JSON]
        --input-len 7600 --output-len 256 --num-prompts 8 --repeats 3 [--dtype float32]

Prefilling 8 prompts of 7.6K tokens takes this CPU ~5.5 minutes, four times the decode that
follows, so decode throughput from two cold runs (with and without the decode) is the small
difference of two large, noisy times. Here the engine prefills the prompts once (vLLM's prefix
cache then holds their full blocks), and every repeat runs the same prompts again with one
output token and with `output_len`: both re-prefill only each prompt's last partial block, so
their difference is the decode alone. Per repeat: decode tok/s of the whole batch
(num_prompts * (output_len - 1) / difference), and the time per output token of the first
prompt alone (difference / (output_len - 1)). Prompts are random token ids in [0, 10000), as
vLLM's own benchmarks draw them; every request ignores EOS. A repeat whose prompts missed the
cache raises: its time would hold a prefill. Prints one JSON line, `RESULT {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROMPT_IDS = 10000   # vLLM's bench draws dummy prompt ids below this
# CPU KV cache (GiB) unless VLLM_CPU_KVCACHE_SPACE says otherwise: HSR's blocks carry summaries and a key copy
# (~1.6x CPU_ATTN's bytes at SmolLM2's shape), and 8 prompts of 7.6K tokens need ~500 of them at once.
KV_CACHE_GIB = 12


def timed(llm, prompts, output_len: int) -> float:
    """Seconds to generate output_len tokens (EOS ignored) for every prompt, after checking that each
    prompt found all its full blocks in the prefix cache."""
    from vllm import SamplingParams
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    elapsed = time.perf_counter() - start
    block = llm.llm_engine.vllm_config.cache_config.block_size
    for prompt, out in zip(prompts, outputs):
        full_blocks = (len(prompt["prompt_token_ids"]) - 1) // block * block
        if (out.num_cached_tokens or 0) < full_blocks:
            raise RuntimeError(f"a prompt found {out.num_cached_tokens} of its {full_blocks} full-block tokens in "
                               "the prefix cache: the timing would include its prefill (is the KV cache too small "
                               "to keep every prompt? raise VLLM_CPU_KVCACHE_SPACE)")
        if len(out.outputs[0].token_ids) != output_len:
            raise RuntimeError(f"a request gave {len(out.outputs[0].token_ids)} tokens, not {output_len}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--hsr", default=None, help="HSR settings (JSON), with --backend HSR")
    parser.add_argument("--input-len", type=int, required=True)
    parser.add_argument("--output-len", type=int, required=True)
    parser.add_argument("--num-prompts", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    if args.output_len < 2:
        parser.error("--output-len must be at least 2: decode is what is timed")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")      # as vllm-hsr's engine commands set it
    import torch
    from common import finish_worker       # (it imports torch: after THP_MEM_ALLOC_ENABLE)
    from vllm import LLM, SamplingParams
    config = {"hsr": json.loads(args.hsr)} if args.backend == "HSR" and args.hsr else {}
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, seed=0, enable_prefix_caching=True,
              max_model_len=args.input_len + args.output_len + 16, attention_backend=args.backend,
              additional_config=config)
    generator = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(PROMPT_IDS, (args.input_len,), generator=generator).tolist()}
               for _ in range(args.num_prompts)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    prefill_s = time.perf_counter() - start
    print(f"{args.backend}: prefilled {args.num_prompts} x {args.input_len} tokens in {prefill_s:.0f}s",
          file=sys.stderr, flush=True)
    runs = []
    for repeat in range(args.repeats):
        batch = timed(llm, prompts, args.output_len) - timed(llm, prompts, 1)
        single = timed(llm, prompts[:1], args.output_len) - timed(llm, prompts[:1], 1)
        runs.append({"decode_tokens_per_s": args.num_prompts * (args.output_len - 1) / batch,
                     "tpot_ms": 1000 * single / (args.output_len - 1), "batch_decode_s": batch})
        print(f"{args.backend}: repeat {repeat + 1}/{args.repeats}: {runs[-1]['decode_tokens_per_s']:.1f} decode "
              f"tok/s, {runs[-1]['tpot_ms']:.1f} ms per token at one request", file=sys.stderr, flush=True)
    finish_worker(llm, {"prefill_s": prefill_s, "runs": runs})


if __name__ == "__main__":
    main()
