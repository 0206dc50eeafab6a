"""vLLM's throughput (and latency) benchmark: HSR against the dense backend, over input lengths.

    python benchmarks/compare_backends.py [--model DIR] [--input-lens 512,2048,8192,16384]
        [--output-len 128] [--num-prompts 4] [--hsr '{"mode": "softmax", "eps": 1e-2}']
        [--latency] [--warm-prefix] [--repeats N] [--json PATH] [--plot PATH] [--render-only]

Every point runs `vllm bench throughput` (random dataset, exact lengths) once per backend
through the `vllm-hsr` command line, in its own process, and once more with one output
token: that run is all prefill, so decode tok/s = prompts * (output_len - 1) / (elapsed -
prefill elapsed) isolates what HSR changes, and dense elapsed / dense prefill elapsed is the
ceiling of the output-throughput ratio any decode-side speedup can reach (Amdahl). With
--latency also `vllm bench latency` at batch size 1 for output_len and for 1 token, giving
the time per output token tpot = (latency(output_len) - latency(1)) / (output_len - 1). The
dense baseline is FLASH_ATTN on CUDA and CPU_ATTN on CPU. Without --model the tiny local
model is built. --repeats N runs every point N times, in rounds that alternate which backend goes
first (so a machine's drift falls on both), and records the median of each measure with its runs.

--warm-prefix measures decode instead in one engine per backend (warm_decode.py): the prompts are
prefilled once, and each of --repeats rounds re-runs them on vLLM's prefix cache with one output
token and with output_len, so decode tok/s (all prompts) and tpot (the first prompt alone) come
from a difference of two short runs rather than of two runs that are mostly prefill. Its records
hold decode_tokens_per_s, tpot_ms and prefill_s (the one cold prefill); no output tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, dense_backend, machine, provenance
from warm_decode import KV_CACHE_GIB

from vllm_hsr import HSRConfig

LATENCY_PROMPT_IDS = 10240   # `vllm bench latency` draws dummy prompt token ids from [0, 10000)
MEASURES = ("requests_per_s", "output_tokens_per_s", "elapsed_s", "prefill_s", "decode_tokens_per_s", "tpot_ms")


def _vllm(args: list[str], log: Path) -> dict:
    """Run one `vllm-hsr bench ...` command; returns its --output-json record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
        with open(log, "a") as log_file:
            log_file.write(f"\n$ vllm-hsr {' '.join(args)}\n")
            log_file.flush()
            run = subprocess.run([sys.executable, "-m", "vllm_hsr.cli", *args, "--output-json", str(out)],
                                 stdout=log_file, stderr=subprocess.STDOUT, env=env)
        if run.returncode != 0 or not out.exists():
            raise RuntimeError(f"vllm-hsr {' '.join(args[:2])} failed (exit {run.returncode}); see {log}")
        return json.loads(out.read_text())


def point_fields(backend: str, input_len: int, args) -> dict:
    """What every record of a point says besides its measures: the point, the settings, provenance."""
    return {
        "backend": backend, "input_len": input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
        "hsr_mode": HSRConfig.from_mapping(json.loads(args.hsr)).mode if backend == "HSR" else None,
        "hsr_settings": json.loads(args.hsr) if backend == "HSR" else None, **provenance(),
        # vllm-hsr's engine commands default it to 1 for every backend (transparent huge pages for the KV cache)
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
    }


def run_point(model: str, backend: str, input_len: int, args, log: Path) -> dict:
    engine = ["--model", model, "--attention-backend", backend, "--dtype", args.dtype, "--enforce-eager",
              "--max-model-len", str(input_len + args.output_len + 16), "--seed", "0"]
    if backend == "HSR":
        engine += ["--additional-config", json.dumps({"hsr": json.loads(args.hsr)})]

    def throughput(output_len: int) -> dict:
        return _vllm(["bench", "throughput", *engine, "--dataset-name", "random", "--random-input-len",
                      str(input_len), "--random-output-len", str(output_len), "--num-prompts",
                      str(args.num_prompts)], log)
    full, prefill = throughput(args.output_len), throughput(1)
    decode_s = full["elapsed_time"] - prefill["elapsed_time"]
    record = {
        **point_fields(backend, input_len, args), "requests_per_s": full["requests_per_second"],
        "output_tokens_per_s": full["num_requests"] * args.output_len / full["elapsed_time"],
        "elapsed_s": full["elapsed_time"], "prefill_s": prefill["elapsed_time"],
        "decode_tokens_per_s": full["num_requests"] * (args.output_len - 1) / decode_s if decode_s > 0 else None,
        "tpot_ms": None,
    }
    if args.latency:
        def latency(output_len: int) -> float:
            return _vllm(["bench", "latency", *engine, "--input-len", str(input_len), "--output-len",
                          str(output_len), "--batch-size", "1", "--num-iters-warmup", "1",
                          "--num-iters", "3"], log)["avg_latency"]
        record["tpot_ms"] = 1000 * (latency(args.output_len) - latency(1)) / (args.output_len - 1)
    return record


