"""Run a fixed generation workload on the tiny model and print its tokens as one JSON line.

    python tests/run_workload.py MODEL --attention-backend NAME [--hsr JSON] [--num-blocks N]

The workload: prompts of mixed lengths spanning several KV blocks, two prompts sharing a
long prefix (prefix caching), chunked prefill (small token budget), greedy decoding.
Prints {"tokens": [[...]], "logprobs": [[...]], "hsr": worker HSR totals or null, "preemptions": n,
"num_blocks": KV blocks the engine allocated, "summaries_in_pages": per HSR layer, whether its
summaries live in the KV cache's storage (or null)}.
"""

import argparse
import json
import os

PROMPT_LENS = (5, 129, 300, 700, 1100)
SHARED_PREFIX, SUFFIX = 400, 20


def prompts(vocab: int, lengths) -> list[list[int]]:
    import torch
    gen = torch.Generator().manual_seed(0)
    rand = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    prefix = torch.randint(3, vocab, (SHARED_PREFIX,), generator=gen).tolist()
    shared = [prefix + torch.randint(3, vocab, (SUFFIX,), generator=gen).tolist() for _ in range(2)]
    return rand + shared


def worker_report(model):
    """The worker's HSR totals, and for each HSR layer whether its summaries share the KV storage."""
    from vllm_hsr.stats import DecodeStatsLog
    in_pages = []
    for module in model.modules():
        summaries = getattr(getattr(module, "impl", None), "summaries", None)
        if summaries is not None:
            cache = module.kv_cache[0] if isinstance(module.kv_cache, list) else module.kv_cache
            in_pages.append(summaries.boxes.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr())
    return dict(DecodeStatsLog.shared().totals), in_pages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--attention-backend", required=True)
    parser.add_argument("--hsr", default="{}", help="HSR settings as JSON")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks (small: forces preemption)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--prompt-lens", default=",".join(map(str, PROMPT_LENS)))
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams, TokensPrompt
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=args.max_model_len, seed=0,
              attention_backend=args.attention_backend, additional_config={"hsr": json.loads(args.hsr)},
              max_num_batched_tokens=256, enable_chunked_prefill=True, enable_prefix_caching=True,
              num_gpu_blocks_override=args.num_blocks, disable_log_stats=False,
              tensor_parallel_size=args.tensor_parallel_size)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts(vocab, map(int, args.prompt_lens.split(",")))], params)
    from run_workload import worker_report  # by module name, so the worker can unpickle it
    hsr, in_pages = llm.apply_model(worker_report)[0] if args.attention_backend != "CPU_ATTN" else (None, None)
    result = {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logprobs": [[next(iter(step.values())).logprob for step in o.outputs[0].logprobs] for o in outs],
        "hsr": hsr, "summaries_in_pages": in_pages,
        "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "preemptions": sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
