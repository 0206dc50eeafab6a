"""HSR paged decode vs dense paged decode over context lengths, batch sizes and workloads.

    python benchmarks/bench_decode.py [--contexts 4096,32768,131072] [--batches 1,8]
        [--workloads random,structured,rotary] [--modes softmax:1e-3,topk:1024,topk:1024:4,relu:2.0]
        [--device cpu|cuda] [--json PATH] [--plot PATH] [--repeat 3] [--merge] [--render-only]

Per point: one decode query per sequence over a paged KV cache (FLASH_ATTN layout,
bf16, block size 16; Llama-3-8B attention shape: 32 query heads, 8 KV heads, d=128).
The rows of a batch share one physical cache through their block tables (as prefix
caching would) and each row has its own query. Summaries are built before timing,
as the engine keeps them up to date at every KV write.

Columns: bytes_read_fraction (keys + values + summaries + codes read by HSR / dense
K+V bytes), tokens_read_fraction, oracle_read_fraction (tokens a selector knowing every
exact score must read for the same certificate: softmax mode; see `oracle_tokens`),
max_rel_error (vs fp64 dense), hsr_ms and dense_ms (medians; dense = the fastest of
torch SDPA and our dense paged path, both reading through the block table, and on CUDA
also SDPA (FlashAttention) over keys and values already contiguous: dense's best case),
speedup, gbps (HSR bytes read / hsr time). Times are same-run ratios on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402
from workloads import WORKLOADS, make_workload  # noqa: E402

from vllm_hsr import HSRConfig  # noqa: E402
from vllm_hsr.core.paged import PagedKVLayout, PagedSummaries  # noqa: E402
from vllm_hsr.ops import hsr_decode, kernel_path, update_summaries  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DEFAULT_CODE_BITS = 8     # the default when records did not carry code_bits yet; labels name other widths


class PagedSequence:
    """One sequence's keys and values in a FLASH-layout paged cache, with HSR summaries."""

    def __init__(self, keys, values, cfg: HSRConfig, dtype=torch.bfloat16, chunk=8192, device="cpu"):
        num_tokens, num_kv_heads, head_dim = keys.shape
        num_blocks = 1 + -(-num_tokens // BLOCK_SIZE)
        self.cache = torch.zeros(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.layout = PagedKVLayout.from_views(self.cache, self.cache[0].permute(0, 2, 1, 3),
                                               self.cache[1].permute(0, 2, 1, 3))
        gen = torch.Generator().manual_seed(num_tokens)
        self.row = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(device)   # block 0 stays the null block
        self.num_tokens = num_tokens
        positions = torch.arange(num_tokens, device=device)
        slots = self.row[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        flat = self.cache.view(2, -1, num_kv_heads, head_dim)
        flat[0, slots], flat[1, slots] = keys.to(device, dtype), values.to(device, dtype)
        self.summaries = PagedSummaries.allocate(num_blocks, num_kv_heads, head_dim, BLOCK_SIZE, cfg, dtype, device)
        for start in range(0, num_tokens, chunk):
            end = min(num_tokens, start + chunk)
            write = self.summaries.plan_write(slots[start:end], positions[start:end],
                                              torch.zeros(end - start, dtype=torch.long, device=device))
            update_summaries(self.summaries, write, self.row.unsqueeze(0), self.cache.view(-1), self.layout)

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense read through the block table: K, V [N, Hkv, D]."""
        blocks = self.cache[:, self.row]                                   # [2, nb, bs, H, D]
        kv = blocks.reshape(2, -1, *self.cache.shape[3:])[:, :self.num_tokens]
        return kv[0], kv[1]


def dense_paged(q, seq: PagedSequence, scale: float) -> torch.Tensor:
    """Our dense paged path: gather through the block table, fp32 scores, softmax. q [Hq, D]"""
    k, v = seq.gather()
    group = NUM_Q_HEADS // NUM_KV_HEADS
    scores = torch.einsum("hgd,nhd->hgn", q.float().view(NUM_KV_HEADS, group, -1), k.float()) * scale
    return torch.einsum("hgn,nhd->hgd", scores.softmax(-1), v.float()).reshape(NUM_Q_HEADS, -1)


def sdpa(q, seq: PagedSequence, scale: float) -> torch.Tensor:
    """torch SDPA over the gathered cache (FlashAttention on CUDA; fp32 math on CPU, where
    bf16 SDPA runs a slow reference path)."""
    k, v = seq.gather()
    if not q.is_cuda:
        q, k, v = q.float(), k.float(), v.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=scale, enable_gqa=True)
    return out.squeeze(1)


def reference(q, keys, values, cfg: HSRConfig, scale: float) -> torch.Tensor:
    group = NUM_Q_HEADS // NUM_KV_HEADS
    k = keys.to(torch.bfloat16).double().repeat_interleave(group, 1)
    v = values.to(torch.bfloat16).double().repeat_interleave(group, 1)
    x = torch.einsum("hd,nhd->hn", q.double(), k) * scale
    if cfg.mode == "relu":
        w = torch.relu(x - cfg.bias) ** cfg.alpha
        w = w / w.sum(1, keepdim=True).clamp(min=1e-300)
    else:
        w = x.softmax(1)
    return torch.einsum("hn,nhd->hd", w, v)


def oracle_tokens(q, keys, cfg: HSRConfig, scale: float) -> float:
    """oracle_fractions averaged over KV heads, of the keys as the bf16 cache holds them."""
    return statistics.mean(oracle_fractions(q, keys.to(torch.bfloat16), cfg, scale))


def oracle_fractions(q, keys, cfg: HSRConfig, scale: float) -> list[float]:
    """Per KV head, the fraction of tokens an exact-score selector (fp64 scores) must read.

    softmax: seeds = sink + window + the seed_cells cells with the best exact scores; then skip
    the lowest-scoring other tokens while every head of the group keeps its dropped mass <= eps
    times the mass it keeps (the best certificate exact scores allow).
    relu: the tokens with a positive weight. topk: the same count HSR reads.
    """
    n, num_kv_heads = keys.shape[:2]
    k = keys.double()
    fractions = []
    for h in range(num_kv_heads):
        x = (k[:, h] @ q.double().view(num_kv_heads, -1, q.shape[-1])[h].T) * scale   # [N, G]
        if cfg.mode == "relu":
            fractions.append(float((x > cfg.bias).any(1).double().mean()))
            continue
        seeded = torch.zeros(n, dtype=torch.bool)
        seeded[:cfg.sink_tokens] = True
        seeded[max(0, n - cfg.window_tokens):] = True
        cells = -(-n // cfg.cell_size)
        cell_best = torch.full((cells * cfg.cell_size,), -math.inf, dtype=torch.float64)
        cell_best[:n] = x.amax(1)
        best_cells = cell_best.view(cells, -1).amax(1).topk(min(cfg.seed_cells, cells)).indices
        for c in best_cells.tolist():
            seeded[c * cfg.cell_size:(c + 1) * cfg.cell_size] = True
        m = x.amax(0)
        total = torch.exp(x - m).sum(0)                                                   # [G]
        rest = x[~seeded]
        order = rest.amax(1).argsort()
        dropped = torch.exp(rest[order] - m).cumsum(0)                                    # [N', G]
        # certified: every head's dropped mass is at most eps times the mass it keeps
        skipped = int((dropped <= cfg.eps * (total - dropped)).all(1).long().cumprod(0).sum())
        fractions.append((n - skipped) / n)
    return fractions


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median ms of `repeat` calls after a warm-up; on CUDA each timed between synchronisations."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def parse_mode(spec: str) -> HSRConfig:
    """MODE:VALUE[:CODE_BITS], e.g. softmax:1e-3, topk:1024:4 (code_bits defaults to HSRConfig's)."""
    mode, _, rest = spec.partition(":")
    value, _, bits = rest.partition(":")
    codes = {"code_bits": int(bits)} if bits else {}
    if mode == "softmax":
        return HSRConfig(mode="softmax", eps=float(value or 1e-3), **codes)
    if mode == "topk":
        return HSRConfig(mode="topk", budget_tokens=int(value or 1024), **codes)
    if mode == "relu":
        return HSRConfig(mode="relu", alpha=2, bias=float(value or 2.0), **codes)
    raise SystemExit(f"unknown mode {spec!r}: use softmax:EPS, topk:BUDGET or relu:BIAS, each with an optional "
                     f":CODE_BITS")


def record_key(r: dict, key: tuple) -> tuple:
    return tuple(r.get(k, DEFAULT_CODE_BITS) if k == "code_bits" else r[k] for k in key)


def setting(r: dict) -> str:
    """A record's mode and settings, e.g. 'topk k=1024' or 'topk k=1024 c4' (code bits other than the default)."""
    value = {"softmax": "eps={eps:g}", "topk": "k={budget_tokens}", "relu": "b={bias:g}"}[r["mode"]].format(**r)
    return f"{r['mode']} {value}{code_suffix(r)}"


def code_suffix(r: dict) -> str:
    """' c4' for a record with 4-bit codes; '' for the default width (or a record from before it was kept)."""
    bits = r.get("code_bits", DEFAULT_CODE_BITS)
    return "" if bits == DEFAULT_CODE_BITS else f" c{bits}"


def run_point(workload: str, context: int, batch: int, cfg: HSRConfig, repeat: int, device: torch.device) -> dict:
    keys, values, query = make_workload(workload, context, NUM_KV_HEADS, NUM_Q_HEADS, HEAD_DIM, seed=context)
    seq = PagedSequence(keys, values, cfg, device=device)
    # Row 0 takes the workload's query, the other rows small perturbations of it.
    gen = torch.Generator().manual_seed(context)
    queries = torch.stack([query] + [query + 0.1 * torch.randn(query.shape, generator=gen)
                                     for _ in range(batch - 1)])
    scale = 1 / math.sqrt(HEAD_DIM)
    table = seq.row.unsqueeze(0).expand(batch, -1)
    seq_lens = torch.full((batch,), context, device=device)
    q = queries.to(device, torch.bfloat16)

    def hsr():
        return hsr_decode(q, seq.cache, seq.layout, seq.summaries, table, seq_lens, cfg, scale)

    out, bound, stats = hsr()
    hsr_ms = timed(hsr, repeat, device)
    sdpa_ms = timed(lambda: [sdpa(q[b], seq, scale) for b in range(batch)], repeat, device)
    paged_ms = timed(lambda: [dense_paged(q[b], seq, scale) for b in range(batch)], repeat, device)
    dense_ms = min(sdpa_ms, paged_ms)
    if device.type == "cuda":
        k, v = (x.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1) for x in seq.gather())
        contiguous = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)
        dense_ms = min(dense_ms, timed(contiguous, repeat, device))
    out, bound, q = out.cpu(), bound.cpu(), q.cpu()
    errors, oracle = [], []
    for b in range(batch):
        ref = reference(q[b].float(), keys, values, cfg, scale)
        errors.append(float(((out[b].double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)).max()))
        if cfg.mode != "topk":
            oracle.append(oracle_tokens(q[b].float(), keys, cfg, scale))
    return {
        "context": context, "batch": batch, "workload": workload, "mode": cfg.mode,
        "eps": cfg.eps if cfg.mode == "softmax" else None,
        "budget_tokens": cfg.budget_tokens if cfg.mode == "topk" else None,
        "bias": cfg.bias if cfg.mode == "relu" else None, "code_bits": cfg.code_bits,
        "bytes_read_fraction": stats.bytes_read_fraction,
        "tokens_read_fraction": stats.keys_read / stats.dense_keys,
        "oracle_read_fraction": statistics.mean(oracle) if oracle else stats.keys_read / stats.dense_keys,
        "max_rel_error": max(errors), "max_error_bound": float(bound.max()),
        "hsr_ms": hsr_ms, "sdpa_ms": sdpa_ms, "dense_paged_ms": paged_ms, "dense_ms": dense_ms,
        "speedup": dense_ms / hsr_ms, "gbps": stats.bytes_read / hsr_ms / 1e6, "device": machine(),
        "kernels": kernel_path(device),
    }


HEADER = (f"{'workload':<11}{'ctx':>8}{'bs':>4} {'mode':<22}{'bytes':>8}{'tokens':>8}{'oracle':>8}"
          f"{'rel.err':>9}{'cert':>9}{'hsr ms':>9}{'dense ms':>9}{'speedup':>8}{'GB/s':>7}")


def format_row(r: dict) -> str:
    return (f"{r['workload']:<11}{r['context']:>8}{r['batch']:>4} {setting(r):<22}"
            f"{r['bytes_read_fraction']:>8.2%}{r['tokens_read_fraction']:>8.2%}{r['oracle_read_fraction']:>8.2%}"
            f"{r['max_rel_error']:>9.1e}{r['max_error_bound']:>9.1e}{r['hsr_ms']:>9.1f}{r['dense_ms']:>9.1f}"
            f"{r['speedup']:>7.2f}x{r['gbps']:>7.2f}")


def markdown(records: list[dict]) -> str:
    """The table as Markdown, with the machine it ran on."""
    head = ("| workload | context | batch | mode | bytes read | tokens read | oracle | max rel. error | "
            "certificate | HSR ms | dense ms | speedup |")
    rows = [f"Machine: {records[0]['device']}.", "", head, "|" + "---|" * 12]
    for r in records:
        rows.append(f"| {r['workload']} | {r['context']} | {r['batch']} | {setting(r)} | "
                    f"{r['bytes_read_fraction']:.1%} | {r['tokens_read_fraction']:.2%} | "
                    f"{r['oracle_read_fraction']:.2%} | {r['max_rel_error']:.1e} | {r['max_error_bound']:.1e} | "
                    f"{r['hsr_ms']:.1f} | {r['dense_ms']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(rows) + "\n"


def write_outputs(records: list[dict], json_path: Path, plot_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records, indent=1))
    json_path.with_suffix(".md").write_text(markdown(records))
    plot(records, plot_path)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')} and {plot_path}")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    def variant(r: dict) -> str:     # the mode, and the code bits where they are not the default
        return r["mode"] + code_suffix(r)
    kinds = sorted({(r["workload"], variant(r)) for r in records})
    colors = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    for (workload, mode), batch in sorted({((r["workload"], variant(r)), r["batch"]) for r in records}):
        pts = sorted((r for r in records if (r["workload"], variant(r), r["batch"]) == (workload, mode, batch)),
                     key=lambda r: r["context"])
        style = dict(color=colors[(workload, mode)], linestyle="-" if batch == 1 else "--", marker="o")
        label = f"{workload} {mode} b={batch}"
        axes[0].plot([p["context"] for p in pts], [100 * p["bytes_read_fraction"] for p in pts], label=label, **style)
        axes[1].plot([p["context"] for p in pts], [p["speedup"] for p in pts], label=label, **style)
        if mode.startswith("softmax"):
            axes[2].plot([p["context"] for p in pts],
                         [p["tokens_read_fraction"] / p["oracle_read_fraction"] for p in pts], label=label, **style)
    axes[0].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV bytes read, % of dense",
                title="HSR bytes read (keys+values+summaries+codes)")
    axes[1].set(xscale="log", xlabel="context (tokens)", ylabel="dense time / HSR time", title="speedup, same run")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[2].set(xscale="log", xlabel="context (tokens)", ylabel="tokens read / oracle's",
                title="softmax selection vs the exact-score oracle (target <= 1.5)")
    axes[2].axhline(1.5, color="gray", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle(records[0]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,16384,32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--modes", default="softmax:1e-3,topk:1024")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (Triton kernels against FlashAttention)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_decode.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "bench_decode.png")
    parser.add_argument("--merge", action="store_true",
                        help="keep the records already in --json, replacing those of the points run now")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite the table (.md) and plot from the records in --json")
    args = parser.parse_args(argv)
    if args.render_only:
        write_outputs(json.loads(args.json.read_text()), args.json, args.plot)
        return
    modes = [parse_mode(m) for m in args.modes.split(",")]
    points = [(w, c, b, m) for w in args.workloads.split(",") for c in map(int, args.contexts.split(","))
              for b in map(int, args.batches.split(",")) for m in modes]
    print(f"# {machine()}; {len(points)} points")
    print(HEADER, flush=True)
    key = ("workload", "context", "batch", "mode", "eps", "budget_tokens", "bias", "code_bits")
    kept = json.loads(args.json.read_text()) if args.merge and args.json.exists() else []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (workload, context, batch, cfg) in enumerate(points, 1):
        record = run_point(workload, context, batch, cfg, args.repeat, torch.device(args.device))
        records.append(record)
        print(format_row(record), f"  [{i}/{len(points)}]", flush=True)
        # after every point, so an interrupted run keeps what it measured (resume with --merge)
        fresh = {record_key(r, key) for r in records}
        args.json.write_text(json.dumps([r for r in kept if record_key(r, key) not in fresh] + records,
                                        indent=1))
    write_outputs(json.loads(args.json.read_text()), args.json, args.plot)


if __name__ == "__main__":
    main()
