"""Peak host-memory measurement: a sampler thread reading the process's resident set size."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading

import psutil


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Context manager recording the peak RSS (bytes) while it is open, sampled every `interval` s.

    ru_maxrss cannot be reset between stages, so each stage samples its own peak instead."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


@functools.cache
def keep_large_buffers_out_of_the_heap(threshold: int = 16 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more by its own mmap (glibc only; once per process).

    Why: glibc's default threshold is dynamic: after the first large free it rises to that size (up to
    32 MiB), so later layer-sized buffers land in malloc arenas, which fragment and never shrink, and
    layer-by-layer work grows with depth. Measured with GPTQ W4 on the synthetic Llama of
    eval/bench_gptq.py (8 x 512 calibration tokens), peak RSS at 8 -> 24 layers: 1306 -> 1851 MiB by
    default, 1141 -> 1201 MiB with 16 MiB, at the same speed (47.0 vs 47.3 s for 24 layers). Lower
    thresholds flatten it a little more but cost time (4 MiB: 1063 MiB, 60.5 s): mmap-ing every
    mid-sized temporary means page faults. Returns whether the setting took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators behave differently
        return False


def device_peak_bytes() -> int | None:
    """Peak GPU memory allocated by torch, when a GPU is in use."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def total_ram_bytes() -> int:
    return psutil.virtual_memory().total



