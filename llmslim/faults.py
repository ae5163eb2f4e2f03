"""Named crash points, for proving that a run killed anywhere resumes and loses nothing.

`crash_point("stage.renamed")` does nothing unless the environment says LLMSLIM_CRASH_AT=stage.renamed
(or `name:N`, the N-th time that point is reached in this process), in which case the process kills
itself with SIGKILL there: no cleanup handler runs, exactly as when the machine or the OOM killer ends
it. LLMSLIM_CRASH_SIGNAL=INT sends SIGINT instead (Ctrl-C at that point). tests/test_faults.py uses it;
a normal run never sets the variables.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "LLMSLIM_CRASH_AT"
_hits: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here (SIGKILL) when LLMSLIM_CRASH_AT names this point (and its hit count)."""
    target = os.environ.get(ENV)
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGINT if os.environ.get("LLMSLIM_CRASH_SIGNAL") == "INT" else signal.SIGKILL)
