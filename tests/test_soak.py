"""The soak (benchmarks/soak.py), short, on the tiny model: concurrent, streamed, cancelled and over-long
requests against `vllm-hsr serve` at eps=0; nothing lost, every completion CPU_ATTN's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402


def test_short_soak_loses_nothing(tiny_model, tmp_path):
    record = soak.main(["--model", str(tiny_model), "--requests", "48", "--concurrency", "8", "--max-model-len",
                        "1024", "--max-seconds", "600", "--seed", "3", "--json", str(tmp_path / "soak.json")])
    assert record["sent"] == 48 and record["errors_by_status"].keys() <= {"400"}
    assert record["over_length"] >= 1 and record["over_length_got_400"] == record["over_length"]
    assert record["cancelled"] >= 1 and record["streamed"] > record["cancelled"]
    assert record["completed"] == 48 - record["over_length"] - record["cancelled"]
    assert record["identical_to_dense"] == record["completed"], record["mismatched_requests"]
    assert record["answers_after"] and record["passed"], record
