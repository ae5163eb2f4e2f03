"""Post-training quantization beyond plain GPTQ, against llm-compressor and auto-round on the same tokens
(issue [10]).

    scripts/setup_anchor.sh all              # once: .venv-anchor (llm-compressor 0.14), .venv-autoround (0.16)
    .venv/bin/python eval/bench_ptq.py [--model stories|reference] [--quick] [--iters 50 200]

--model stories (the default): stories260K, calibrated on 128 x 512 tokens of the first half of
../shared/data/tinystories/dev.txt, perplexity on the second half (512-token windows). --model reference:
the bundled reference model (llmslim/assets/reference, a 6-layer Llama, bf16 on disk), calibrated on
112 x 256 tokens of its calib.txt (30149 tokens in all), perplexity on its eval.txt (256-token windows).
Every tool works in float32; the anchors get the very calibration tokens (SHA-256 checked); every model
is measured here in .venv the same way; symmetric grids, act-order on for every GPTQ.

Rows: W3 and W4 per channel, W4 g32 (on stories260K 32 does not divide the 172-wide down_proj: every tool
keeps it unquantized there). Columns, ours: rtn and gptq with the minmax and mse observers, gptq mse with
gptaq, awq then gptq mse, autoround and awq then autoround at each of `--iters` (steps per layer, our
default lr 1/iters); anchors: llm-compressor 0.14 GPTQ with its minmax and mse observers, its AWQ then
GPTQ (mse), and auto-round 0.16 at the same step counts with lr 5e-3 (50: its "light" preset; 200: its
default; neither is better everywhere, so both are anchors). Time (the quantization stages; the anchors'
quantize call) and peak RSS of the whole process (GNU time) beside each.

Prints a table and writes eval/results/bench_ptq.json (--model reference: bench_ptq_reference.json). Exit 1
if the best of ours is worse than the best anchor in a row.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from bench_gptq import (
    ANCHOR_PY,
    AUTOROUND_PY,
    DEV,
    GPTQ,
    OURS_CLI,
    REPO,
    STORIES,
    calibration_tokens,
    run_anchor,
    run_autoround,
    run_child,
    say,
)

ROWS = [(3, -1), (4, -1), (4, 32)]
REFERENCE = REPO / "llmslim" / "assets" / "reference"
SMOLLM2_GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # scripts/setup.sh
WIKI_VALID = DEV.parents[1] / "wikitext-2" / "valid.txt"
WIKI_TEST = DEV.parents[1] / "wikitext-2" / "test.txt"


@dataclass(frozen=True)
class Subject:
    """A model and the text it is calibrated and measured on."""

    model: Path
    calib: dict[str, Any]  # the recipe's data source
    heldout: dict[str, Any]  # a DataSource's fields
    seq_len: int
    samples: int  # calibration windows
    narrow: tuple[str, ...]  # Linears whose input width 32 does not divide (kept unquantized at g32)
    dtype: str  # the dtype every tool works in
    results: Path
    rows: tuple[tuple[int, int], ...] = tuple(ROWS)  # (bits, group size)
    columns: tuple[str, ...] | None = None  # our columns to run (None: all); anchors: all of theirs
    iters: tuple[int, ...] = (50, 200)  # learned rounding's step counts, ours and auto-round's


SUBJECTS = {
    "stories": Subject(STORIES, {"path": str(DEV), "fraction": [0.0, 0.5]}, {"path": str(DEV), "fraction": (0.5, 1.0)},
                       512, 128, ("down_proj",), "float32", REPO / "eval" / "results" / "bench_ptq.json"),
    "reference": Subject(REFERENCE, {"path": str(REFERENCE / "calib.txt")}, {"path": str(REFERENCE / "eval.txt")},
                         256, 112, (), "float32", REPO / "eval" / "results" / "bench_ptq_reference.json"),
    # SmolLM2-135M-Instruct (the GGUF converted to float32 by `llmslim convert` into --work): 16 x 512 tokens of
    # WikiText-2 valid, perplexity on the first 32 windows of 512 tokens of test (16,384 tokens)
    "smollm2": Subject(Path("smollm2"), {"path": str(WIKI_VALID)}, {"path": str(WIKI_TEST), "samples": 32},
                       512, 16, (), "float32", REPO / "eval" / "results" / "bench_ptq_smollm2.json",
                       rows=((4, 64), (3, 64)), iters=(50,),
                       columns=("rtn minmax", "gptq minmax", "gptq mse", "awq + gptq mse", "autoround 50",
                                "gptq mse mixed 3.5 bits")),
}


def row_name(bits: int, group: int) -> str:
    return f"W{bits} " + ("per channel" if group == -1 else f"g{group}")


def collected(log: Path, quant_s: float, tool: str) -> dict[str, Any]:
    """What run_child measured for a finished run, read back from its GNU time file."""
    max_kib, user, system = log.with_suffix(".time").read_text().split()[-3:]
    return {"tool": tool, "cpu_s": round(float(user) + float(system), 2), "peak_rss_bytes": int(max_kib) * 1024,
            "quant_s": quant_s, "log": str(log), "collected": True}


def collected_anchor(work: Path, name: str, phase: str, tool: str) -> dict[str, Any]:
    """`collected` for an anchor run: its quantization time from the JSON it wrote."""
    timing = json.loads((work / f"{name}.json").read_text())["timings_s"][phase]
    return collected(work / "logs" / f"{name}.log", timing, tool)


def our_columns(bits: int, group: int, iters: list[int], narrow: tuple[str, ...] = (),
                only: tuple[str, ...] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Column name -> the recipe's stages, for one grid (`only`: these columns)."""
    # g32 on stories260K: the 172-wide down_proj stays unquantized, as both anchors keep it (the same Linears
    # quantized); awq is told too, so that it does not scale what is not quantized
    grid = {"bits": bits, "group_size": group, "symmetric": True, **({"ignore": ["lm_head", *narrow]}
                                                                      if group != -1 and narrow else {})}
    gptq = {"method": "gptq", "data": "calib", **grid, **GPTQ}
    columns = {
        "rtn minmax": [{"method": "rtn", **grid}],
        "rtn mse": [{"method": "rtn", **grid, "observer": "mse"}],
        "gptq minmax": [gptq],
        "gptq mse": [{**gptq, "observer": "mse"}],
        "gptq mse gptaq": [{**gptq, "observer": "mse", "gptaq": True}],
        "awq + gptq mse": [{"method": "awq", "data": "calib", **grid, "observer": "mse"}, {**gptq, "observer": "mse"}],
        **{f"awq {o} + gptq mse": [{"method": "awq", "data": "calib", **grid, "observer": "mse", "objective": o},
                                   {**gptq, "observer": "mse"}] for o in ("linear", "module")},  # objective by hand
        **{f"autoround {n}": [{"method": "autoround", "data": "calib", **grid, "iters": n}] for n in iters},
        **{f"awq + autoround {n}": [{"method": "awq", "data": "calib", **grid},
                                    {"method": "autoround", "data": "calib", **grid, "iters": n}] for n in iters},
    }
    if bits == 3:  # mixed precision: some targets at 4 bits, 3.5 bits per weight on average (more bytes than W3)
        columns["gptq mse mixed 3.5 bits"] = [{**gptq, "observer": "mse", "mixed": {"target_bits": 3.5, "high_bits": 4}}]
    return {k: v for k, v in columns.items() if only is None or k in only}