def warm_runs(model: str, backend: str, input_len: int, args, log: Path) -> list[dict]:
    """The --warm-prefix records of one backend at one input length, one per repeat (all in one engine)."""
    command = [sys.executable, str(Path(__file__).with_name("warm_decode.py")), "--model", model, "--backend",
               backend, "--input-len", str(input_len), "--output-len", str(args.output_len), "--num-prompts",
               str(args.num_prompts), "--repeats", str(args.repeats), "--dtype", args.dtype]
    if backend == "HSR":
        command += ["--hsr", args.hsr]
    with open(log, "a") as log_file:
        log_file.write(f"\n$ {' '.join(command)}\n")
        log_file.flush()
        run = subprocess.run(command, stdout=subprocess.PIPE, stderr=log_file, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"warm_decode.py ({backend}, input {input_len}) failed (exit {run.returncode}); see {log}")
    result = json.loads(lines[-1][len("RESULT "):])
    record = {**point_fields(backend, input_len, args), "method": "warm-prefix", **{key: None for key in MEASURES},
              "prefill_s": result["prefill_s"]}
    return [dict(record, **run) for run in result["runs"]]


def combine(runs: list[dict]) -> dict:
    """One record from the repeated runs of a point: each measure's median, the runs' measures kept."""
    record = dict(runs[0])
    for key in MEASURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        record[key] = statistics.median(values) if values else None
    record["repeats"] = len(runs)
    record["runs"] = [{key: r.get(key) for key in MEASURES} for r in runs]
    return record


def spread(record: dict) -> str:
    """The range of the runs' output tok/s around their median, in percent ('-' for a single run)."""
    key = "output_tokens_per_s" if record.get("output_tokens_per_s") else "decode_tokens_per_s"
    values = [r[key] for r in record.get("runs", []) if r.get(key)]
    if len(values) < 2:
        return "-"
    return f"{100 * (max(values) - min(values)) / record[key]:.0f}%"


