"""Soak: `vllm-hsr serve` on loopback under concurrent, streamed, cancelled and over-long traffic.

    python benchmarks/soak.py [--model DIR] [--requests 400] [--concurrency 12] [--max-model-len 8192]
        [--max-seconds 3600] [--json benchmarks/results/soak.json]

HSR serves with eps=0 (softmax reading every key through its own path, dense_below_tokens=0), so
every completion must equal CPU_ATTN's. The workload is fixed by --seed: token-id prompts across
many KV blocks up to the model length (a share of them over a shared prefix, for prefix caching),
half of them streamed, a share of the streams cancelled after their first chunks, a few over the
model length (vLLM must answer 400). Greedy, `ignore_eos`, 4-32 tokens each.

Then every request that completed is sent again, one at a time, to a CPU_ATTN server, and the
texts compared. Pass: no 5xx and no failed connection, every over-length request got 400, the
server answers afterwards, resident memory after the run within --rss-margin of that after
warm-up, and every completion equal to CPU_ATTN's. Records: requests, errors by status,
cancelled, rss_before_mb, rss_after_mb, duration_s, identical_to_dense, with commit and command.
It stops by itself: after --requests, or --max-seconds (unsent requests are counted as such).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, provenance  # noqa: E402

from vllm_hsr.server import LocalServer  # noqa: E402

EXACT = {"mode": "softmax", "eps": 0, "dense_below_tokens": 0}
SHARED_PREFIX_SHARE, STREAM_SHARE, CANCEL_SHARE, OVER_LENGTH_SHARE = 0.3, 0.5, 0.3, 0.03


@dataclass
class Request:
    index: int
    prompt: list[int]
    max_tokens: int
    stream: bool
    cancel: bool           # a stream closed after its first chunks
    over_length: bool


def workload(count: int, max_model_len: int, vocab: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(max_model_len // 4)]
    requests = []
    for index in range(count):
        over = rng.random() < OVER_LENGTH_SHARE
        max_tokens = rng.randint(4, 32)
        length = max_model_len + rng.randint(1, 64) if over else rng.randint(1, max_model_len - max_tokens)
        shared = min(length // 2, len(prefix)) if rng.random() < SHARED_PREFIX_SHARE else 0
        prompt = prefix[:shared] + [rng.randrange(3, vocab) for _ in range(length - shared)]
        stream = rng.random() < STREAM_SHARE
        requests.append(Request(index, prompt, max_tokens, stream, stream and rng.random() < CANCEL_SHARE, over))
    return requests


def send(port: int, request: Request, timeout_s: float = 600) -> dict:
    """One request; -> {status, text (completed ones), cancelled}. Connection failures are status 0."""
    body = {"model": "model", "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": request.stream}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200 or not request.stream:
            payload = response.read()
            text = json.loads(payload)["choices"][0]["text"] if response.status == 200 else None
            return {"status": response.status, "text": text, "cancelled": False}
        pieces, chunks = [], 0
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunks += 1
            pieces.append(json.loads(line[6:])["choices"][0]["text"])
            if request.cancel and chunks >= 2:
                return {"status": 200, "text": None, "cancelled": True}     # closed mid-stream below
        return {"status": 200, "text": "".join(pieces), "cancelled": False}
    except OSError as error:
        return {"status": 0, "text": None, "cancelled": False, "error": repr(error)}
    finally:
        connection.close()


def rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants (the API server, engine core, worker)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    total_kb = 0
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total_kb / 1024


def server_args(max_model_len: int, backend: str) -> list[str]:
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len), "--seed", "0",
            "--enable-prefix-caching", "--attention-backend", backend]
    return args + (["--additional-config", json.dumps({"hsr": EXACT})] if backend == "HSR" else [])


def run(model: Path, count: int, concurrency: int, max_model_len: int, max_seconds: float, seed: int,
        log_dir: Path, vocab: int, rss_margin: float) -> dict:
    requests = workload(count, max_model_len, vocab, seed)
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    started = time.monotonic()
    results: dict[int, dict] = {}
    with LocalServer(model, log_dir / "soak_hsr.log", server_args(max_model_len, "HSR"), env=env) as server:
        warm = [r for r in requests if not r.over_length][:concurrency]
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda r: send(server.port, Request(-1, r.prompt, 4, False, False, False)), warm))
        rss_before = rss_mb(server.process.pid)
        deadline = time.monotonic() + max_seconds

        def one(request: Request) -> tuple[int, dict]:
            if time.monotonic() > deadline:
                return request.index, {"status": None, "text": None, "cancelled": False}     # not sent
            return request.index, send(server.port, request)
        with ThreadPoolExecutor(concurrency) as pool:
            for done, (index, result) in enumerate(pool.map(one, requests), 1):
                results[index] = result
                if done % max(1, count // 10) == 0:
                    print(f"[soak] {done}/{count} requests, {time.monotonic() - started:.0f} s", flush=True)
        time.sleep(2)                      # let cancelled requests be aborted and memory settle
        rss_after = rss_mb(server.process.pid)
        alive = server.complete("The capital of France is", max_tokens=4)["choices"][0]["text"] is not None
    duration = time.monotonic() - started
    completed = [r for r in requests if results[r.index]["status"] == 200 and results[r.index]["text"] is not None]
    mismatches = []
    with LocalServer(model, log_dir / "soak_dense.log", server_args(max_model_len, "CPU_ATTN"), env=env) as dense:
        for request in completed:
            want = send(dense.port, Request(request.index, request.prompt, request.max_tokens, False, False, False))
            if want["text"] != results[request.index]["text"]:
                mismatches.append(request.index)
    statuses = Counter(str(result["status"]) for result in results.values())
    over = [r for r in requests if r.over_length]
    record = {
        "model": str(model), "requests": count, "concurrency": concurrency, "max_model_len": max_model_len,
        "sent": sum(1 for result in results.values() if result["status"] is not None),
        "errors_by_status": {status: n for status, n in statuses.items() if status not in ("200", "None")},
        "over_length": len(over), "over_length_got_400": sum(results[r.index]["status"] == 400 for r in over),
        "streamed": sum(r.stream for r in requests), "cancelled": sum(res["cancelled"] for res in results.values()),
        "completed": len(completed), "identical_to_dense": len(completed) - len(mismatches),
        "mismatched_requests": mismatches[:20], "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1), "rss_margin": rss_margin, "answers_after": alive,
        "duration_s": round(duration, 1), **provenance(),
    }
    unexpected = {s: n for s, n in record["errors_by_status"].items() if s != "400"}
    record["passed"] = bool(
        not unexpected and record["over_length_got_400"] == len(over)
        and statuses.get("400", 0) == len(over) and not mismatches and alive
        and rss_after <= rss_before * (1 + rss_margin))
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".real-model"), help="model directory (built if it is "
                        "the default and missing)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop sending after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-margin", type=float, default=0.10, help="allowed growth of resident memory")
    parser.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    if args.model == Path(".real-model"):
        from vllm_hsr.real_model import build_real_model
        build_real_model(args.model)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as logs:
        record = run(args.model, args.requests, args.concurrency, args.max_model_len, args.max_seconds, args.seed,
                     Path(logs), vocab, args.rss_margin)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
