"""The benchmarks' command-line settings and bookkeeping: mode specs, record labels, repeated points."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402
import compare_backends  # noqa: E402

from vllm_hsr import HSRConfig  # noqa: E402


@pytest.mark.parametrize("spec, want", [
    ("softmax:1e-2", HSRConfig(mode="softmax", eps=1e-2)),
    ("topk:512", HSRConfig(mode="topk", budget_tokens=512)),
    ("topk:1024:4", HSRConfig(mode="topk", budget_tokens=1024, code_bits=4)),
    ("softmax::2", HSRConfig(mode="softmax", code_bits=2)),
    ("relu:0.5:0", HSRConfig(mode="relu", alpha=2, bias=0.5, code_bits=0)),
])
def test_mode_specs(spec, want):
    assert bench_decode.parse_mode(spec) == want


@pytest.mark.parametrize("spec", ["dense:1", "topk:1024:3"])
def test_bad_mode_specs_stop(spec):
    with pytest.raises((SystemExit, ValueError), match="mode|code_bits"):
        bench_decode.parse_mode(spec)


def test_labels_and_keys_name_code_bits_only_off_the_default():
    default = HSRConfig().code_bits
    old = {"mode": "topk", "budget_tokens": 1024, "eps": None, "bias": None}      # written before code_bits was
    assert bench_decode.setting(old) == bench_decode.setting({**old, "code_bits": default}) == "topk k=1024"
    assert bench_decode.setting({**old, "code_bits": 4}) == "topk k=1024 c4"
    key = ("mode", "budget_tokens", "code_bits")
    assert bench_decode.record_key(old, key) == ("topk", 1024, default)
    assert bench_decode.record_key({**old, "code_bits": 4}, key) != bench_decode.record_key(old, key)


def test_repeated_points_alternate_backends_and_record_medians(monkeypatch, tmp_path):
    order = []
    speeds = {"HSR": iter([10.0, 30.0, 20.0]), "CPU_ATTN": iter([5.0, 7.0, 6.0])}

    def fake_point(model, backend, input_len, args, log):
        order.append(backend)
        speed = next(speeds[backend])
        return {"backend": backend, "input_len": input_len, "output_len": args.output_len, "num_prompts": 1,
                "requests_per_s": speed / 100, "output_tokens_per_s": speed, "elapsed_s": 100 / speed,
                "prefill_s": 1.0, "decode_tokens_per_s": None if speed == 30.0 else 2 * speed, "tpot_ms": None,
                "device": "test"}
    monkeypatch.setattr(compare_backends, "run_point", fake_point)
    monkeypatch.setattr(compare_backends, "dense_backend", lambda: "CPU_ATTN")
    records = compare_backends.main(["--model", "m", "--input-lens", "512", "--repeats", "3",
                                     "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
                                     "--log", str(tmp_path / "r.log")])
    assert order == ["HSR", "CPU_ATTN", "CPU_ATTN", "HSR", "HSR", "CPU_ATTN"]
    hsr, dense = records
    assert (hsr["backend"], dense["backend"]) == ("HSR", "CPU_ATTN")
    assert hsr["output_tokens_per_s"] == 20.0 and dense["output_tokens_per_s"] == 6.0
    assert hsr["decode_tokens_per_s"] == 30.0            # the median of the runs that have one (20 and 40)
    assert hsr["repeats"] == 3 and [r["output_tokens_per_s"] for r in hsr["runs"]] == [10.0, 30.0, 20.0]
    assert compare_backends.spread(hsr) == "100%"
    assert "3.33x" in compare_backends.table(records).splitlines()[1]
    assert (tmp_path / "r.png").stat().st_size > 0


def test_repeats_below_one_stop():
    with pytest.raises(SystemExit):
        compare_backends.main(["--repeats", "0", "--render-only"])
