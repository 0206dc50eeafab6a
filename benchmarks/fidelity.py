"""Fidelity on real attention: HSR's selection and decode over the reference model's own keys.

    python benchmarks/fidelity.py [--contexts 2048,4096,8000] [--queries 16]
        [--modes softmax:1e-3:8,softmax:1e-2:8,softmax:1e-2:4,topk:256:4,topk:1024:4] [--kernels native,torch]
        [--layers all] [--json PATH] [--plot PATH] [--render-only]

Per context: a haystack of the shipped text with a needle and its question at the end
(vllm_hsr.corpus) goes once through SmolLM2-135M in transformers (benchmarks/real_attention.py),
which keeps every layer's post-rotary keys and values and the queries of the last --queries
positions (the question's tokens: real decode queries). Each layer's keys and values are laid in
a paged cache (float32, shuffled blocks) with HSR summaries, and every query is decoded through
`hsr_decode` over the keys up to its own position, with the compiled CPU kernel and the torch
twin. Per layer, against exact float64 attention:

- tokens_read_fraction: tokens whose key and value HSR read (mean over queries and KV heads;
  per KV head in tokens_read_fraction_per_head); bytes_read_fraction: keys, values, summaries
  and codes read over the dense K+V bytes;
- oracle_fraction: tokens a selector knowing every exact score reads for the same certificate
  and seeds (softmax; bench_decode.oracle_fractions); in topk mode the same count as HSR, and
  oracle_dropped_mass is the mass the best tokens of that count leave out;
- max_certificate, and certificate_violations: query heads whose true dropped mass (relative to
  the kept mass) exceeds their certificate (each one a bug); max_true_dropped;
- max_rel_error: ||out - exact|| / ||exact|| over query heads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import PagedSequence, oracle_fractions, parse_mode  # noqa: E402
from common import RESULTS, provenance, write_records  # noqa: E402
from real_attention import LayerAttention, capture, load_model  # noqa: E402

from vllm_hsr import HSRConfig  # noqa: E402
from vllm_hsr.corpus import Needle, needle_prompt  # noqa: E402
from vllm_hsr.ops import hsr_decode  # noqa: E402

DEFAULT_MODES = "softmax:1e-3:8,softmax:1e-2:8,softmax:1e-2:4,topk:256:4,topk:1024:4"
# fp32 bounds against fp64 truth: a certificate is violated only past this relative slack
CERTIFICATE_SLACK = 1e-5


def exact_weights(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax weights in float64. q [Hq, D], keys [n, Hkv, D] -> [Hq, n]"""
    group = q.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    return (torch.einsum("hd,nhd->hn", q.double(), k) * scale).softmax(-1)


def best_dropped_mass(weights: torch.Tensor, count: int) -> float:
    """The largest, over a KV head's query heads, of the mass left out by the `count` tokens of highest
    weight (ranked by their best weight in the group). weights [G, n]"""
    order = weights.amax(0).argsort(descending=True)
    kept = weights[:, order[:count]].sum(1)
    return float((1 - kept).max())


