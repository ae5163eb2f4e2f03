"""Peak host-memory measurement: a sampler thread reading the process's resident set size."""

from __future__ import annotations

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


def device_peak_bytes() -> int | None:
    """Peak GPU memory allocated by torch, when a GPU is in use."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def total_ram_bytes() -> int:
    return psutil.virtual_memory().total



