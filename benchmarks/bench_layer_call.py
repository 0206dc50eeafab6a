"""One attention layer's decode call as vLLM's engine makes it: CPU_ATTN's impl against HSR's, same paged cache.

    python benchmarks/bench_layer_call.py [--contexts 1024,2048,4096,8192,16384,32768] [--batch 4]
        [--hsr '{"mode": "topk", "budget_tokens": 1024, "code_bits": 4}'] [--workload random]
        [--threads 1] [--repeat 15] [--json PATH] [--plot PATH]
    python benchmarks/bench_layer_call.py --workload real --contexts 2048,4096,7500 --batch 8

What compare_backends measures inside the engine, without the engine's other ~8 ms per step: per
context length, a batch of decode rows (one query each) over a cache paged as vLLM pages it for the
HSR backend (block size 128, the CPU platform's default; every page padded for its summaries, blocks
in a shuffled order), filled through CPU_ATTN's own cache-write op, with the summaries built by the
HSR impl's forward as the engine's prefill would. Each repeat calls both impls once, alternating
which goes first; times are medians. The default shape is the tiny model's (4 query heads, 2 KV
heads, head size 64, float32) and one thread: on a 2-core machine vLLM's worker gets one core (the
other is reserved for the engine process).

Left out, as in neither impl's call: the step's KV write, and HSR's summary write plan and the summary update
of a cell the step fills (once in 16 steps per row, ~0.06 ms per layer). CPU_ATTN reads HSR's padded pages
here, as it does for dense rows inside the HSR backend; the CPU_ATTN-only engine's pages are unpadded.

--workload real: SmolLM2-135M's own keys, values and decode queries (benchmarks/real_attention.py): one
haystack of the shipped text goes through the model once; batch row r takes layer SAMPLE_LAYERS[r % 8]
(12, 17, 21, 25, 29, 0, 4, 8: batch 1 is a middle layer, batch 8 all eight) and, at context C, its keys and values up to C and its query at position C - 1
(the model is causal, so that is a decode row of context C). The shape is the model's: 9 query / 3 KV heads,
head size 64.

Columns: the two times, speedup (CPU_ATTN / HSR), HSR's bytes read (keys, values, summaries, codes)
and tokens read as fractions of dense, and each path's GB/s from the bytes it read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

if __name__ == "__main__":   # as `vllm-hsr` sets it for the engine (README); read when torch's allocator starts
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, provenance  # noqa: E402
from workloads import WORKLOADS, make_workload  # noqa: E402

import real_attention  # noqa: E402

from vllm_hsr import HSRConfig, _vllm  # noqa: E402
from vllm_hsr.backend import HSRMetadata, compose  # noqa: E402
from vllm_hsr.core.paged import page_layout, summary_dtype  # noqa: E402
from vllm_hsr.stats import DecodeStatsLog  # noqa: E402

BLOCK_SIZE = 128          # vLLM's CPU platform default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_HSR: dict = {}      # HSRConfig's defaults, as vLLM resolves them for this block size
REAL_SHAPE = dict(num_heads=9, num_kv_heads=3, head_dim=64)     # SmolLM2-135M
REAL_MARGIN = 256         # the real haystack is asked for this many tokens beyond the longest context
WRITE_CHUNK = 8192        # tokens per summary write while filling the cache (a prefill chunk)


class LayerCall:
    """One layer's paged KV cache holding `batch` sequences of `context` tokens, and both impls over it."""

    def __init__(self, context: int, batch: int, hsr: dict, workload: str, num_heads: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, real_haystack: int = 0):
        cfg = resolved(hsr)
        settings = dict(num_heads=num_heads, head_size=head_dim, scale=head_dim ** -0.5, num_kv_heads=num_kv_heads,
                        alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None)
        config = _vllm.VllmConfig()
        config.additional_config = {"hsr": dict(hsr, dense_below_tokens=0)}
        config.model_config = types.SimpleNamespace(dtype=dtype)     # all CPU_ATTN's impl reads of it
        with _vllm.set_current_vllm_config(config):
            self.dense = _vllm.dense_partner("CPU_ATTN")[2](**settings)
            self.hsr = compose("CPU_ATTN").get_impl_cls()(**settings)
        self.hsr.stats_log = DecodeStatsLog()
        self.layer = types.SimpleNamespace(isa=_vllm.cpu_attn_isa(dtype, BLOCK_SIZE, head_dim),
                                           _k_scale_float=1.0, _v_scale_float=1.0)
        blocks_per_seq = -(-context // BLOCK_SIZE)
        num_blocks = 1 + batch * blocks_per_seq                          # block 0: vLLM's null block
        dense_page = num_kv_heads * BLOCK_SIZE * 2 * head_dim * dtype.itemsize
        copy_keys = cfg.copies_keys(partner_scatters_keys=True)
        page = page_layout(dense_page, BLOCK_SIZE, num_kv_heads, head_dim, cfg, summary_dtype(cfg, dtype),
                           dtype if copy_keys else None).end
        storage = torch.zeros(num_blocks * page // dtype.itemsize, dtype=dtype)
        self.kv_cache = storage.as_strided((num_blocks, num_kv_heads, BLOCK_SIZE, 2 * head_dim),
                                           (page // dtype.itemsize, BLOCK_SIZE * 2 * head_dim, 2 * head_dim, 1))
        gen = torch.Generator().manual_seed(context)
        self.block_table = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(batch, blocks_per_seq).int()
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32)
        queries = []
        for row in range(batch):
            if workload == "real":
                keys, values, query = real_attention.decode_row(row, context, real_haystack)
            else:
                keys, values, query = make_workload(workload, context, num_kv_heads, num_heads, head_dim, seed=row)
            positions = torch.arange(context)
            slots = self.block_table[row].long()[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
            for start in range(0, context, WRITE_CHUNK):
                part = slice(start, start + WRITE_CHUNK)
                self.dense.do_kv_cache_update(self.layer, keys[part].to(dtype), values[part].to(dtype),
                                              self.kv_cache, slots[part])
                no_tokens = torch.zeros(0, num_heads, head_dim, dtype=dtype)
                self.hsr.forward(self.layer, no_tokens, None, None, self.kv_cache, HSRMetadata(
                    num_actual_tokens=0, num_decode_tokens=0, slot_mapping=slots[part], positions=positions[part],
                    token_rows=torch.full_like(positions[part], row), block_table=self.block_table,
                    seq_lens=self.seq_lens, sparse_rows=torch.zeros(0, dtype=torch.long),
                    dense_rows=torch.zeros(0, dtype=torch.long)), no_tokens)
            queries.append(query)
        self.query = torch.stack(queries).to(dtype)                      # [batch, num_heads, head_dim]
        # one output per impl, poisoned: an element either leaves unwritten stays NaN
        self.dense_output = torch.full_like(self.query, math.nan)
        self.hsr_output = torch.full_like(self.query, math.nan)
        # The step's token is already in the cache (vLLM writes KV before attention) and fills no cell.
        self.hsr_metadata = HSRMetadata(
            num_actual_tokens=batch, num_decode_tokens=batch, slot_mapping=torch.zeros(0, dtype=torch.long),
            positions=torch.zeros(0, dtype=torch.long), token_rows=torch.zeros(0, dtype=torch.long),
            block_table=self.block_table, seq_lens=self.seq_lens, sparse_rows=torch.arange(batch),
            dense_rows=torch.zeros(0, dtype=torch.long))
        starts = torch.arange(batch + 1, dtype=torch.int32)
        self.dense_metadata = _vllm.CPUAttentionMetadata(
            num_actual_tokens=batch, max_query_len=1, query_start_loc=starts, max_seq_len=context,
            seq_lens=self.seq_lens, block_table=self.block_table, slot_mapping=torch.zeros(batch, dtype=torch.long),
            scheduler_metadata=_vllm.cpu_attn_get_scheduler_metadata(
                num_reqs=batch, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                seq_lens=self.seq_lens, dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=-1,
                isa=self.layer.isa, enable_kv_split=_vllm.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype="auto"),
            causal=True)

    def dense_step(self) -> torch.Tensor:
        return self.dense.forward(self.layer, self.query, None, None, self.kv_cache, self.dense_metadata,
                                  self.dense_output)

    def hsr_step(self) -> torch.Tensor:
        return self.hsr.forward(self.layer, self.query, None, None, self.kv_cache, self.hsr_metadata, self.hsr_output)


def timed_pair(first, second, repeat: int) -> tuple[float, float]:
    """Median ms of each, over `repeat` rounds that alternate which runs first."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(repeat):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            (first, second)[which]()
            times[which].append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def run_point(context: int, batch: int, settings: dict, args) -> dict:
    dtype = DTYPES[args.dtype]
    call = LayerCall(context, batch, settings, args.workload, args.num_heads, args.num_kv_heads, args.head_dim,
                     dtype, args.real_haystack)
    dense = call.dense_step().clone()
    hsr = call.hsr_step().clone()                  # the first calls also warm both up
    for name, out in (("CPU_ATTN", dense), ("HSR", hsr)):
        if out.isnan().any():
            raise RuntimeError(f"{name} left output elements unwritten at context {context}")
    call.hsr.stats_log = stats = DecodeStatsLog()
    call.hsr_step()
    totals = dict(stats.totals)
    dense_ms, hsr_ms = timed_pair(call.dense_step, call.hsr_step, args.repeat)
    dense_bytes = totals["dense_bytes"]
    relative = ((hsr.double() - dense.double()).norm(dim=-1) / dense.double().norm(dim=-1)).max()
    return {
        "context": context, "batch": batch, "workload": args.workload, "hsr_settings": settings,
        "cell_size": call.hsr.hsr.cell_size,
        "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "block_size": BLOCK_SIZE,
        "cpu_attn_ms": dense_ms, "hsr_ms": hsr_ms, "speedup": dense_ms / hsr_ms,
        "bytes_read_fraction": totals["bytes_read"] / dense_bytes,
        "tokens_read_fraction": totals["keys_read"] / totals["dense_keys"],
        "max_error_bound": totals["max_error_bound"], "max_rel_diff_vs_cpu_attn": float(relative),
        "cpu_attn_gbps": dense_bytes / dense_ms / 1e6, "hsr_gbps": totals["bytes_read"] / hsr_ms / 1e6,
        **provenance(), "repeat": args.repeat,
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


HEADER = (f"{'setting':>30}{'ctx':>7}{'batch':>6}{'CPU_ATTN ms':>12}{'HSR ms':>9}{'speedup':>9}{'bytes':>8}{'tokens':>8}"
          f"{'cert':>10}{'diff':>10}{'dense GB/s':>11}{'HSR GB/s':>9}")


def format_row(r: dict) -> str:
    return (f"{setting_label(r):>30}{r['context']:>7}{r['batch']:>6}{r['cpu_attn_ms']:>12.3f}{r['hsr_ms']:>9.3f}{r['speedup']:>8.2f}x"
            f"{r['bytes_read_fraction']:>8.1%}{r['tokens_read_fraction']:>8.1%}{r['max_error_bound']:>10.2e}"
            f"{r['max_rel_diff_vs_cpu_attn']:>10.2e}{r['cpu_attn_gbps']:>11.1f}{r['hsr_gbps']:>9.1f}")


def resolved(hsr: dict) -> HSRConfig:
    """The settings as the engine's impl resolves them on BLOCK_SIZE-token blocks (an unset cell_size follows)."""
    return HSRConfig.from_vllm({"hsr": hsr}, block_size=BLOCK_SIZE)


def setting_label(r: dict) -> str:
    """A record's settings, e.g. 'topk 512, 4-bit, cell 64' (records from before the cell size was kept: 16)."""
    cfg = resolved(r["hsr_settings"])
    what = f"eps={cfg.eps:g}" if cfg.mode == "softmax" else f"{cfg.budget_tokens}" if cfg.mode == "topk" else ""
    return f"{cfg.mode} {what}, {cfg.code_bits}-bit, cell {r.get('cell_size', 16)}".replace(" ,", ",")


def title(records: list[dict]) -> str:
    r = records[0]
    return (f"{r['device']}; {r['threads']} thread(s); {r['workload']} keys, "
            f"{r['num_heads']}/{r['num_kv_heads']} heads, d={r['head_dim']}, {r['dtype']}; commit {r.get('commit')}")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (times, ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        series.setdefault((json.dumps(r["hsr_settings"], sort_keys=True), r["batch"]), []).append(r)
    batches = sorted({r["batch"] for r in records})
    for batch in batches:       # CPU_ATTN once per batch size (its calls do not depend on HSR's settings)
        dense = {r["context"]: r["cpu_attn_ms"] for r in records if r["batch"] == batch}
        times.plot(list(dense), list(dense.values()), "k--", marker=".", label=f"CPU_ATTN, batch {batch}")
    for i, ((settings, batch), rs) in enumerate(series.items()):
        contexts = [r["context"] for r in rs]
        name = f"{setting_label(rs[0])}, batch {batch}"
        times.plot(contexts, [r["hsr_ms"] for r in rs], "o-", color=f"C{i}", label=f"HSR {name}")
        ratio.plot(contexts, [r["speedup"] for r in rs], "o-", color=f"C{i}", label=f"{name}: time")
        ratio.plot(contexts, [1 / r["bytes_read_fraction"] for r in rs], "s:", color=f"C{i}", alpha=0.6,
                   label=f"{name}: dense bytes / HSR bytes")
    times.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per layer call (median)",
              title="one decode layer call")
    times.legend(fontsize=7)
    ratio.axhline(1.0, color="gray", lw=0.8)
    ratio.set(xscale="log", yscale="log", xlabel="context (tokens)", title="CPU_ATTN / HSR, same run")
    ratio.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ratio.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ratio.legend(fontsize=6)
    fig.suptitle(title(records), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--batch", default="4", help="batch sizes, comma-separated")
    parser.add_argument("--hsr", type=json.loads, action="append", help="HSR settings (JSON, as in vLLM's "
                        "--additional-config hsr; repeat for several; default " + json.dumps(DEFAULT_HSR) +
                        "); dense_below_tokens is set to 0 here")
    parser.add_argument("--workload", choices=(*WORKLOADS, "real"), default="random")
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_layer_call.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "bench_layer_call.png")
    args = parser.parse_args(argv)
    settings = args.hsr or [DEFAULT_HSR]
    for hsr in settings:
        HSRConfig.from_mapping(hsr)                  # a bad setting stops here, naming it
    batches = [int(b) for b in args.batch.split(",")]
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    args.real_haystack = 0
    if args.workload == "real":
        vars(args).update(REAL_SHAPE)
        args.real_haystack = min(max(contexts) + REAL_MARGIN, 8192)
        start = time.perf_counter()
        real_attention.decode_rows(args.real_haystack)
        print(f"# real workload: layers {real_attention.SAMPLE_LAYERS} of SmolLM2-135M captured in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    points = [(hsr, batch, context) for hsr in settings for batch in batches for context in contexts]
    print(f"# {machine()}; {args.threads} thread(s); {args.workload} workload; {len(points)} points")
    print(HEADER, flush=True)
    records = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for i, (hsr, batch, context) in enumerate(points, 1):
        records.append(run_point(context, batch, hsr, args))
        print(format_row(records[-1]), f"  [{i}/{len(points)}]", flush=True)
        args.json.write_text(json.dumps(records, indent=1))     # after every point: an interrupted run keeps it
    plot(records, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return records


if __name__ == "__main__":
    main()
