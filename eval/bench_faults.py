"""Kill anywhere, lose nothing: `llmslim run` killed with SIGKILL at random moments, rerun after each kill.

The recipe is the README's demo (recipes/demo.yaml: drop a layer, prune the FFN, GPTQ W8A8 on the bundled
reference model, the vLLM check, perplexity before and after) with its own output. First one
uninterrupted run gives the reference export and the run's length T. Then, `--kills` times, on a fresh
output: start the run, SIGKILL it (with vLLM's engine) after a time drawn uniformly from [0.05 T, T],
note the phase it was in and the units of work it had completed, and rerun it to the end. A kill counts
as survived when the rerun reused every unit completed before the kill (its log shows it: a stage's
checkpoint, the GPTQ layers done, the written export, the check, the measurements) and ended with an
export byte-identical to the reference (timings aside). Named crash points (tests/test_faults.py) cover
the boundaries between phases and reruns that are killed again; this covers the moments inside phases.

    .venv/bin/python eval/bench_faults.py [--kills 20] [--seed 0]

Prints a table by phase and writes eval/results/bench_faults.json. Exit 1 if any kill was not survived.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from fault_runs import export_differences, llmslim_run, missing_reuse, phase_of  # noqa: E402

from llmslim.workspace import Workspace, completed_units  # noqa: E402

RESULTS = REPO / "eval" / "results" / "bench_faults.json"


def recipe_for(root: Path, name: str) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    for src in recipe["data"].values():  # paths in the demo are relative to the repository root
        src["path"] = str(REPO / src["path"])
    recipe["model"] = str(REPO / recipe["model"])
    recipe["output"] = str(root / name / "out")
    (root / name).mkdir(parents=True)
    path = root / name / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directories (printed)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="llmslim-faults-"))
    stages = len(yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())["stages"])

    started = time.perf_counter()
    rc, out = llmslim_run(recipe_for(root, "reference"), fork=False)
    length = time.perf_counter() - started
    if rc != 0:
        print(out[-3000:], file=sys.stderr)
        return 1
    reference = root / "reference" / "out"
    print(f"uninterrupted run: {length:.1f} s", file=sys.stderr)

    kills: list[dict] = []
    tries = 0
    while len(kills) < args.kills:
        tries += 1
        n = len(kills) + 1
        recipe = recipe_for(root, f"try-{tries}")
        work = Workspace(recipe.parent / "out")
        after = rng.uniform(0.05 * length, length)
        rc, out = llmslim_run(recipe, kill_after=after, fork=False)
        if rc != -9:  # it finished (or failed) before the kill landed: not a kill
            print(f"try {tries}: the run ended (exit {rc}) before {after:.1f} s; not counted", file=sys.stderr)
            shutil.rmtree(recipe.parent)
            continue
        units = completed_units(work)
        kill = {"after_s": round(after, 2), "phase": phase_of(units, stages), "units": units}
        rc, out = llmslim_run(recipe, fork=False)
        kill["missing_reuse"] = missing_reuse(units, out) if rc == 0 else [f"rerun exited {rc}: {out[-500:]}"]
        kill["export_differences"] = export_differences(reference, work.output) if rc == 0 else []
        kill["survived"] = rc == 0 and not kill["missing_reuse"] and not kill["export_differences"]
        kills.append(kill)
        print(f"kill {n}: after {after:.1f} s in {kill['phase']}: "
              f"{'survived' if kill['survived'] else 'LOST ' + str(kill['missing_reuse'] + kill['export_differences'])}",
              file=sys.stderr)
        shutil.rmtree(recipe.parent)

    by_phase: dict[str, Counter] = {}
    for k in kills:
        by_phase.setdefault(k["phase"], Counter())["tried"] += 1
        by_phase[k["phase"]]["survived"] += int(k["survived"])
    survived = sum(k["survived"] for k in kills)
    lines = [f"`llmslim run recipes/demo.yaml` (own output), uninterrupted {length:.1f} s; {len(kills)} SIGKILLs at "
             f"random moments in [0.05 T, T], each followed by a rerun to the end.", "",
             "| phase at the kill | kills | survived |", "|---|---:|---:|"]
    for phase, c in by_phase.items():
        lines.append(f"| {phase} | {c['tried']} | {c['survived']} |")
    lines += [f"| **all** | **{len(kills)}** | **{survived}** |", "",
              f"Kills survived / kills tried: {survived} / {len(kills)} (every rerun resumed from the last completed "
              "unit, every chain ended byte-identical to the uninterrupted export)" if survived == len(kills) else
              f"Kills survived / kills tried: {survived} / {len(kills)}: FAILS"]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["eval/bench_faults.py", *(argv or sys.argv[1:])]),
                                   "uninterrupted_s": round(length, 2), "kills": kills,
                                   "survived": survived, "table": "\n".join(lines)}, indent=2) + "\n")
    if args.keep:
        print(f"work directories kept in {root}", file=sys.stderr)
    else:
        shutil.rmtree(root)
    return 0 if survived == len(kills) else 1


if __name__ == "__main__":
    sys.exit(main())
