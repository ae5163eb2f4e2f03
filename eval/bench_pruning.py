"""Quality of the structural methods on a real trained model: perplexity after each pruning, per criterion.

    .venv/bin/python eval/bench_pruning.py [--samples 128] [--seeds 3]

Model: ../shared/models/stories260K-hf (5 layers, 8 heads / 4 KV heads, head_dim 8, FFN 172, tied).
Data: ../shared/data/tinystories/dev.txt; calibration on its first half, perplexity on its second half
(all non-overlapping 512-token windows), so calibration and evaluation never share text.
Rows: drop 1 layer; prune to 2 KV heads (of 4); prune the FFN to 128 channels (of 172); all three, in
that order. Columns: every criterion of the row's method; `random` is averaged over --seeds recipe
seeds (mean, with min-max). In the "all three" row the layer is dropped by block_influence, except in
the random column where all three stages are random. Every cell is a real `llmslim.pipeline.run` (export
checked in transformers) in a temporary directory.

Prints a markdown table and writes eval/results/bench_pruning.json (command, versions, every number).
Acceptance: activation (block_influence for the layer row) has a lower perplexity than random's mean in
every row. Skips with a message when ../shared (or $LLMSLIM_SHARED) is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMSLIM_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "stories260K-hf"
TEXT = SHARED / "data" / "tinystories" / "dev.txt"
RESULTS = REPO / "eval" / "results" / "bench_pruning.json"

DROP_CRITERIA = ["block_influence", "angular", "last", "random"]
PRUNE_CRITERIA = ["activation", "magnitude", "taylor", "random"]
COLUMNS = ["block_influence", "angular", "last", "activation", "magnitude", "taylor", "random"]


def drop(criterion: str) -> dict:
    return {"method": "drop_layers", "count": 1, "criterion": criterion, "data": "calib"}


def heads(criterion: str) -> dict:
    return {"method": "prune_heads", "kv_heads": 2, "criterion": criterion, "data": "calib"}


def ffn(criterion: str) -> dict:
    return {"method": "prune_ffn", "intermediate_size": 128, "criterion": criterion, "data": "calib"}


def all_three(criterion: str) -> list[dict]:
    return [drop("random" if criterion == "random" else "block_influence"), heads(criterion), ffn(criterion)]


ROWS: list[tuple[str, list[str], Any, str]] = [  # (row, criteria, stages for a criterion, the one that must win)
    ("drop 1 layer (5 -> 4)", DROP_CRITERIA, lambda c: [drop(c)], "block_influence"),
    ("KV heads 4 -> 2 (heads 8 -> 4)", PRUNE_CRITERIA, lambda c: [heads(c)], "activation"),
    ("FFN 172 -> 128", PRUNE_CRITERIA, lambda c: [ffn(c)], "activation"),
    ("all three", PRUNE_CRITERIA, all_three, "activation"),
]


def run_one(work: Path, name: str, stages: list[dict], seed: int, samples: int) -> dict:
    from llmslim.pipeline import run
    from llmslim.recipe import parse_recipe

    recipe = {
        "model": str(MODEL), "output": str(work / name), "seed": seed,
        "data": {"calib": {"path": str(TEXT), "fraction": [0.0, 0.5], "samples": samples, "seq_len": 512},
                 "heldout": {"path": str(TEXT), "fraction": [0.5, 1.0], "seq_len": 512}},
        "stages": stages, "export": {"check": "transformers"}, "eval": {"perplexity": ["heldout"]},
    }
    started = time.perf_counter()
    report = run(parse_recipe(yaml.safe_dump(recipe), f"{name}.yaml"))
    ev = report["eval"]
    return {"ppl": ev["after"]["perplexity"]["heldout"]["ppl"], "ppl_before": ev["before"]["perplexity"]["heldout"]["ppl"],
            "params": report["size"]["after"]["params"], "params_before": report["size"]["before"]["params"],
            "tokens": ev["after"]["perplexity"]["heldout"].get("tokens"), "seconds": round(time.perf_counter() - started, 2),
            "stages": [{"method": s["method"], "notes": s["summary"]} for s in report["stages"]]}


def cell(result: dict) -> str:
    if "runs" in result:
        return f"{result['ppl']:.3f} ({result['min']:.3f}-{result['max']:.3f})"
    return f"{result['ppl']:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--seeds", type=int, default=3, help="recipe seeds averaged for the random criterion")
    args = parser.parse_args(argv)
    if not MODEL.is_dir() or not TEXT.is_file():
        print(f"skipped: {MODEL} or {TEXT} not found (this benchmark needs ../shared; set LLMSLIM_SHARED)")
        return 0
    import transformers

    from llmslim.report import versions

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("llmslim").setLevel(logging.WARNING)

    rows: list[dict] = []
    baseline = None
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        work = Path(tmp)
        for r, (label, criteria, stages_for, must_win) in enumerate(ROWS):
            cells: dict[str, dict] = {}
            for criterion in criteria:
                if criterion == "random":
                    runs = [run_one(work, f"r{r}-random-{s}", stages_for(criterion), s, args.samples)
                            for s in range(args.seeds)]
                    ppls = [x["ppl"] for x in runs]
                    cells[criterion] = {"ppl": statistics.mean(ppls), "min": min(ppls), "max": max(ppls),
                                        "std": statistics.pstdev(ppls), "runs": runs, "params": runs[0]["params"]}
                else:
                    cells[criterion] = run_one(work, f"r{r}-{criterion}", stages_for(criterion), 0, args.samples)
                baseline = cells[criterion].get("ppl_before") or (cells[criterion]["runs"][0]["ppl_before"]
                                                                  if "runs" in cells[criterion] else baseline)
                print(f"  {label}: {criterion}: {cell(cells[criterion])}", file=sys.stderr, flush=True)
            wins = cells[must_win]["ppl"] < cells["random"]["ppl"]
            rows.append({"row": label, "params": cells[must_win]["params"], "cells": cells, "must_beat_random": must_win,
                         "beats_random_mean": wins,
                         "beats_every_random_seed": cells[must_win]["ppl"] < cells["random"]["min"]})

    lines = [f"Perplexity on the second half of TinyStories dev.txt (512-token windows); original model: "
             f"{baseline:.3f}. random: mean over {args.seeds} seeds (min-max).", "",
             "| pruning | params | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for row in rows:
        values = [cell(row["cells"][c]) if c in row["cells"] else "-" for c in COLUMNS]
        values = [f"**{v}**" if c == row["must_beat_random"] else v for c, v in zip(COLUMNS, values)]
        lines.append(f"| {row['row']} | {row['params']:,} | " + " | ".join(values) + " |")
    ok = all(r["beats_random_mean"] for r in rows)
    lines += ["", "Acceptance (bold beats random's mean in every row): " + ("holds" if ok else "FAILS: " + ", ".join(
        r["row"] for r in rows if not r["beats_random_mean"])) + "; bold beats every random seed in "
        f"{sum(r['beats_every_random_seed'] for r in rows)} of {len(rows)} rows."]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, "eval/bench_pruning.py", *(argv if argv is not None else sys.argv[1:])])
    RESULTS.write_text(json.dumps({"command": command, "versions": versions(), "model": str(MODEL), "text": str(TEXT),
                                   "calibration": {"fraction": [0.0, 0.5], "samples": args.samples, "seq_len": 512},
                                   "evaluation": {"fraction": [0.5, 1.0], "seq_len": 512}, "seeds": args.seeds,
                                   "ppl_original": baseline, "rows": rows, "acceptance": ok, "table": "\n".join(lines)},
                                  indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0 if ok else 1  # a failed acceptance line fails the command


if __name__ == "__main__":
    sys.exit(main())