def write_recipe(path: Path, output: Path, samples: int, stages: list[dict[str, Any]], subject: Subject,
                 seed: int = 0) -> str:
    recipe = {"model": str(subject.model), "output": str(output), "seed": seed, "dtype": subject.dtype,
              "data": {"calib": {**subject.calib, "samples": samples, "seq_len": subject.seq_len}},
              "stages": stages, "export": {"check": "transformers"}}
    text = yaml.safe_dump(recipe, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def run_ours(recipe: Path, output: Path, log: Path) -> dict[str, Any]:
    for old in (output, output.with_name(output.name + ".work")):
        shutil.rmtree(old, ignore_errors=True)
    result = run_child([str(OURS_CLI), "run", str(recipe), "--quiet", "--fresh"], log)
    stages = json.loads((output / "llmslim_report.json").read_text())["stages"]
    return {"tool": "ours", **result, "quant_s": sum(s["seconds"] for s in stages)}


def smollm2_model(work: Path) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF (scripts/setup.sh brings it) to float32 safetensors in
    `work`, once: every tool, ours and the anchors, starts from these very weights."""
    out = work / "smollm2-f32"
    if not (out / "config.json").is_file():
        say(f"converting {SMOLLM2_GGUF} to {out}")
        run_child([str(OURS_CLI), "convert", str(SMOLLM2_GGUF), str(out), "--quiet"], work / "logs" / "convert.log")
    return out


def seed_medians(cells: dict[str, dict[str, Any]], seeded: list[Path]) -> dict[str, dict[str, Any]]:
    """{row: {column: {"seeds": {seed: ppl}, "median": ppl}}} for each cell that another calibration seed's run
    (a --seed file) measured too; seed 0 is the table's own cell."""
    out: dict[str, dict[str, Any]] = {}
    for part in seeded:
        seed = int(re.search(r"seed=(\d+)", part.name).group(1))
        for row, found in json.loads(part.read_text())["cells"].items():
            for column, c in found.items():
                if column in cells.get(row, {}):
                    entry = out.setdefault(row, {}).setdefault(column, {"seeds": {0: cells[row][column]["ppl"]}})
                    entry["seeds"][seed] = c["ppl"]
    for row in out.values():
        for entry in row.values():
            entry["median"] = statistics.median(entry["seeds"].values())
    return out


def finish(args: argparse.Namespace, subject: Subject, original: float, cells: dict[str, dict[str, Any]],
           argv: list[str] | None, medians: dict[str, dict[str, Any]] | None = None) -> int:
    """Print the table and the checks of `cells` ({row: {column: cell}}) and write the results JSON; a row
    that other calibration seeds measured (`medians`, from --merge) is judged on the medians of its cells."""
    grids = list(cells)
    methods = list(dict.fromkeys(m for c in cells.values() for m in c))
    methods.sort(key=lambda m: not m.startswith("ours"))  # ours first (stable: each in its order)
    where = {"stories": "stories260K, perplexity on the second half of TinyStories dev.txt",
             "reference": "the reference model, perplexity on its eval.txt",
             "smollm2": ("SmolLM2-135M-Instruct (the Q4_1 GGUF in float32: its weights already carry llama.cpp's "
                         "asymmetric 4-bit g32 rounding), calibrated on 16 x 512 tokens of WikiText-2 valid, "
                         "perplexity on the first 32 x 512 tokens of WikiText-2 test")}[args.model]
    digits = 3 if original > 3 else 4  # the reference model's perplexity is near 1.7: its steps are small
    lines = [f"{where}; original {original:.{digits}f}. "
             "Each cell: perplexity (quantization seconds, whole-process peak RSS MiB); bold: best in the column.", "",
             "| method | " + " | ".join(grids) + " |", "|---|" + "---:|" * len(grids)]
    best = {g: min(v["ppl"] for v in cells[g].values()) for g in grids}

    def cell(g: str, m: str) -> str:
        c = cells[g].get(m)
        if c is None:
            return "not run"
        value = f"**{c['ppl']:.{digits}f}**" if c["ppl"] == best[g] else f"{c['ppl']:.{digits}f}"
        return value + f" ({c['quant_s']:.0f} s, {c['peak_rss_bytes'] / 2**20:.0f})"

    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(g, m) for g in grids) + " |")
    checks: dict[str, bool] = {}
    lines.append("")
    medians = medians or {}
    for g, found in medians.items():
        seeds = sorted({s for e in found.values() for s in e["seeds"]})
        lines += [f"{g} on calibration seeds {', '.join(map(str, seeds))} (the row is judged on the medians of "
                  "these columns):", "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | median |",
                  "|---|" + "---:|" * (len(seeds) + 1)]
        lines += [f"| {m} | " + " | ".join(f"{e['seeds'][s]:.{digits}f}" if s in e["seeds"] else "not run"
                                             for s in seeds) + f" | {e['median']:.{digits}f} |" for m, e in found.items()]
        lines.append("")
    for g, c in cells.items():
        if g in medians:  # the columns measured on every seed, by their medians
            c = {k: {"ppl": e["median"]} for k, e in medians[g].items()}
        # like with like: the mixed column spends more bits (3.5 on average) than the row's grid
        ours = min((v["ppl"] for k, v in c.items() if k.startswith("ours") and "mixed" not in k), default=float("inf"))
        theirs = [v["ppl"] for k, v in c.items() if not k.startswith("ours")]
        if theirs and ours < float("inf"):
            margin = 100 * (min(theirs) - ours) / min(theirs)
            checks[f"{g}: the best of ours ({ours:.{digits}f}) beats the best anchor ({min(theirs):.{digits}f}), "
                   f"by {margin:.2f} %"] = ours < min(theirs)
        gptq = c.get("ours gptq minmax", {}).get("ppl", original)
        if gptq > original:
            removed = 100 * (gptq - ours) / (gptq - original)
            lines.append(f"- {g}: the best of ours removes {removed:.1f} % of plain GPTQ's perplexity increase")
            if g == "W3 per channel" and args.model == "stories":
                checks[f"{g}: the best of ours removes at least a third of plain GPTQ's increase"] = removed >= 100 / 3
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    print("\n".join(lines))
    subject.results.parent.mkdir(parents=True, exist_ok=True)
    subject.results.write_text(json.dumps({"command": " ".join(["eval/bench_ptq.py", *(argv or sys.argv[1:])]),
                                   "original": original, "cells": cells, "seed_medians": medians, "checks": checks,
                                   "table": "\n".join(lines)}, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(SUBJECTS), default="stories",
                   help="stories: stories260K on TinyStories dev.txt (../shared); reference: the bundled reference model")
    p.add_argument("--quick", action="store_true", help="16 calibration and 16 evaluation windows")
    p.add_argument("--work", type=Path, default=Path("/tmp/llmslim-bench-ptq"))
    p.add_argument("--no-anchor", action="store_true", help="ours only (no .venv-anchor here)")
    p.add_argument("--iters", type=int, nargs="+", default=None,
                   help="autoround steps per layer, ours and the anchor's, one column each (default: 50 200; "
                        "smollm2: 50)")
    p.add_argument("--rows", nargs="+", choices=sorted({row_name(b, g) for s in SUBJECTS.values() for b, g in s.rows}),
                   help="only these grids")
    p.add_argument("--columns", nargs="+", metavar="NAME",
                   help="only these columns (ours as named in the table without 'ours ', anchors as named)")
    p.add_argument("--seed", type=int, default=None,
                   help="the recipes' seed (which calibration windows are drawn, given to every tool alike, and "
                        "the batch order of learned rounding) and auto-round's (default: 0, auto-round its own 42): "
                        "rerun a row with others to see how far the methods move")
    p.add_argument("--no-awq-anchor", action="store_true", help="skip llm-compressor's AWQ + GPTQ (the slowest anchor)")
    p.add_argument("--merge", action="store_true",
                   help="run nothing: the table of every partial run's JSON beside the results file (--rows/--columns "
                        "runs), later files winning, written as the full results file")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: measure the outputs an earlier (interrupted) run left in --work")
    args = p.parse_args(argv)
    subject = SUBJECTS[args.model]
    args.iters = args.iters or list(subject.iters)
    if args.model == "smollm2":
        subject = replace(subject, model=smollm2_model(args.work))
    partial = [f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
               (("rows", args.rows), ("columns", args.columns), ("seed", args.seed)) if v is not None]
    if args.merge:
        parts = sorted(subject.results.parent.glob(f"{subject.results.stem}.*.json"), key=lambda f: f.stat().st_mtime)
        seeded = [f for f in parts if "seed=" in f.name]  # other calibration samples: medians, not the table
        parts = [f for f in parts if f not in seeded]
        if not parts:
            print(f"nothing to merge: no {subject.results.stem}.*.json in {subject.results.parent}")
            return 2
        cells: dict[str, dict[str, Any]] = {}
        rows = [row_name(b, g) for b, g in subject.rows]
        for part in parts:
            for row, found in json.loads(part.read_text())["cells"].items():
                cells.setdefault(row, {}).update({k: {**v, "from": part.name} for k, v in found.items()})
        cells = {r: cells[r] for r in rows if r in cells}
        original = json.loads(parts[-1].read_text())["original"]
        return finish(args, subject, original, cells, argv, seed_medians(cells, seeded))
    if partial:  # a part of the table, or another sample: its own file, the full run's stays
        tag = "-".join(partial).replace(" ", "").replace("/", "")
        subject = replace(subject, results=subject.results.with_name(f"{subject.results.stem}.{tag}.json"))
    if args.model == "stories" and not (STORIES.is_dir() and DEV.is_file()):
        print(f"skipped: {STORIES} or {DEV} not found (set LLMSLIM_SHARED)")
        return 0
    anchor = not args.no_anchor
    missing = [str(p) for p in (ANCHOR_PY, AUTOROUND_PY) if not p.exists()]
    if anchor and missing:
        print(f"{missing[0]} not found: run scripts/setup_anchor.sh all first (or --no-anchor)")
        return 2
    samples, windows = (16, 16) if args.quick else (subject.samples, subject.heldout.get("samples"))

    from llmslim.data import DataHub
    from llmslim.evaluate.harness import PplJob, measure_perplexity
    from llmslim.pipeline import load_tokenizer
    from llmslim.progress import Progress
    from llmslim.recipe import DataSource

    tokenizer = load_tokenizer(subject.model)
    hub = DataHub({"heldout": DataSource(**subject.heldout)}, tokenizer, seed=0, max_len=subject.seq_len)
    jobs = [PplJob("heldout", lambda _tok: hub.stream("heldout"), subject.seq_len, windows)]

    def ppl(model_dir: Path) -> float:
        return round(measure_perplexity(model_dir, jobs, "auto", Progress(), model_dir.name, tokenizer)["heldout"]["ppl"], 5)

    work = args.work / args.model
    original = ppl(subject.model)
    say(f"original: {original}")
    cells: dict[str, dict[str, Any]] = {}

    def wanted(name: str) -> bool:
        return args.columns is None or name in args.columns

    for bits, group in subject.rows:
        row = row_name(bits, group)
        if args.rows and row not in args.rows:
            continue
        cells[row] = {}
        calib = work / f"calib-{bits}-{group}.pt"
        token_hash = ""
        for column, stages in our_columns(bits, group, args.iters, subject.narrow,
                                               subject.columns if args.columns is None else None).items():
            name = "ours-" + column.replace(" + ", "-").replace(" ", "-") + f"-w{bits}g{group}"
            if not wanted(column):
                if not token_hash and stages[0].get("data") and not args.collect:  # the anchors' tokens all the same
                    text = write_recipe(work / f"{name}.yaml", work / name, samples, stages, subject, args.seed or 0)
                    token_hash = calibration_tokens(text, calib)
                continue
            log = work / "logs" / f"{name}.log"
            if args.collect:
                if not (work / name / "llmslim_report.json").is_file():
                    continue
                stages_done = json.loads((work / name / "llmslim_report.json").read_text())["stages"]
                cells[row][f"ours {column}"] = {**collected(log, sum(x["seconds"] for x in stages_done), "ours"),
                                                "ppl": ppl(work / name)}
                continue
            text = write_recipe(work / f"{name}.yaml", work / name, samples, stages, subject, args.seed or 0)
            if not token_hash and stages[0].get("data"):
                token_hash = calibration_tokens(text, calib)
            say(f"{row}: {column} (ours)")
            run = run_ours(work / f"{name}.yaml", work / name, log)
            cells[row][f"ours {column}"] = {**run, "ppl": ppl(work / name)}
        if anchor:
            for observer, awq in (("minmax", False), ("mse", False), ("mse", True))[:2 if args.no_awq_anchor else 3]:
                label = f"llm-compressor {'awq + ' if awq else ''}gptq {observer}"
                if not wanted(label):
                    continue
                name = f"anchor-{'awq-' if awq else ''}gptq-{observer}-w{bits}g{group}"
                say(f"{row}: {label}")
                dense = work / f"{name}-dense"
                if args.collect:
                    if dense.is_dir():
                        cells[row][label] = {**collected_anchor(work, name, "oneshot", "llm-compressor"),
                                             "ppl": ppl(dense)}
                    continue
                run = run_anchor(subject.model, calib, token_hash, work / name, bits, group, work / "logs" / f"{name}.log",
                                 dense_out=dense, observer=observer, awq=awq, extra=["--dtype", subject.dtype])
                cells[row][label] = {**run, "ppl": ppl(dense)}
            for iters in args.iters:
                if not wanted(f"auto-round {iters}"):
                    continue
                name = f"anchor-autoround-{iters}-w{bits}g{group}"
                say(f"{row}: auto-round {iters}")
                dense = work / f"{name}-dense"
                if args.collect:
                    if dense.is_dir():
                        cells[row][f"auto-round {iters}"] = {**collected_anchor(work, name, "quantize", "auto-round"),
                                                             "ppl": ppl(dense)}
                    continue
                # lr 5e-3 at every step count: the "light" preset's at 50, its default 1/iters at 200
                run = run_autoround(subject.model, calib, token_hash, work / name, bits, group,
                                    work / "logs" / f"{name}.log", dense_out=dense, iters=iters,
                                    extra=["--lr", "5e-3", "--no-torch-compile", "--dtype", subject.dtype,
                                           *([] if args.seed is None else ["--seed", str(args.seed)])])
                cells[row][f"auto-round {iters}"] = {**run, "ppl": ppl(dense)}

    return finish(args, subject, original, cells, argv)


if __name__ == "__main__":
    sys.exit(main())
