"""QAT benchmark on stories260K: does training on the export grid beat GPTQ on the same grid?

    .venv/bin/python eval/bench_qat.py [--steps 300] [--lrs 1e-3,3e-3]

Grids W3 and W4, per channel, symmetric. Calibration and training text: the first half of
../shared/data/tinystories/dev.txt (GPTQ: 128 windows of 512 tokens; training: windows of 256 tokens);
perplexity on the second half (512-token windows). Side by side, per grid:
- gptq alone (act-order, the recipe defaults);
- qat, base grid, init gptq (the same calibration), LoRA r 16, logits KL against the original model,
  every lr in --lrs (the best kept): the export is the trained model, so its perplexity is measured on
  the reloaded checkpoint; the stage's own last in-memory measurement is printed beside it (exactness);
- qat, base nf4 (QLoRA), then gptq on the grid (W4 only, where NF4 is the same width).
removed = (gptq - qat) / (gptq - original): the share of GPTQ's perplexity increase that QAT removes.

Prints the table and writes eval/results/bench_qat.json. Exit 1 if an acceptance line fails: qat below
gptq at both widths; export perplexity equal to the in-memory one; every run under 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stories_runs import LIMIT_S, REPO, run_timed, start

RESULTS = REPO / "eval" / "results" / "bench_qat.json"


def run_recipe(root: Path, name: str, stages: list[dict]) -> dict:
    report, out = run_timed(root, name, stages)
    for s in report["stages"]:
        if s["method"] == "qat" and s["notes"].get("eval"):
            out["ppl_in_memory"] = s["notes"]["eval"][-1]["ppl"]
            out["integers_changed"] = s["notes"].get("integers_changed_by_training")
        if s["method"] == "qat" and "next_grid_shift" in s["notes"]:
            out["next_grid_shift"] = s["notes"]["next_grid_shift"]
    return out


def gptq(bits: int) -> dict:
    return {"method": "gptq", "bits": bits, "group_size": -1, "symmetric": True, "data": "calib"}


def qat(args: argparse.Namespace, lr: float, **kw) -> dict:
    return {"method": "qat", "data": "train", "calib_data": "calib", "steps": args.steps, "batch_size": 16,
            "lr": lr, "warmup": max(1, args.steps // 20), "lora": {"r": 16, "alpha": 32}, "loss": {"logits": 1.0},
            "save_every": args.steps, **kw}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", default="1e-3,3e-3")
    args = parser.parse_args(argv)
    root = start("qat")
    if root is None:
        return 0
    lrs = [float(x) for x in args.lrs.split(",")]
    rows, all_runs = [], []
    for bits in (3, 4):
        base = run_recipe(root, f"gptq-w{bits}", [gptq(bits)])
        original = base["ppl_original"]
        trained = [run_recipe(root, f"qat-w{bits}-lr{lr:g}",
                              [qat(args, lr, bits=bits, group_size=-1, init="gptq", eval_data="heldout")]) for lr in lrs]
        best = min(trained, key=lambda r: r["ppl"])
        nf4 = (run_recipe(root, "qlora-nf4+gptq-w4", [qat(args, lrs[0], base="nf4", calib_data=None),
                                                       gptq(4)]) if bits == 4 else None)
        all_runs += [base, *trained] + ([nf4] if nf4 else [])
        rows.append({"bits": bits, "original": original, "gptq": base, "qat": trained, "best": best, "nf4": nf4,
                     "removed": (base["ppl"] - best["ppl"]) / (base["ppl"] - original)})
    slowest = max(r["seconds"] for r in all_runs)
    lines = [f"stories260K, per channel, symmetric; perplexity on the second half of TinyStories dev.txt "
             f"(512-token windows); QAT: {args.steps} steps x 16 windows of 256 tokens, LoRA r 16, logits KL "
             f"against the original; original model {rows[0]['original']:.3f}.", "",
             "| grid | gptq | " + " | ".join(f"qat lr {lr:g}" for lr in lrs) +
             " | qat in memory (best) | removed | qlora nf4 + gptq |", "|---|---:|" + "---:|" * (len(lrs) + 3)]
    for r in rows:
        cells = [f"{t['ppl']:.3f}" for t in r["qat"]]
        nf4 = f"{r['nf4']['ppl']:.3f}" if r["nf4"] else "-"
        lines.append(f"| W{r['bits']} | {r['gptq']['ppl']:.3f} | " + " | ".join(cells) +
                     f" | {r['best'].get('ppl_in_memory', float('nan')):.3f} | {100 * r['removed']:.1f} % | {nf4} |")
    exact = max(abs(t["ppl"] - t["ppl_in_memory"]) / t["ppl"] for r in rows for t in r["qat"] if "ppl_in_memory" in t)
    checks = {"qat below gptq at every width": all(r["best"]["ppl"] < r["gptq"]["ppl"] for r in rows),
              "export perplexity equals the stage's in-memory one (rel. diff < 1e-5)": exact < 1e-5,
              f"every run under {LIMIT_S} s": slowest < LIMIT_S}
    lines += ["", f"Largest relative difference between a QAT export's perplexity (reloaded from disk) and the "
                  f"stage's in-memory measurement: {exact:.2e}. Slowest run: {slowest:.0f} s."]
    for r in rows:
        if r["nf4"] and r["nf4"].get("next_grid_shift"):
            lines.append(f"QLoRA NF4 (W{r['bits']}): {r['nf4']['next_grid_shift']}.")
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["eval/bench_qat.py", *(argv or sys.argv[1:])]),
                                   "rows": rows, "checks": checks, "table": "\n".join(lines)}, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
