"""Distillation benchmark on stories260K: how much of what pruning costs does `distill` win back?

    .venv/bin/python eval/bench_distill.py [--steps 400] [--lrs 1e-3,3e-3,1e-2]

The cuts: drop 1 layer (block_influence) and FFN 172 -> 128 (activation), the defaults, calibrated on 128
windows of 512 tokens of the first half of ../shared/data/tinystories/dev.txt. Then, for each budget in
--steps, with the same batch (16 windows of 256 tokens from the first half), schedule (cosine, 5 %
warm-up) and learning-rate search (every lr in --lrs, the best kept), two ways to recover:
- distill, logits only: KL(teacher || student) at T 1 (the default) with the original model as teacher;
- plain fine-tuning: LM cross-entropy on the same text.
Perplexity on the second half (512-token windows), side by side with the original and the pruned model.
recovered = (pruned - distilled) / (pruned - original). Then after dropping 2 layers (and the same FFN cut):
logits only against logits + hidden states (normalised MSE at the kept layers, weight --hidden-weight),
at the largest budget and the best distillation lr. Every run is timed (each must stay under 10 minutes
on 2 CPU cores).

Prints the tables and writes eval/results/bench_distill.json. Exit 1 if an acceptance line fails at the
largest budget: distillation recovers at least half of the gap; it beats fine-tuning; every run under
10 minutes. Smaller budgets are reported beside it, whichever way they go.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stories_runs import LIMIT_S, REPO, run_timed, start

RESULTS = REPO / "eval" / "results" / "bench_distill.json"


def cuts(layers: int) -> list[dict]:
    return [{"method": "drop_layers", "count": layers, "criterion": "block_influence", "data": "calib"},
            {"method": "prune_ffn", "intermediate_size": 128, "criterion": "activation", "data": "calib"}]


def train_stage(args: argparse.Namespace, lr: float, loss: dict) -> dict:
    return {"method": "distill", "data": "train", "steps": args.steps, "batch_size": args.batch_size, "lr": lr,
            "warmup": max(1, args.steps // 20), "schedule": "cosine", "loss": loss, "save_every": args.steps}


def run_recipe(root: Path, name: str, stages: list[dict], seq_len: int) -> dict:
    report, out = run_timed(root, name, stages, train_seq_len=seq_len)
    out["params"] = report["size"]["after"]["params"]
    train = next((s for s in report["stages"] if s["method"] == "distill"), None)
    if train:
        out["train_seconds"] = train["notes"]["train_seconds"]
        out["loss"] = train["notes"]["loss"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="400,1000", help="training budgets compared (steps, comma separated); "
                        "the acceptance lines use the largest")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lrs", default="1e-3,3e-3", help="learning rates searched for each method")
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    root = start("distill")
    if root is None:
        return 0
    lrs = [float(x) for x in args.lrs.split(",")]
    budgets = sorted(int(x) for x in args.steps.split(","))

    pruned = run_recipe(root, "pruned", cuts(1), args.seq_len)
    original = pruned["ppl_original"]
    runs: dict[tuple[int, str, float], dict] = {}
    for steps in budgets:
        a = argparse.Namespace(**{**vars(args), "steps": steps})
        for lr in lrs:
            for method, loss in (("distill", {"logits": 1.0}), ("finetune", {"lm": 1.0})):
                runs[(steps, method, lr)] = run_recipe(root, f"{method}-{steps}-lr{lr:g}",
                                                       cuts(1) + [train_stage(a, lr, loss)], args.seq_len)

    def best(steps: int, method: str) -> dict:
        return min((runs[(steps, method, lr)] for lr in lrs), key=lambda r: r["ppl"])

    def recovered(ppl: float, base: float) -> float:
        return (base - ppl) / (base - original)

    main_steps = budgets[-1]
    best_d, best_f = best(main_steps, "distill"), best(main_steps, "finetune")
    best_lr = float(best_d["name"].rsplit("-lr", 1)[1])
    a = argparse.Namespace(**{**vars(args), "steps": main_steps})
    pruned2 = run_recipe(root, "pruned-2", cuts(2), args.seq_len)
    logits2 = run_recipe(root, "drop2-logits", cuts(2) + [train_stage(a, best_lr, {"logits": 1.0})], args.seq_len)
    hidden2 = run_recipe(root, "drop2-logits+hidden",
                         cuts(2) + [train_stage(a, best_lr, {"logits": 1.0, "hidden": args.hidden_weight})],
                         args.seq_len)
    all_runs = [pruned, pruned2, logits2, hidden2, *runs.values()]
    slowest = max(r["seconds"] for r in all_runs)

    lines = [f"stories260K, perplexity on the second half of TinyStories dev.txt (512-token windows); training: "
             f"{args.batch_size} windows of {args.seq_len} tokens per step from the first half (about 95K tokens); "
             f"original model {original:.3f}; drop 1 layer + FFN 172 -> 128 without recovery: {pruned['ppl']:.3f}.", "",
             "| steps | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best | recovered |",
             "|---:|---|" + "---:|" * (len(lrs) + 2)]
    for steps in budgets:
        for method, label in (("distill", "distill (logits, T 1)"), ("finetune", "fine-tune (LM loss)")):
            b = best(steps, method)
            cells = [f"{runs[(steps, method, lr)]['ppl']:.3f}" for lr in lrs]
            lines.append(f"| {steps} | {label} | " + " | ".join(cells) +
                         f" | **{b['ppl']:.3f}** | {100 * recovered(b['ppl'], pruned['ppl']):.1f} % |")
    lines += ["", f"| drop 2 layers + FFN 172 -> 128 ({main_steps} steps, lr {best_lr:g}) | perplexity | recovered |",
              "|---|---:|---:|", f"| no recovery | {pruned2['ppl']:.3f} | 0 % |"]
    for r in (logits2, hidden2):
        lines.append(f"| {r['name'].removeprefix('drop2-')} | {r['ppl']:.3f} | "
                     f"{100 * recovered(r['ppl'], pruned2['ppl']):.1f} % |")
    checks = {f"distillation recovers at least half the gap ({main_steps} steps)":
              recovered(best_d["ppl"], pruned["ppl"]) >= 0.5,
              f"distillation beats fine-tuning ({main_steps} steps, same lr search)": best_d["ppl"] < best_f["ppl"],
              f"every run under {LIMIT_S} s": slowest < LIMIT_S}
    lines += ["", f"Slowest run: {slowest:.0f} s (whole recipe: cuts, training, export, evaluation)."]
    for steps in budgets[:-1]:
        if best(steps, "distill")["ppl"] >= best(steps, "finetune")["ppl"]:
            lines.append(f"At {steps} steps fine-tuning is ahead ({best(steps, 'finetune')['ppl']:.3f} vs "
                         f"{best(steps, 'distill')['ppl']:.3f}).")
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["eval/bench_distill.py", *(argv or sys.argv[1:])]),
                                   "original": original, "runs": all_runs, "best_lr": best_lr, "checks": checks,
                                   "table": "\n".join(lines)}, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
