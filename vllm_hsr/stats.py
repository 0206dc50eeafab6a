"""Per-step HSR decode statistics of a worker: a rate-limited log line and Prometheus metrics.

The metrics reach the server's /metrics when PROMETHEUS_MULTIPROC_DIR is set before
launch (vLLM then collects every process's metrics); `vllm-hsr serve` sets it.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import threading
import time

import torch

from vllm_hsr.core.attention import HSRStats
from vllm_hsr.log import init_logger

logger = init_logger(__name__)


class _Metrics:
    """Prometheus series (multiprocess mode), or nothing where no collector is set up."""

    def __init__(self):
        self.enabled = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if not self.enabled:
            return
        from prometheus_client import Counter, Gauge
        self.bytes_read = Counter("vllm_hsr_kv_bytes_read", "KV bytes read by HSR decode (keys, values, "
                                  "summaries, codes)")
        self.dense_bytes = Counter("vllm_hsr_dense_kv_bytes", "KV bytes a dense decode of the same rows reads")
        self.rows = Counter("vllm_hsr_decode_rows", "decode rows per layer, by path", ["path"])
        self.overflows = Counter("vllm_hsr_list_overflows", "(sequence, KV head) rows read densely because "
                                 "their candidate list would overflow max_candidates")
        self.max_error_bound = Gauge("vllm_hsr_max_error_bound", "largest softmax certificate of the last "
                                     "log interval", multiprocess_mode="max")
        self.feature_rows = Counter("vllm_hsr_feature_dense_rows", "decode rows per layer read densely because "
                                    "of a model or batch feature HSR does not handle", ["feature"])
        self.kernel = Gauge("vllm_hsr_kernel", "1 for the decode implementation in use (path: native, triton or "
                            "torch; fallback: why the compiled kernel could not be used, empty if it was)",
                            ["path", "fallback"], multiprocess_mode="max")


class DecodeStatsLog:
    """Accumulates HSR decode stats of one worker process and logs them every `interval_s`.

    Per-step counters may be device tensors (hsr_decode with host_stats=False): they are summed
    where they are and read on the host once per `flush_interval_s` (on an accelerator, one sync),
    when the Prometheus series advance, not once per layer and step. On the CPU too: reading them
    at once cost about a tenth of the host time of a decode layer call at 7.5K tokens. Host values
    left pending when decoding stops are flushed by a timer one interval later (device values wait
    for the next step or read: the timer's thread does not sync the device), and the shared log
    flushes at exit.
    """

    _shared: DecodeStatsLog | None = None
    _COUNTERS = ("bytes_read", "dense_bytes", "keys_read", "dense_keys", "sparse_rows", "dense_rows",
                 "overflow_rows", "feature_rows")

    def __init__(self, interval_s: float = 10.0, flush_interval_s: float = 1.0):
        self.interval_s, self.flush_interval_s = interval_s, flush_interval_s
        self.last_log = time.monotonic()
        self.last_flush = -math.inf
        self.pending: dict[str, object] = {}
        self.pending_bounds: list[torch.Tensor] = []     # each call's error bounds, reduced at the flush
        self.reset()
        self._totals: dict[str, float] = dict.fromkeys(self._COUNTERS, 0)
        self._totals["max_error_bound"] = 0.0
        self.metrics = _Metrics()
        self.kernel, self.kernel_fallback = "", None
        self.lock = threading.Lock()            # record (the forward's thread) against a timer's flush
        self.tail_flush: threading.Timer | None = None
        self.tail_flush_due = -math.inf         # when it runs: until then a record schedules nothing

    def set_kernel(self, path: str, fallback: str | None) -> None:
        """The decode implementation in use ("native", "triton" or "torch") and, where `auto` fell back to the
        torch twin, why: shown in every log line and in the metrics."""
        if (path, fallback) == (self.kernel, self.kernel_fallback):
            return
        self.kernel, self.kernel_fallback = path, fallback
        if self.metrics.enabled:
            self.metrics.kernel.labels(path=path, fallback=(fallback or "")[:200]).set(1)

    @classmethod
    def shared(cls) -> DecodeStatsLog:
        if cls._shared is None:
            cls._shared = cls()
            atexit.register(cls._shared.flush)
        return cls._shared

    def reset(self) -> None:
        """Start a new log interval."""
        for name in self._COUNTERS:
            setattr(self, name, 0)
        self.max_error_bound = 0.0

    @property
    def totals(self) -> dict[str, float]:
        """Everything recorded so far (flushed first)."""
        self.flush()
        return self._totals

    def record(self, stats: HSRStats | None, num_sparse_rows: int, num_dense_rows: int,
               dense_feature: str | None = None) -> None:
        """stats: the step's hsr_decode call (None if none) over num_sparse_rows decode rows;
        num_dense_rows: decode rows of the step served by the dense kernel; dense_feature: the model or
        batch feature that sent them there, if it was one HSR does not handle rather than their length.
        Called once per layer and step: it only adds to the pending counters (no tensor op)."""
        with self.lock:
            pending = self.pending
            pending["sparse_rows"] = pending.get("sparse_rows", 0) + num_sparse_rows
            pending["dense_rows"] = pending.get("dense_rows", 0) + num_dense_rows
            if dense_feature is not None and num_dense_rows:
                pending["feature_rows"] = pending.get("feature_rows", 0) + num_dense_rows
                if self.metrics.enabled:
                    self.metrics.feature_rows.labels(feature=dense_feature).inc(num_dense_rows)
            if stats is not None:
                for name in ("bytes_read", "dense_bytes", "keys_read", "dense_keys", "overflow_rows"):
                    pending[name] = pending.get(name, 0) + getattr(stats, name)
                self.pending_bounds.append(stats.error_bound)
        now = time.monotonic()
        if now - self.last_flush >= self.flush_interval_s:
            self.flush()
        elif now >= self.tail_flush_due:
            self.flush_later()
        if now - self.last_log >= self.interval_s:
            self.flush()
            with self.lock:
                logger.info(self.summary())
                self.last_log = now
                self.reset()

    def flush_later(self) -> None:
        """Flush one interval from now, unless a flush is already scheduled: so that host values recorded just
        before decoding stops reach the totals and metrics without another step."""
        if self.tail_flush is not None and self.tail_flush.is_alive() or not math.isfinite(self.flush_interval_s):
            return
        self.tail_flush = threading.Timer(self.flush_interval_s, self.flush, kwargs={"host_only": True})
        self.tail_flush.daemon = True
        self.tail_flush.start()
        self.tail_flush_due = time.monotonic() + self.flush_interval_s

    def flush(self, host_only: bool = False) -> None:
        """Read the pending counters on the host and advance the interval, totals and metrics.
        host_only: not if some are device values (a timer's flush: from its thread, a read would sync)."""
        with self.lock:
            if host_only and self._holds_device_values():
                return
            self.last_flush = time.monotonic()
            pending, self.pending = self.pending, {}
            bounds, self.pending_bounds = self.pending_bounds, []
            if pending:
                self._advance(pending, bounds)

    def _holds_device_values(self) -> bool:
        values = [*self.pending.values(), *self.pending_bounds]
        return any(isinstance(value, torch.Tensor) and value.device.type != "cpu" for value in values)

    def _advance(self, pending: dict, bounds: list[torch.Tensor]) -> None:
        # each a layer call's bounds, or their maximum (a host float); the tensors read in one host sync
        tensors = [b.flatten() for b in bounds if isinstance(b, torch.Tensor)]
        largest = [b for b in bounds if not isinstance(b, torch.Tensor)]
        largest += [float(torch.cat(tensors).max())] if tensors else []
        bound = functools.reduce(_larger, largest, 0.0)
        step = {name: int(value) for name, value in pending.items()}
        for name, value in step.items():
            setattr(self, name, getattr(self, name) + value)
            self._totals[name] += value
        self.max_error_bound = _larger(self.max_error_bound, bound)
        self._totals["max_error_bound"] = _larger(self._totals["max_error_bound"], bound)
        if self.metrics.enabled:
            self.metrics.bytes_read.inc(step.get("bytes_read", 0))
            self.metrics.dense_bytes.inc(step.get("dense_bytes", 0))
            self.metrics.rows.labels(path="hsr").inc(step.get("sparse_rows", 0))
            self.metrics.rows.labels(path="dense").inc(step.get("dense_rows", 0))
            self.metrics.overflows.inc(step.get("overflow_rows", 0))
            self.metrics.max_error_bound.set(self.max_error_bound)

    def summary(self) -> str:
        fraction = self.bytes_read / self.dense_bytes if self.dense_bytes else 0.0
        kernel = self.kernel or "no kernel yet"
        if self.kernel_fallback:
            kernel += ", fallback: the compiled kernel is unavailable"
        return (f"HSR decode [{kernel}]: {fraction:.2%} of dense KV bytes read, {self.sparse_rows} HSR rows, "
                f"{self.dense_rows} dense rows ({self.feature_rows} for a feature HSR does not handle), "
                f"{self.overflow_rows} overflowed lists read densely, "
                f"largest certificate {self.max_error_bound:.2e}")


def _larger(a: float, b: float) -> float:
    """max(a, b), NaN if either is (Python's max keeps whichever comes first)."""
    return a + b if math.isnan(a) or math.isnan(b) else max(a, b)