def table(records: list[dict]) -> str:
    """One row per point; ratios against the dense backend at the same input length. The dense row's
    ceiling is the best output-throughput ratio a decode-only change could give there; `spread` is the
    range of a repeated point's output tok/s (decode tok/s for --warm-prefix records)."""
    rows = [f"{'backend':<10}{'input':>7}{'output':>7}{'req/s':>9}{'out tok/s':>11}{'vs dense':>10}"
            f"{'decode tok/s':>14}{'vs dense':>10}{'tpot ms':>9}{'ceiling':>9}{'spread':>8}"]
    dense = {r["input_len"]: r for r in records if r["backend"] != "HSR"}

    def ratio(r: dict, key: str) -> str:
        base = dense.get(r["input_len"])
        if not base or r.get(key) is None or not base.get(key):
            return "-"
        return f"{r[key] / base[key]:.2f}x"

    def number(r: dict, key: str, digits: int) -> str:
        return f"{r[key]:.{digits}f}" if r.get(key) is not None else "-"

    for r in records:
        tpot = number(r, "tpot_ms", 2)
        decode = f"{r['decode_tokens_per_s']:.1f}" if r.get("decode_tokens_per_s") else "-"
        ceiling = (f"{r['elapsed_s'] / r['prefill_s']:.2f}x" if r["backend"] != "HSR" and r.get("prefill_s")
                   and r.get("elapsed_s") else "-")
        rows.append(f"{r['backend']:<10}{r['input_len']:>7}{r['output_len']:>7}{number(r, 'requests_per_s', 3):>9}"
                    f"{number(r, 'output_tokens_per_s', 1):>11}{ratio(r, 'output_tokens_per_s'):>10}{decode:>14}"
                    f"{ratio(r, 'decode_tokens_per_s'):>10}{tpot:>9}{ceiling:>9}{spread(r):>8}")
    return "\n".join(rows)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    warm = any(r.get("method") == "warm-prefix" for r in records)
    panels = ((("tpot_ms", "ms per output token, one request"), ("decode_tokens_per_s", "decode tokens / s"))
              if warm else (("output_tokens_per_s", "output tokens / s (whole run)"),
                            ("decode_tokens_per_s", "decode tokens / s (prefill run subtracted)")))
    for ax, (key, label) in zip(axes, panels):
        for backend in sorted({r["backend"] for r in records}):
            pts = sorted((r for r in records if r["backend"] == backend and r.get(key)), key=lambda r: r["input_len"])
            values = [[run[key] for run in p.get("runs", []) if run.get(key)] or [p[key]] for p in pts]
            below = [p[key] - min(v) for p, v in zip(pts, values)]
            above = [max(v) - p[key] for p, v in zip(pts, values)]
            ax.errorbar([p["input_len"] for p in pts], [p[key] for p in pts], yerr=[below, above], fmt="o-",
                        capsize=3, label=backend)
        ax.set(xscale="log", yscale="log", xlabel="input tokens per request", ylabel=label)
        ax.legend()
    hsr = next((r["hsr_settings"] for r in records if r.get("hsr_settings") is not None), None)
    repeats = max(r.get("repeats", 1) for r in records)
    repeated = f", median and range of {repeats} runs" if repeats > 1 else ""
    method = "decode on a warm prefix cache" if warm else "vllm bench throughput"
    fig.suptitle(f"{method}, {records[0]['output_len']} output tokens, {records[0]['num_prompts']} "
                 f"prompts{repeated}; HSR {json.dumps(hsr) if hsr else 'defaults'}\n{records[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the tiny local model)")
    parser.add_argument("--input-lens", default="512,2048,8192,16384")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hsr", default="{}",
                        help="HSR settings (JSON; default {}: HSR's defaults, as `vllm serve --attention-backend HSR` "
                             "runs it)")
    parser.add_argument("--latency", action="store_true", help="also measure the time per output token")
    parser.add_argument("--warm-prefix", action="store_true",
                        help="decode on a warm prefix cache, one engine per backend (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per point; the records hold their medians")
    parser.add_argument("--json", type=Path, default=RESULTS / "compare_backends.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "compare_backends.png")
    parser.add_argument("--log", type=Path, default=RESULTS / "compare_backends.log")
    parser.add_argument("--render-only", action="store_true", help="run nothing: redraw --plot from --json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the records already in --json, replacing those of the points run now")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    if args.render_only:
        records = json.loads(args.json.read_text())
        print(table(records))
        plot(records, args.plot)
        return records
    model = args.model
    if model is None:
        from vllm_hsr.tiny_model import build_tiny_model
        model = str(build_tiny_model(Path(".tiny-model/bench"), max_position=32768, vocab_size=LATENCY_PROMPT_IDS))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    if not args.merge:
        args.log.write_text("")
    input_lens = [int(x) for x in args.input_lens.split(",")]
    backends = ("HSR", dense_backend())
    rounds = 1 if args.warm_prefix else args.repeats        # warm_decode.py repeats inside its engine
    points = [(round_, n, b) for round_ in range(rounds) for n in input_lens
              for b in (backends if round_ % 2 == 0 else backends[::-1])]
    runs: dict[tuple[str, int], list[dict]] = {}
    for i, (round_, input_len, backend) in enumerate(points, 1):
        start = time.monotonic()
        repeat = f" run {round_ + 1}/{rounds}" if rounds > 1 else ""
        print(f"[{i}/{len(points)}] {backend} input {input_len} output {args.output_len}{repeat} ...", end=" ",
              flush=True)
        if args.warm_prefix:
            runs[(backend, input_len)] = warm_runs(model, backend, input_len, args, args.log)
            speed = statistics.median(r["decode_tokens_per_s"] for r in runs[(backend, input_len)])
            print(f"{speed:.1f} decode tok/s ({time.monotonic() - start:.0f}s)", flush=True)
            continue
        record = run_point(model, backend, input_len, args, args.log)
        runs.setdefault((backend, input_len), []).append(record)
        print(f"{record['output_tokens_per_s']:.1f} out tok/s ({time.monotonic() - start:.0f}s)", flush=True)
    records = [combine(runs[(b, n)]) for n in input_lens for b in backends]
    if args.merge and args.json.exists():
        ran = {(r["backend"], r["input_len"], r["output_len"]) for r in records}
        kept = [r for r in json.loads(args.json.read_text())
                if (r["backend"], r["input_len"], r["output_len"]) not in ran]
        records = sorted(kept + records, key=lambda r: (r["input_len"], r["backend"] != "HSR"))
    print(f"\n# {machine()}; HSR settings {args.hsr}\n" + table(records))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1))
    plot(records, args.plot)
    print(f"wrote {args.json}, {args.plot} (log: {args.log})")
    return records


if __name__ == "__main__":
    main()
