"""Wall-clock sections: CUDA events on a GPU (no host sync inside the timed work), perf_counter on CPU."""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Stopwatch:
    """Accumulates milliseconds per named section; `collect()` synchronises once and returns them."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._ms: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._ms[name] += 1000.0 * (time.perf_counter() - t0)

    def collect(self) -> dict[str, float]:
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self._ms[name] += start.elapsed_time(end)
            self._events.clear()
        return dict(self._ms)


class NullStopwatch:
    """Stands in when nothing is timed."""

    @contextmanager
    def section(self, name: str):
        yield


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
