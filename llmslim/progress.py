"""Progress reporting without `print` in the library: stages report through a Progress object that the
CLI owns (a rich display, or plain log lines with --quiet)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("llmslim")


class Task:
    """One unit of long work (layers, samples, steps)."""

    def __init__(self, description: str, total: int | None):
        self.description, self.total, self.done = description, total, 0
        self.last_note = ""
        self._started = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n

    def note(self, text: str) -> None:
        """A short live status (loss, rate) shown beside the bar; plain logs show the last one at the end."""
        self.last_note = text

    def close(self) -> None:
        seconds = time.perf_counter() - self._started
        log.info("%s: %d%s in %.1f s%s", self.description, self.done,
                 f"/{self.total}" if self.total else "", seconds, f" ({self.last_note})" if self.last_note else "")


class Progress:
    """Default reporter: log lines when each task ends. The CLI swaps in a live display."""

    def task(self, description: str, total: int | None = None) -> Task:
        return Task(description, total)

    @contextmanager
    def track(self, description: str, total: int | None = None) -> Iterator[Task]:
        task = self.task(description, total)
        try:
            yield task
        finally:
            task.close()
