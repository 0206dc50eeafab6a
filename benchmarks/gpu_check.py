"""The Triton kernels on CUDA against their torch twins: summaries written by the Triton
update kernels against the CPU twin's, and decode (tree query + split decode) against the
torch twin over the same GPU tensors and a float64 dense reference.

    python benchmarks/gpu_check.py [--json PATH]

Cases cover GQA ratios, head sizes 64 and 128, ragged lengths with shuffled block
tables, fp32 and bf16 caches, 4- and 8-bit codes and every mode. Prints one line per
case and exits 1 if any fails; run by benchmarks/gpu_check.sh on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, provenance  # noqa: E402
from paged_cache import PagedBatch  # noqa: E402
from reference import dense64  # noqa: E402

from vllm_hsr import HSRConfig  # noqa: E402
from vllm_hsr.ops import hsr_decode  # noqa: E402

SEQ_LENS = (1, 37, 700, 2011, 4100)
CASES = [   # (num_kv_heads, group, head_dim, dtype, settings)
    (2, 4, 128, torch.bfloat16, dict(mode="topk", budget_tokens=256, code_bits=4)),
    (2, 4, 128, torch.bfloat16, dict(mode="softmax", eps=1e-2, code_bits=8)),
    (3, 3, 64, torch.float32, dict(mode="topk", budget_tokens=512, code_bits=4)),
    (3, 3, 64, torch.float32, dict(mode="softmax", eps=1e-2, code_bits=4)),
    (1, 8, 64, torch.float32, dict(mode="relu", bias=0.5, alpha=2, allow_relu_decode=True)),
    (2, 2, 64, torch.float32, dict(mode="softmax", eps=0.0)),
]


@contextlib.contextmanager
def kernels(path: str):
    """HSR_KERNELS=path inside the block, then as it was."""
    before = os.environ.get("HSR_KERNELS")
    os.environ["HSR_KERNELS"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["HSR_KERNELS"]
        else:
            os.environ["HSR_KERNELS"] = before


def complete_cell_codes_equal(cpu: PagedBatch, gpu: PagedBatch, cell_size: int) -> float:
    """The fraction of complete cells' token codes (the only ones written) that the two batches agree on."""
    same = total = 0
    for seq, n in enumerate(cpu.seq_lens):
        positions = torch.arange(n // cell_size * cell_size)
        blocks = cpu.block_table[seq].long()[positions // cpu.block_size]
        offsets = positions % cpu.block_size
        want = cpu.summaries.codes[blocks, offsets]                   # [tokens, kv heads, bytes]
        got = gpu.summaries.codes.cpu()[blocks, offsets]
        same, total = same + int((got == want).sum()), total + want.numel()
    return same / max(total, 1)


def run_case(num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype, settings: dict,
             device: str = "cuda", seq_lens: tuple[int, ...] = SEQ_LENS) -> dict:
    """One case; device "cpu" with TRITON_INTERPRET=1 runs the same checks in Triton's interpreter (tests)."""
    cfg = HSRConfig(**settings)
    seed = head_dim + group
    cpu = PagedBatch(seq_lens, num_kv_heads, head_dim, 16, cfg, seed=seed, dtype=dtype, summary_dtype=dtype)
    with kernels("torch"):
        cpu.fill()
    gpu = PagedBatch(seq_lens, num_kv_heads, head_dim, 16, cfg, seed=seed, dtype=dtype, summary_dtype=dtype,
                     device=device)
    with kernels("triton"):
        gpu.fill()
    summary_diff = float((gpu.summaries.boxes.cpu().float() - cpu.summaries.boxes.float()).abs().max())
    codes_equal = 1.0 if cfg.code_bits == 0 else complete_cell_codes_equal(cpu, gpu, cfg.cell_size)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(seed)).to(dtype)
    scale = head_dim ** -0.5
    lens = torch.tensor(seq_lens, device=device)
    results = {}
    for path in ("triton", "torch"):
        with kernels(path):
            out = hsr_decode(q.to(device), gpu.cache, gpu.layout, gpu.summaries, gpu.block_table, lens, cfg, scale)
        results[path] = (out[0].float().cpu(), out[1].cpu())
    (out, bound), (twin, twin_bound) = results["triton"], results["torch"]
    twin_diff = float((out - twin).abs().max())
    bound_diff = float((bound - twin_bound).abs().max())
    # the certificate holds against float64 dense attention (softmax), exact ReLU^alpha (relu)
    dense_mode = "relu" if cfg.mode == "relu" else "softmax"
    over = 0.0
    for seq in range(len(seq_lens)):
        for h in range(num_kv_heads):
            heads = slice(h * group, (h + 1) * group)
            k = cpu.keys[seq][:, h:h + 1].double()
            v = cpu.values[seq][:, h:h + 1].double()
            ref = dense64(q[seq, heads].double(), k, v, mode=dense_mode, scale=scale, alpha=cfg.alpha, bias=cfg.bias)
            err = ((out[seq, heads].double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30))
            if cfg.mode != "topk":
                allowed = 2 * bound[seq, heads].double() + (2e-2 if dtype == torch.bfloat16 else 1e-4)
                over = max(over, float((err - allowed).max()))
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    passed = (not torch.isnan(out).any() and twin_diff <= tolerance and bound_diff <= 1e-4 + 1e-3 * float(
        twin_bound.abs().max()) and over <= 0 and codes_equal >= 0.999
        and summary_diff <= (1e-2 if dtype == torch.bfloat16 else 1e-5))
    return dict(num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, dtype=str(dtype).split(".")[-1],
                settings=settings, max_abs_diff_vs_twin=twin_diff, max_certificate_diff=bound_diff,
                certificate_excess=over, box_max_diff=summary_diff, codes_equal_fraction=codes_equal,
                passed=bool(passed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    records = []
    for case in CASES:
        record = run_case(*case)
        records.append(dict(record, **provenance()))
        print(("ok  " if record["passed"] else "FAIL"), json.dumps(record), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1))
    return 0 if all(r["passed"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
