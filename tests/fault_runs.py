"""Killing `llmslim run` and judging the rerun: shared by tests/test_faults.py and eval/bench_faults.py.

A run is killed with SIGKILL, at a named crash point (llmslim/faults.py) or after a number of seconds;
`completed_units` (llmslim.workspace) says what was finished at that moment; the rerun's log must show
that it reused each of those units (`missing_reuse`), and the final export must equal an uninterrupted
run's byte for byte, except the files that record timings (`export_differences`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

# Files whose content records when and how long things took, not what was computed; and report fields
# that do (timings, memory, where the export went: recipe_full_hash hashes the `output` path too).
VOLATILE_FILES = {"llmslim_report.json", "llmslim_report.md", "eval",
                  "plots"}  # plots: drawn from the report's notes, which are compared below
VOLATILE_KEYS = {"seconds", "peak_rss_bytes", "layers_from_earlier_run", "load_seconds", "created", "command",
                 "date", "wall_seconds", "rss", "timestamp", "output", "path", "recipe_full_hash",
                 "train_seconds", "tokens_per_s", "resumed_from_step"}  # the training stages' notes

EVIDENCE = {  # unit of work -> what a rerun that reuses it logs
    "eval_before": "original model: reusing its measurements",
    "export": "export: reusing the files an earlier run wrote",
    "check": "check: passed in an earlier run",
    "eval_after": "eval: reusing the measurements of the export",
}


def llmslim_run(recipe: Path, *extra: str, crash_at: str | None = None, kill_after: float | None = None,
                timeout: float = 900, fork: bool = True, cwd: Path | None = None) -> tuple[int, str]:
    """Run `llmslim run RECIPE --quiet` in a child process (its own session, so vLLM's engine dies with it);
    crash it at a named point, or SIGKILL it after `kill_after` seconds. Returns (exit code, output).
    fork: a child of tests/cli_runner.py's forkserver (starts in milliseconds); else `python -m llmslim.cli`.
    cwd: the directory it runs in (where the recipe's relative paths point)."""
    if fork:
        from cli_runner import run_cli

        return run_cli("run", str(recipe), "--quiet", *extra, env={"LLMSLIM_CRASH_AT": crash_at},
                       kill_after=kill_after, timeout=timeout, cwd=cwd)
    env = dict(os.environ)
    env.pop("LLMSLIM_CRASH_AT", None)
    if crash_at:
        env["LLMSLIM_CRASH_AT"] = crash_at
    proc = subprocess.Popen([sys.executable, "-m", "llmslim.cli", "run", str(recipe), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=cwd)
    try:
        out = proc.communicate(timeout=kill_after if kill_after is not None else timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]
    return proc.returncode, out


def missing_reuse(units: list[str], log: str) -> list[str]:
    """The units completed before a kill that the rerun's log does not show it reusing."""
    if "exported" in units and "is up to date with this recipe" in log:
        return []
    missing = []
    for unit in units:
        if unit in EVIDENCE:
            ok = EVIDENCE[unit] in log
        elif unit.startswith("stage:"):
            i = int(unit.split(":")[1])
            ok = f"stages[{i}] " in log and ("done in an earlier run" in log or "adopting it" in log)
        elif unit.startswith("layers:"):
            _, _, k = unit.split(":")
            ok = f"{k} of " in log and "layers were quantized by an earlier run" in log
        else:  # "exported": the rerun may replace it (a changed eval), nothing to reuse
            ok = True
        if not ok:
            missing.append(unit)
    return missing


def stable(value):
    """A report without the fields that record timing, places and resumption."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def _volatile(path: str) -> bool:
    """Inside a volatile folder (eval/ names its model records by a hash of the model's path), or the
    recipe copy (whose `output` differs)."""
    return path.split("/")[0] in VOLATILE_FILES | {"llmslim_recipe.yaml"}


def _paths(export: Path) -> list[str]:
    """Every entry at any depth, volatile folders' contents left out."""
    return sorted(p for p in (q.relative_to(export).as_posix() for q in export.rglob("*"))
                  if "/" not in p or not _volatile(p))


def export_differences(a: Path, b: Path) -> list[str]:
    """What differs between two exports of the same recipe (made to different outputs)."""
    names = sorted(p.name for p in a.iterdir())
    if _paths(a) != _paths(b):
        return [f"files: {_paths(a)} vs {_paths(b)}"]
    diffs = []
    for name in names:
        if name == "llmslim_recipe.yaml":  # the recipes differ in `output` only
            ya, yb = (yaml.safe_load((d / name).read_text()) for d in (a, b))
            ya.pop("output"), yb.pop("output")
            if ya != yb:
                diffs.append(name)
        elif name not in VOLATILE_FILES and (a / name).is_dir():  # an adapter folder (eora/, qat/): its files
            diffs += [p for p in _paths(a) if p.startswith(name + "/") and (a / p).is_file()
                      and (a / p).read_bytes() != (b / p).read_bytes()]
        elif name not in VOLATILE_FILES and (a / name).read_bytes() != (b / name).read_bytes():
            diffs.append(name)
    ra, rb = (json.loads((d / "llmslim_report.json").read_text()) for d in (a, b))
    for r in (ra, rb):  # the record: sizes and hashes of every file that must be byte-identical
        r["export"]["files"] = [e for e in r["export"]["files"] if not _volatile(e["path"])]
    if stable(ra) != stable(rb):
        diffs.append("llmslim_report.json (beyond timings)")
    return diffs


def phase_of(units: list[str], stages: int) -> str:
    """The phase a run was in when it was killed: the first unit of a complete run not yet finished."""
    order = ["eval_before"] + [f"stage:{i}" for i in range(stages)] + ["export", "check", "eval_after", "exported"]
    names = {"eval_before": "eval of the original", "export": "export write", "check": "vLLM check",
             "eval_after": "eval of the export", "exported": "report and rename"}
    for unit in order:
        if unit not in units:
            return names[unit] if unit in names else f"stage {unit.split(':')[1]}"
    return "after the end"
