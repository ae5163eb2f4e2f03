"""Post-training quantization beyond plain GPTQ, against llm-compressor on the same tokens (issue [10]).

    scripts/setup_anchor.sh                  # once: .venv-anchor with llmcompressor==0.14.0.1
    .venv/bin/python eval/bench_ptq.py [--quick]

stories260K, symmetric, calibrated on 128 x 512 tokens of the first half of
../shared/data/tinystories/dev.txt (the very tokens handed to the anchor, SHA-256 checked), perplexity on
the second half (512-token windows), every model measured here in .venv the same way. Rows: W3 and W4
per channel, W4 g32 (the 172-wide down_proj per channel: `per_channel_fallback`; the anchor keeps it
unquantized there, which favours the anchor). Columns: ours rtn and gptq with the minmax and mse
observers; llm-compressor 0.14 GPTQ with its default (minmax) and mse observers. act-order on for both
GPTQs. Time (whole process, and the quantization stage) and peak RSS (GNU time) beside each.

Today this covers the `observer` part of [10]; AWQ, AutoRound, GPTAQ and mixed precision add rows as
they land. Prints a table and writes eval/results/bench_ptq.json. Exit 1 if the best of ours is worse
than the best anchor in a row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench_gptq import (
    ANCHOR_PY,
    DEV,
    GPTQ,
    REPO,
    STORIES,
    calibration_tokens,
    run_anchor,
    run_ours,
    say,
    write_recipe,
)

RESULTS = REPO / "eval" / "results" / "bench_ptq.json"
ROWS = [(3, -1), (4, -1), (4, 32)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 calibration and 16 evaluation windows")
    p.add_argument("--work", type=Path, default=Path("/tmp/llmslim-bench-ptq"))
    p.add_argument("--no-anchor", action="store_true", help="ours only (no .venv-anchor here)")
    args = p.parse_args(argv)
    if not (STORIES.is_dir() and DEV.is_file()):
        print(f"skipped: {STORIES} or {DEV} not found (set LLMSLIM_SHARED)")
        return 0
    anchor = not args.no_anchor
    if anchor and not ANCHOR_PY.exists():
        print(f"{ANCHOR_PY} not found: run scripts/setup_anchor.sh first (or --no-anchor)")
        return 2
    samples, windows = (16, 16) if args.quick else (128, None)

    from llmslim.data import DataHub
    from llmslim.evaluate.harness import PplJob, measure_perplexity
    from llmslim.pipeline import load_tokenizer
    from llmslim.progress import Progress
    from llmslim.recipe import DataSource

    tokenizer = load_tokenizer(STORIES)
    hub = DataHub({"heldout": DataSource(path=str(DEV), fraction=(0.5, 1.0))}, tokenizer, seed=0, max_len=512)
    jobs = [PplJob("heldout", lambda _tok: hub.stream("heldout"), 512, windows)]

    def ppl(model_dir: Path) -> float:
        return round(measure_perplexity(model_dir, jobs, "auto", Progress(), model_dir.name, tokenizer)["heldout"]["ppl"], 4)

    work = args.work
    original = ppl(STORIES)
    say(f"original: {original}")
    cells: dict[str, dict[str, Any]] = {}
    for bits, group in ROWS:
        row = f"W{bits} " + ("per channel" if group == -1 else f"g{group}")
        cells[row] = {}
        token_hash = ""
        for method in ("rtn", "gptq"):
            for observer in ("minmax", "mse"):
                name = f"ours-{method}-{observer}-w{bits}g{group}"
                stage: dict[str, Any] = {"method": method, "bits": bits, "group_size": group, "symmetric": True,
                                         "observer": observer, "per_channel_fallback": group != -1}
                if method == "gptq":
                    stage.update(data="calib", **GPTQ)
                text = write_recipe(work / f"{name}.yaml", STORIES, work / name, samples, stage, check="transformers")
                if method == "gptq" and not token_hash:
                    token_hash = calibration_tokens(text, work / f"calib-{bits}-{group}.pt")
                say(f"{row}: {method} {observer} (ours)")
                run = run_ours(work / f"{name}.yaml", work / name, work / "logs" / f"{name}.log")
                cells[row][f"ours {method} {observer}"] = {**run, "ppl": ppl(work / name)}
        if anchor:
            for observer in ("minmax", "mse"):
                name = f"anchor-gptq-{observer}-w{bits}g{group}"
                say(f"{row}: gptq {observer} (llm-compressor)")
                dense = work / f"{name}-dense"
                run = run_anchor(STORIES, work / f"calib-{bits}-{group}.pt", token_hash, work / name, bits, group,
                                 work / "logs" / f"{name}.log", dense_out=dense, observer=observer)
                cells[row][f"llm-compressor gptq {observer}"] = {**run, "ppl": ppl(dense)}

    columns = list(next(iter(cells.values())))
    lines = [f"stories260K, perplexity on the second half of TinyStories dev.txt; original {original:.3f}. "
             "Each cell: perplexity (quantization seconds, whole-process peak RSS MiB).", "",
             "| grid | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    checks: dict[str, bool] = {}
    for row, c in cells.items():
        ours = min(v["ppl"] for k, v in c.items() if k.startswith("ours"))
        theirs = [v["ppl"] for k, v in c.items() if not k.startswith("ours")]
        best = min(v["ppl"] for v in c.values())
        lines.append(f"| {row} | " + " | ".join(
            (f"**{c[k]['ppl']:.3f}**" if c[k]["ppl"] == best else f"{c[k]['ppl']:.3f}")
            + f" ({c[k]['quant_s']:.0f} s, {c[k]['peak_rss_bytes'] / 2**20:.0f})" for k in columns) + " |")
        if theirs:
            checks[f"{row}: the best of ours beats the best anchor"] = ours < min(theirs)
        gptq = c["ours gptq minmax"]["ppl"]
        if gptq > original:
            lines.append(f"|  | share of GPTQ's increase removed by mse: "
                         f"{100 * (gptq - c['ours gptq mse']['ppl']) / (gptq - original):.1f} % |")
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["eval/bench_ptq.py", *(argv or sys.argv[1:])]),
                                   "original": original, "cells": cells, "checks": checks,
                                   "table": "\n".join(lines)}, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
