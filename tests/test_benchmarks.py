"""The benchmarks' command-line settings and bookkeeping: mode specs, record labels, repeated points; the
layer-call benchmark end to end at small contexts."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402
import bench_layer_call  # noqa: E402
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
    default = bench_decode.DEFAULT_CODE_BITS
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
    assert_drawn(tmp_path / "r.png")


def test_warm_prefix_runs_one_engine_per_backend_and_records_its_repeats(monkeypatch, tmp_path):
    commands = []
    runs = {"HSR": [(30.0, 80.0), (33.0, 90.0), (31.0, 70.0)], "CPU_ATTN": [(20.0, 100.0), (10.0, 120.0), (15.0, 110.0)]}

    real_run = compare_backends.subprocess.run

    def fake_run(command, **kwargs):         # the engines; git (the records' provenance) runs for real
        if "warm_decode.py" not in str(command[1]):
            return real_run(command, **kwargs)
        commands.append(command)
        backend = command[command.index("--backend") + 1]
        result = {"prefill_s": 300.0, "runs": [{"decode_tokens_per_s": d, "tpot_ms": t, "batch_decode_s": 1.0}
                                               for d, t in runs[backend]]}
        return type("Done", (), {"returncode": 0, "stdout": "noise\nRESULT " + json.dumps(result) + "\n"})()
    monkeypatch.setattr(compare_backends.subprocess, "run", fake_run)
    monkeypatch.setattr(compare_backends, "dense_backend", lambda: "CPU_ATTN")
    records = compare_backends.main(["--model", "m", "--input-lens", "7600", "--repeats", "3", "--warm-prefix",
                                     "--json", str(tmp_path / "r.json"),
                                     "--plot", str(tmp_path / "r.png"), "--log", str(tmp_path / "r.log")])
    assert len(commands) == 2                              # the repeats run inside each engine
    assert all(c[c.index("--repeats") + 1] == "3" for c in commands)
    assert "--hsr" in commands[0] and "--hsr" not in commands[1]
    assert commands[0][commands[0].index("--hsr") + 1] == "{}"      # by default HSR's own defaults
    hsr, dense = records
    assert hsr["hsr_settings"] == {} and dense["hsr_settings"] is None
    assert hsr["method"] == dense["method"] == "warm-prefix"
    assert (hsr["decode_tokens_per_s"], hsr["tpot_ms"]) == (31.0, 80.0)       # medians of the repeats
    assert (dense["decode_tokens_per_s"], dense["tpot_ms"]) == (15.0, 110.0)
    assert hsr["repeats"] == 3 and hsr["output_tokens_per_s"] is None and hsr["prefill_s"] == 300.0
    row = compare_backends.table(records).splitlines()[1]
    assert "2.07x" in row and "80.00" in row               # decode tok/s against dense's, and tpot
    assert compare_backends.spread(hsr) == "10%"
    assert_drawn(tmp_path / "r.png")


def test_warm_prefix_failure_names_the_log(monkeypatch, tmp_path):
    real_run = compare_backends.subprocess.run
    monkeypatch.setattr(compare_backends.subprocess, "run", lambda command, **kwargs: type(
        "Done", (), {"returncode": 1, "stdout": ""})() if "warm_decode.py" in str(command[1])
        else real_run(command, **kwargs))
    monkeypatch.setattr(compare_backends, "dense_backend", lambda: "CPU_ATTN")
    with pytest.raises(RuntimeError, match="warm_decode.py .*r.log"):
        compare_backends.main(["--model", "m", "--input-lens", "512", "--warm-prefix", "--json",
                               str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
                               "--log", str(tmp_path / "r.log")])


def assert_drawn(path):
    """A PNG that holds a drawing: it decodes, and more than a sliver of it is neither background nor one colour."""
    from matplotlib.image import imread
    pixels = imread(path)[..., :3]                          # [height, width, RGB] in [0, 1]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    inked = (pixels < 0.9).any(axis=-1)                     # not white: axes, text, lines, bars
    assert 0.01 < inked.mean() < 0.9
    colours = {tuple(p) for p in (pixels[inked] * 8).astype(int).tolist()}
    assert len(colours) >= 3                                # black ink plus at least two series colours


def test_repeats_below_one_stop():
    with pytest.raises(SystemExit):
        compare_backends.main(["--repeats", "0", "--render-only"])


def test_layer_call_pairs_alternate_and_give_medians(monkeypatch):
    calls, clock = [], [0.0]
    took = {"dense": iter([0.004, 0.001, 0.002]), "hsr": iter([0.010, 0.030, 0.020])}    # seconds per call

    def fake(name):
        def call():
            calls.append(name)
            clock[0] += next(took[name])
        return call
    monkeypatch.setattr(bench_layer_call.time, "perf_counter", lambda: clock[0])
    dense_ms, hsr_ms = bench_layer_call.timed_pair(fake("dense"), fake("hsr"), 3)
    assert calls == ["dense", "hsr", "hsr", "dense", "dense", "hsr"]
    assert (dense_ms, hsr_ms) == (pytest.approx(2.0), pytest.approx(20.0))


def test_layer_call_benchmark_runs_both_impls_over_one_cache(tmp_path):
    """Ragged contexts (not whole blocks or cells), GQA 3: eps=0 reads every token and must equal CPU_ATTN;
    top-k reads its budget, sink and window only."""
    common = ["--batch", "2", "--num-heads", "6", "--num-kv-heads", "2", "--repeat", "1",
              "--threads", str(torch.get_num_threads())]      # main sets it, for the rest of this process
    exact = bench_layer_call.main(["--contexts", "300,1000", "--hsr", json.dumps({"mode": "softmax", "eps": 0}),
                                   "--json", str(tmp_path / "exact.json"), "--plot", str(tmp_path / "exact.png"),
                                   *common])
    assert [r["context"] for r in exact] == [300, 1000]
    for r in exact:
        assert r["tokens_read_fraction"] == 1.0 and r["max_error_bound"] == 0.0
        assert r["max_rel_diff_vs_cpu_attn"] < 1e-5 and r["cpu_attn_ms"] > 0 and r["hsr_ms"] > 0
    topk = {"mode": "topk", "budget_tokens": 128, "sink_tokens": 16, "window_tokens": 32, "code_bits": 4}
    sparse, = bench_layer_call.main(["--contexts", "1500", "--hsr", json.dumps(topk), "--workload", "structured",
                                     "--json", str(tmp_path / "topk.json"), "--plot", str(tmp_path / "topk.png"),
                                     *common])
    assert sparse["tokens_read_fraction"] == pytest.approx((128 + 16 + 32) / 1500, abs=2 / 1500)
    assert sparse["bytes_read_fraction"] < 0.5
    assert sparse["cell_size"] == 64            # unset: it follows the 128-token blocks, as in the engine
    assert json.loads((tmp_path / "topk.json").read_text()) == [sparse]
    assert_drawn(tmp_path / "topk.png")


def test_layer_call_bad_setting_stops_naming_it(tmp_path):
    with pytest.raises(ValueError, match="eps"):
        bench_layer_call.main(["--hsr", json.dumps({"eps": 2}), "--json", str(tmp_path / "r.json")])
