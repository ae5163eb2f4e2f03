"""`python -m llmslim.watchdog PARENT GROUP GRACE`: end process group GROUP once process PARENT is gone.

`llmslim serve` ties the server to its own life with the kernel's parent-death signal; where the kernel
does not give one (not Linux, or prctl refused), it starts this instead. A process, not a thread, since a
thread would die with llmslim; standard library only, since it starts while vLLM imports. It polls its
parent: once llmslim has died (this process is reparented, getppid changes) it ends the server's group as
llmslim would (SIGTERM, then SIGKILL after GRACE seconds). It exits by itself when the group is gone, and
llmslim ends it after stopping the server.
"""

from __future__ import annotations

import os
import signal
import sys
import time

INTERVAL_S = 0.5


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (cannot happen to our own server, but not gone)
        return True


def watch(parent: int, group: int, grace: float, interval: float = INTERVAL_S) -> None:
    while os.getppid() == parent and group_alive(group):
        time.sleep(interval)
    if not group_alive(group):
        return
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
