"""`accelerate launch --num_processes N -m llmslim run recipe.yaml`: training stages on N processes.

Every process runs the same command. The main process (rank 0) does everything a single-process run does
and is the only one that writes the stage checkpoints, the export and the reports. The others follow: they
validate the recipe the same way, learn from the main process which training stages it will run
(launch.json in the work directory, tagged with a nonce broadcast to all processes, so a stale file is
never read), wait for each one's input checkpoint to appear, meet the main process at a barrier, and train
with it: DDP, or FSDP2 when accelerate's config asks for FSDP (llmslim.training.loop and .sharding; the
main process gathers the full weights before it writes the stage). Into the stage's training state each
process writes its own RNG state and, under FSDP, its shards of the model and optimizer. After the last
training stage the others exit, every process leaves the process group, and the main process goes on to
export, check and measure. If the main process fails, it leaves launch-error.json and the others stop too.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from .errors import UserError
from .workspace import STAGE_RECORD, Workspace, write_json_atomic

log = logging.getLogger(__name__)
POLL_S = 0.5


def world_size() -> int:
    """Processes of this launch (accelerate and torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Launch:
    """This process's part in a multi-process launch (`active` False for a plain run)."""

    def __init__(self) -> None:
        self.active = world_size() > 1
        self.state: Any = None
        self.nonce = ""
        if self.active:
            import torch.distributed as td

            from .training.loop import distributed_state

            self.state = distributed_state()
            box = [secrets.token_hex(8) if self.state.is_main_process else ""]
            td.broadcast_object_list(box, src=0)
            self.nonce = box[0]

    @property
    def is_main(self) -> bool:
        return not self.active or self.state.is_main_process

    def barrier(self) -> None:
        if self.active:
            self.state.wait_for_everyone()

    def release(self) -> None:
        """After the last training stage (every process): leave the process group. The other processes exit,
        and what the main process runs next must not take itself for one rank of many (compressed-tensors,
        loading a quantized export for the check, splits its work over the ranks of a live process group
        and waits for ranks that are gone)."""
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()

    # ---------------------------------------------------------------- main process

    def announce(self, work: Workspace, training: list[int]) -> None:
        """Tell the other processes which training stages this launch runs (main process)."""
        if self.active:
            write_json_atomic(work.root / "launch.json", {"nonce": self.nonce, "training": training})

    def fail(self, work: Workspace, error: BaseException) -> None:
        """Tell the other processes to stop (main process, on any failure)."""
        if self.active:
            try:
                write_json_atomic(work.root / "launch-error.json", {"nonce": self.nonce, "error": str(error)})
            except OSError:
                pass

    # ---------------------------------------------------------------- the other processes

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return d if d.get("nonce") == self.nonce else None

    def wait_for(self, work: Workspace, ready: Path | None = None) -> dict[str, Any]:
        """Poll until the main process announced its plan (ready None) or `ready` (a stage directory) holds
        a complete checkpoint; raise if the main process failed meanwhile."""
        while True:
            err = self._read(work.root / "launch-error.json")
            if err is not None:
                raise UserError(f"the main process stopped: {err['error']}")
            if ready is None:
                plan = self._read(work.root / "launch.json")
                if plan is not None:
                    return plan
            elif (ready / STAGE_RECORD).is_file():
                return {}
            time.sleep(POLL_S)