def decode_layer(attn: LayerAttention, seq: PagedSequence, cfg: HSRConfig, kernel: str) -> dict:
    """Decode every captured query of one layer through hsr_decode and measure it against fp64 truth."""
    num_queries, num_q_heads, _ = attn.queries.shape
    num_kv_heads = attn.keys.shape[1]
    group = num_q_heads // num_kv_heads
    seq_lens = attn.positions + 1
    table = seq.row.unsqueeze(0).expand(num_queries, -1)
    previous = os.environ.get("HSR_KERNELS")
    os.environ["HSR_KERNELS"] = kernel     # hsr_decode reads it per call; put back for whoever runs next
    try:
        start = time.perf_counter()
        out, bound, stats = hsr_decode(attn.queries, seq.cache, seq.layout, seq.summaries, table, seq_lens, cfg,
                                       attn.scale, record_tokens=True)
        seconds = time.perf_counter() - start
    finally:
        if previous is None:
            del os.environ["HSR_KERNELS"]
        else:
            os.environ["HSR_KERNELS"] = previous
    read, oracle, errors, dropped_true, oracle_dropped = [], [], [], [], []
    violations = 0
    for b in range(num_queries):
        n = int(seq_lens[b])
        weights = exact_weights(attn.queries[b], attn.keys[:n], attn.scale)            # [Hq, n]
        exact = torch.einsum("hn,nhd->hd", weights, attn.values[:n].double().repeat_interleave(group, 1))
        errors.append(float(((out[b].double() - exact).norm(dim=-1) / exact.norm(dim=-1)).max()))
        if cfg.mode == "softmax":
            oracle.append(oracle_fractions(attn.queries[b], attn.keys[:n], cfg, attn.scale))
        head_read = []
        for h in range(num_kv_heads):
            tokens = stats.tokens_read[b * num_kv_heads + h]
            head_read.append(len(tokens) / n)
            heads = slice(h * group, (h + 1) * group)
            kept = weights[heads][:, tokens].sum(1)
            ratio = (1 - kept).clamp(min=0) / kept                                      # dropped / kept
            certificate = bound[b, heads].double()
            violations += int((ratio > certificate * (1 + CERTIFICATE_SLACK) + 1e-12).sum())
            dropped_true.append(float(ratio.max()))
            if cfg.mode == "topk":
                oracle_dropped.append(best_dropped_mass(weights[heads], len(tokens)))
        read.append(head_read)
        if cfg.mode == "topk":
            oracle.append(head_read)
    per_head = [statistics.mean(col) for col in zip(*read)]
    oracle_per_head = [statistics.mean(col) for col in zip(*oracle)]
    return {
        "layer": attn.layer, "kernel": kernel, "queries": num_queries,
        "tokens_read_fraction": statistics.mean(per_head), "tokens_read_fraction_per_head": per_head,
        "oracle_fraction": statistics.mean(oracle_per_head), "oracle_fraction_per_head": oracle_per_head,
        "bytes_read_fraction": stats.bytes_read_fraction,
        "max_certificate": float(bound.max()), "certificate_violations": violations,
        "max_true_dropped": max(dropped_true),
        "oracle_dropped_mass": max(oracle_dropped) if oracle_dropped else None,
        "max_rel_error": max(errors), "overflow_rows": stats.overflow_rows, "decode_s": seconds,
    }


def settings(cfg: HSRConfig) -> dict:
    return {"mode": cfg.mode, "eps": cfg.eps if cfg.mode == "softmax" else None,
            "budget_tokens": cfg.budget_tokens if cfg.mode == "topk" else None, "code_bits": cfg.code_bits}


def label(r: dict) -> str:
    value = f"eps={r['eps']:g}" if r["mode"] == "softmax" else f"k={r['budget_tokens']}"
    return f"{r['mode']} {value} c{r['code_bits']}"


def best_dropped(rs: list[dict]) -> str:
    """topk: the worst mass the exact best tokens of HSR's count would leave out ('-' in softmax mode)."""
    values = [r["oracle_dropped_mass"] for r in rs if r["oracle_dropped_mass"] is not None]
    return f"{max(values):.1e}" if values else "-"


