"""DecodeStatsLog: device counters summed without host reads until a flush; the log line."""

import math
import time

import torch

from vllm_hsr import stats as stats_module
from vllm_hsr.core.attention import HSRStats
from vllm_hsr.stats import DecodeStatsLog


def _step(keys: int, bound: float, device: str = "cpu") -> HSRStats:
    as_tensor = lambda value: torch.tensor(value, device=device)  # noqa: E731 (hsr_decode(host_stats=False))
    return HSRStats(keys_read=as_tensor(keys), dense_keys=as_tensor(100), bytes_read=as_tensor(10 * keys),
                    dense_bytes=as_tensor(1000), overflow_rows=as_tensor(1),
                    error_bound=torch.tensor([[bound, bound / 2]]))


def test_device_counters_are_not_read_before_the_flush_interval(monkeypatch):
    """Meta tensors stand in for an accelerator's: any host read of them would raise."""
    lines = []
    monkeypatch.setattr(stats_module.logger, "info", lines.append)
    log = DecodeStatsLog(interval_s=math.inf, flush_interval_s=math.inf)
    log.last_flush = 0.0                       # as if just flushed: nothing is read on the host
    log.record(_step(10, 1e-4, "meta"), num_sparse_rows=2, num_dense_rows=1)
    log.record(_step(30, 3e-4, "meta"), num_sparse_rows=2, num_dense_rows=0)
    log.record(None, num_sparse_rows=0, num_dense_rows=3)
    assert log.keys_read == 0 and log.pending["keys_read"].device.type == "meta"


def test_deferred_counters_add_up_at_the_flush(monkeypatch):
    """The deferred path with readable values (CPU tensors)."""
    log = DecodeStatsLog(interval_s=math.inf, flush_interval_s=math.inf)
    log.last_flush = 0.0
    log.record(_step(10, 1e-4), num_sparse_rows=2, num_dense_rows=1)
    log.record(_step(30, 3e-4), num_sparse_rows=2, num_dense_rows=0)
    log.record(None, num_sparse_rows=0, num_dense_rows=3, dense_feature="sliding window")
    assert log.keys_read == 0 and log.pending["keys_read"].item() == 40       # still waiting
    log.flush()
    assert (log.keys_read, log.dense_keys, log.bytes_read, log.overflow_rows) == (40, 200, 400, 2)
    assert (log.sparse_rows, log.dense_rows, log.feature_rows) == (4, 4, 3)
    assert math.isclose(log.max_error_bound, 3e-4, rel_tol=1e-6) and not log.pending


def test_host_counters_add_up_at_the_flush_interval(monkeypatch):
    """Host ints (the compiled CPU kernel's counters) wait for the flush interval too, then add up."""
    lines = []
    monkeypatch.setattr(stats_module.logger, "info", lines.append)
    log = DecodeStatsLog(interval_s=math.inf, flush_interval_s=math.inf)
    log.last_flush = 0.0
    log.record(HSRStats(keys_read=10, dense_keys=100, bytes_read=100, dense_bytes=1000, overflow_rows=1,
                        error_bound=torch.tensor([[1e-4, 5e-5]])), num_sparse_rows=2, num_dense_rows=1)
    assert log.keys_read == 0 and log.pending["keys_read"] == 10
    log.flush_interval_s = 0.0                 # the interval passed: the next record flushes
    log.record(_step(30, 3e-4), num_sparse_rows=2, num_dense_rows=0)
    assert log.keys_read == 40 and not log.pending and not log.pending_bounds
    log.flush_interval_s = math.inf
    log.record(None, num_sparse_rows=0, num_dense_rows=3)
    totals = log.totals
    assert (totals["keys_read"], totals["dense_keys"], totals["bytes_read"]) == (40, 200, 400)
    assert (totals["sparse_rows"], totals["dense_rows"], totals["overflow_rows"]) == (4, 4, 2)
    assert math.isclose(totals["max_error_bound"], 3e-4, rel_tol=1e-6) and not lines


def test_bounds_kept_as_their_maximum_join_the_tensors():
    """A layer call's bounds come as a tensor or as their maximum (a host float, the compiled kernel's); the
    largest of all is the interval's, and a NaN among them is not hidden by a larger number."""
    log = DecodeStatsLog(interval_s=math.inf, flush_interval_s=math.inf)
    for bound in (torch.tensor([[1e-4, 5e-5]]), 2e-4, torch.tensor(3e-5)):
        log.record(HSRStats(keys_read=1, error_bound=bound), num_sparse_rows=1, num_dense_rows=0)
    log.flush()
    assert math.isclose(log.max_error_bound, 2e-4, rel_tol=1e-6)
    for bound in (math.nan, torch.tensor([[1e-4]])):
        log.record(HSRStats(keys_read=1, error_bound=bound), num_sparse_rows=1, num_dense_rows=0)
    log.flush()
    assert math.isnan(log.max_error_bound)


def _wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_host_counters_left_pending_are_flushed_one_interval_later():
    """Decoding stops inside a flush interval: the host values still reach the totals, with no further step."""
    log = DecodeStatsLog(interval_s=math.inf, flush_interval_s=0.3)
    log.last_flush = time.monotonic()           # as if just flushed: this record only schedules
    log.record(HSRStats(keys_read=10, dense_keys=100, bytes_read=100, dense_bytes=1000, overflow_rows=1,
                        error_bound=torch.tensor([[1e-4, 5e-5]])), num_sparse_rows=2, num_dense_rows=1)
    assert log.keys_read == 0
    assert _wait_for(lambda: log.keys_read == 10)
    assert (log.sparse_rows, log.dense_rows, log.bytes_read) == (2, 1, 100) and not log.pending
    assert math.isclose(log.max_error_bound, 1e-4, rel_tol=1e-6)


def test_the_timer_leaves_device_counters_for_the_next_step():
    """Meta tensors stand in for an accelerator's: the timer's thread must not read them (it would raise)."""
    log = DecodeStatsLog(interval_s=math.inf, flush_interval_s=0.2)
    log.last_flush = time.monotonic()
    log.record(_step(10, 1e-4, "meta"), num_sparse_rows=2, num_dense_rows=1)
    assert log.tail_flush is not None
    log.tail_flush.join(5.0)
    assert not log.tail_flush.is_alive() and log.pending["keys_read"].device.type == "meta"
    assert log.keys_read == 0


def test_the_log_line_reports_the_interval(monkeypatch):
    lines = []
    monkeypatch.setattr(stats_module.logger, "info", lines.append)
    log = DecodeStatsLog(interval_s=0.0)
    log.set_kernel("native", None)
    log.record(_step(25, 2e-3), num_sparse_rows=1, num_dense_rows=1)
    assert lines == ["HSR decode [native]: 25.00% of dense KV bytes read, 1 HSR rows, 1 dense rows (0 for a feature "
                     "HSR does not handle), 1 overflowed lists read densely, largest certificate 2.00e-03"]
    assert log.keys_read == 0                  # a new interval starts after each line
    log.record(_step(5, 1e-5), num_sparse_rows=1, num_dense_rows=0)
    assert "5.00% of dense KV bytes read" in lines[-1] and "largest certificate 1.00e-05" in lines[-1]
    log.set_kernel("torch", "g++ not found")
    log.record(None, num_sparse_rows=0, num_dense_rows=2, dense_feature="sliding window")
    assert lines[-1].startswith("HSR decode [torch, fallback: the compiled kernel is unavailable]: ")
    assert "2 dense rows (2 for a feature HSR does not handle)" in lines[-1]
