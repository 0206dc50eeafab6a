"""The benchmarks' command-line settings: what a mode spec selects and how a record is labelled."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402

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
