"""Where a run keeps its files, which files are llmslim's own, and how a new export replaces an old one.

    <output>/                   the export: only ever renamed into place complete (llmslim_report.json last)
    <output>.work/              llmslim's work files, marked by .llmslim-work
        state.json              what is done: stages (with recipe hashes), export, check, evaluations
        generated/NAME.safetensors  a data source's generated windows (`generate:`), with their key
        stages/NN-method/       the checkpoint after stage NN (the latest completed one is kept) and its
                                llmslim_stage.json record, written before the rename that completes it
        stages/NN-method.tmp/   a stage being written;  NN-method.scratch/  its per-layer progress
        export.tmp/             the export being assembled;  old-export/  the previous one during the swap

The rules that keep users' files safe: llmslim deletes only directories it marked as its own (the work
directory) or exports it wrote whose files are exactly those their report records, at any depth, with
the recorded sizes and sha256 hashes (ownership.py); `output` may not overlap the model or any data
source; anything else at `output` is refused, or with --replace-output moved aside (renamed, never
deleted).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import UserError
from .faults import crash_point
from .ownership import REPORT, audit, describe

log = logging.getLogger(__name__)

WORK_MARKER = ".llmslim-work"
STAGE_RECORD = "llmslim_stage.json"


class Workspace:
    """Paths of one run's work files, and its state.json."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.root = self.output.with_name(self.output.name + ".work")
        self.state_file = self.root / "state.json"
        self.stages = self.root / "stages"
        self.export_tmp = self.root / "export.tmp"
        self.trash = self.root / "old-export"

    def stage_dir(self, index: int, method: str) -> Path:
        return self.stages / f"{index:02d}-{method}"

    def load_state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_file, state)  # a crash never leaves a half-written state

    def owns_root(self) -> bool:
        """Whether the work directory is absent or llmslim's (its marker, or an earlier version's state)."""
        return not self.root.exists() or (self.root / WORK_MARKER).is_file() or self.state_file.is_file()

    def create(self) -> None:
        """Create the work directory (and the output's parent), marked as llmslim's."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / WORK_MARKER).touch()
        except OSError as e:
            raise UserError(f"output: {self.output}: cannot create the work directory {self.root}: "
                            f"{e.strerror or e}; choose an output in a writable place") from None

    def recover(self) -> None:
        """A run killed while swapping exports left the old export in old-export/: put it back."""
        if self.trash.is_dir() and not self.output.exists():
            os.replace(self.trash, self.output)
            log.info("%s: restored the previous export (a run was killed while replacing it)", self.output)

    def remove_own(self, replace_output: bool = False, keep: tuple[Path, ...] = ()) -> None:
        """--fresh: remove the work directory and an export of ours at `output`; nothing else. Anything
        else at `output` is refused before anything is removed (with --replace-output it stays, for
        `finalize` to move aside). `keep`: entries of the work directory that stay (a GGUF's conversion,
        generated data: each is checked against its key before reuse)."""
        if self.root.exists() and not self.owns_root():
            raise UserError(f"output: {self.root} exists and was not created by llmslim; --fresh will not "
                            "delete it: move it away or choose another output")
        problem = output_problem(self.output)  # sizes and hashes: the last look before deleting
        if problem and not replace_output:
            raise UserError(problem)
        if self.root.exists():
            kept = {p for p in keep if p.parent == self.root and p.exists()}
            if kept:
                for entry in self.root.iterdir():
                    if entry not in kept and entry.name != WORK_MARKER:
                        _remove(entry)
            else:
                shutil.rmtree(self.root)
        if self.output.exists() and problem is None:
            _remove(self.output)


def completed_units(work: Workspace) -> list[str]:
    """The units of work a rerun of this output will reuse, as read from disk: `generated:NAME` (a data
    source's generated windows, reused when their key still matches), `eval_before`, `stage:I`,
    `layers:I:K` (K finished layers of stage I), `export`, `check`, `eval_after`, `exported`."""
    try:
        state = work.load_state()
    except (OSError, ValueError):
        state = {}
    units = [f"generated:{p.stem}" for p in sorted((work.root / "generated").glob("*.safetensors"))]  # generated.py
    units += ["eval_before"] if state.get("eval_before") else []
    done = {rec["index"] for rec in state.get("stages", [])}
    if work.stages.is_dir():
        done |= {int(p.name[:2]) for p in work.stages.iterdir()  # NN-method, not NN-method.tmp / .scratch
                 if re.fullmatch(r"\d\d-\w+", p.name) and (p / STAGE_RECORD).is_file() and (p / "config.json").is_file()}
    units += [f"stage:{i}" for i in sorted(done)]
    if work.stages.is_dir():
        for p in sorted(work.stages.glob("*.scratch")):
            n = len(list(p.glob("layer-*.safetensors")))
            if n and int(p.name[:2]) not in done:
                units.append(f"layers:{int(p.name[:2])}:{n}")
    export = state.get("export") or {}
    units += (["export"] if export else []) + (["check"] if export.get("check") else [])
    units += ["eval_after"] if state.get("eval_after") else []
    units += ["exported"] if is_export(work.output) else []
    return units


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def is_export(path: Path) -> bool:
    return (path / REPORT).is_file()


def output_problem(output: Path, *, hashes: bool = True) -> str | None:
    """Why llmslim may not replace what is at `output` (None: nothing there, an empty directory, or an
    export llmslim wrote whose files are still exactly those its report records). hashes=False: names and
    sizes only, the quick look a run takes before it starts (what deletes compares the content too)."""
    if not output.exists() and not output.is_symlink():
        return None
    if output.is_symlink() or not output.is_dir():
        return f"output: {output} exists and is not a directory"
    entries = sorted(p.name for p in output.iterdir())
    if not entries:
        return None
    if not is_export(output):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        return (f"output: {output} exists and is not an llmslim export (it holds {shown}); llmslim will not "
                "replace it: choose another output, or pass --replace-output to have it moved aside")
    found = audit(output, hashes=hashes)
    if not found.ours:
        return (f"output: {output} is an earlier llmslim export with {describe(found)}; llmslim will not delete "
                "them: move them out of the export, choose another output, or pass --replace-output to have the "
                "old export moved aside")
    return None


def move_aside(path: Path) -> Path:
    """Rename `path` to `<path>.replaced-<time>` (never deleted) and return the new name."""
    aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.replace(path, aside)
    log.warning("output: moved what was at %s to %s (--replace-output)", path, aside)
    return aside


def overlaps(a: Path, b: Path) -> bool:
    """Whether two paths are the same, or one lies inside the other (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output_paths(work: Workspace, protected: list[tuple[str, Path]]) -> None:
    """Refuse an output (or its work directory) equal to, inside or containing a protected path."""
    for field, path in protected:
        for target in (work.output, work.root):
            if overlaps(target, path):
                raise UserError(f"output: {work.output} overlaps {field} ({path}): llmslim writes and replaces "
                                "the output and its work directory, so it may not be, contain or lie inside the "
                                "model or a data source; choose an output elsewhere")


def finalize(tmp: Path, work: Workspace, replace_output: bool) -> None:
    """Atomically move the finished export `tmp` to the output. An earlier export of ours is replaced
    (kept in old-export/ until the new one is in place); anything else is refused or moved aside."""
    output = work.output
    problem = output_problem(output)
    if problem and not replace_output:
        raise UserError(problem)
    if problem:
        move_aside(output)
    if work.trash.exists():
        shutil.rmtree(work.trash)
    if output.exists():
        os.replace(output, work.trash)
        crash_point("finalize.swap")
    os.replace(tmp, output)
    if work.trash.exists():
        shutil.rmtree(work.trash)