def table(records: list[dict]) -> str:
    """Per context, setting and kernel: medians over layers, and the worst certificate and error."""
    head = ("| context | setting | kernel | tokens read | oracle | read / oracle | bytes read | max certificate "
            "| violations | max true dropped | best dropped at that count | max rel. error |")
    rows = [head, "|" + "---|" * 12]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["context"], label(r), r["kernel"]), []).append(r)
    for (context, name, kernel), rs in sorted(groups.items()):
        tokens = statistics.median(r["tokens_read_fraction"] for r in rs)
        oracle = statistics.median(r["oracle_fraction"] for r in rs)
        rows.append(f"| {context} | {name} | {kernel} | {tokens:.1%} | {oracle:.1%} | {tokens / oracle:.2f} | "
                    f"{statistics.median(r['bytes_read_fraction'] for r in rs):.1%} | "
                    f"{max(r['max_certificate'] for r in rs):.1e} | "
                    f"{sum(r['certificate_violations'] for r in rs)} | "
                    f"{max(r['max_true_dropped'] for r in rs):.1e} | {best_dropped(rs)} | "
                    f"{max(r['max_rel_error'] for r in rs):.1e} |")
    first = records[0]
    return (f"Machine: {first['device']}; commit {first['commit']}; `{first['command']}`. Medians over "
            f"{len({r['layer'] for r in records})} layers of each layer's mean over {first['queries']} decode "
            "queries and 3 KV heads; certificate, violations, dropped mass (relative to the kept mass; "
            "the best: absolute) "
            "and error: worst (sum) over them.\n\n"
            + "\n".join(rows) + "\n")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = sorted({r["context"] for r in records})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4.4), squeeze=False, sharey=True)
    kernel = "native" if any(r["kernel"] == "native" for r in records) else records[0]["kernel"]
    names = sorted({label(r) for r in records})
    for ax, context in zip(axes[0], contexts):
        for i, name in enumerate(names):
            rs = sorted((r for r in records if r["context"] == context and label(r) == name
                         and r["kernel"] == kernel), key=lambda r: r["layer"])
            if not rs:
                continue
            layers = [r["layer"] for r in rs]
            ax.plot(layers, [100 * r["tokens_read_fraction"] for r in rs], color=f"C{i}", marker="o", ms=3,
                    label=f"HSR {name}")
            if rs[0]["mode"] == "softmax":
                ax.plot(layers, [100 * r["oracle_fraction"] for r in rs], color=f"C{i}", ls="--",
                        label=f"oracle {name}")
        ax.set(title=f"{context} tokens", xlabel="layer", ylabel="tokens read, % of context")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M real attention: tokens HSR reads per layer ({kernel} kernel) against the "
                 f"exact-score oracle\n{records[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(records: list[dict], json_path: Path, plot_path: Path) -> None:
    write_records(records, json_path, plot_path, table, plot)


def run(contexts: list[int], num_queries: int, modes: list[HSRConfig], kernels: list[str],
        layers: list[int] | None, model=None, tokenizer=None) -> list[dict]:
    """The records of every (context, layer, mode, kernel); progress on stderr."""
    if model is None:
        model, tokenizer = load_model()
    origin = provenance()
    records = []
    for context in contexts:
        prompt = needle_prompt(tokenizer, context, Needle("blue", 48213, 0.5))
        ids = tokenizer(prompt.prompt).input_ids
        start = time.perf_counter()
        captured = capture(model, ids, num_queries, layers)
        print(f"[fidelity] {len(ids)} tokens through the model in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
        for attn in captured:
            sequences = {}
            for cfg in modes:
                if cfg.code_bits not in sequences:
                    sequences[cfg.code_bits] = PagedSequence(attn.keys, attn.values, cfg, dtype=torch.float32)
                for kernel in kernels:
                    record = decode_layer(attn, sequences[cfg.code_bits], cfg, kernel)
                    records.append({"context": len(ids), **settings(cfg), **record, **origin})
            done = [r for r in records if r["context"] == len(ids) and r["layer"] == attn.layer]
            print(f"[fidelity] {len(ids)} tokens, layer {attn.layer}: " + ", ".join(
                f"{label(r)} {r['kernel']} {r['tokens_read_fraction']:.0%}" for r in done),
                file=sys.stderr, flush=True)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2048,4096,8000")
    parser.add_argument("--queries", type=int, default=16, help="decode queries: the last positions of the text")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help="MODE:VALUE[:CODE_BITS], e.g. softmax:1e-3, topk:256:4 (bench_decode's syntax)")
    parser.add_argument("--kernels", default="native,torch", help="hsr_decode paths (HSR_KERNELS values)")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    parser.add_argument("--json", type=Path, default=RESULTS / "fidelity.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "fidelity.png")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite the table (.md) and plot from the records in --json")
    args = parser.parse_args(argv)
    if args.render_only:
        write_outputs(json.loads(args.json.read_text()), args.json, args.plot)
        return
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    modes = [parse_mode(m) for m in args.modes.split(",")]
    records = run([int(c) for c in args.contexts.split(",")], args.queries, modes, args.kernels.split(","), layers)
    write_outputs(records, args.json, args.plot)
    violations = sum(r["certificate_violations"] for r in records)
    if violations:
        sys.exit(f"{violations} certificate violations: a bound is wrong")


if __name__ == "__main__":
    main()
