"""MoE benchmark on stories260K: does routing half of the FFN beat keeping a dense FFN of the same active width?

    .venv/bin/python eval/bench_moe.py [--steps 600] [--lrs 1e-3,3e-3]

Steps, each on the first half of ../shared/data/tinystories/dev.txt (calibration: 128 windows of 512
tokens; training: --batch-size windows of --seq-len tokens per step), perplexity on the second half:
1. prune_ffn 172 -> 128 (activation);
2. moefy: 4 experts of 32 channels, top_k 2 (64 channels active per token), for each split
   (balanced_cluster, cluster, random), without training;
3. distill the balanced_cluster MoE (logits KL against the original model plus --balance x the
   load-balancing term, which keeps the routers from starving experts; --steps steps, best of --lrs);
against the same model with its FFN pruned further to 64 channels (the same active width) and distilled
with the same budget and learning-rate search. Active FFN FLOPs per token come from each export's config
(router included). Every run is timed (each must stay under 10 minutes on 2 CPU cores).

Prints the table and writes eval/results/bench_moe.json. Exit 1 if an acceptance line fails: the
moefied-and-distilled model beats the dense-64 one; every run under 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stories_runs import LIMIT_S, REPO, run_timed, start

RESULTS = REPO / "eval" / "results" / "bench_moe.json"
PRUNE_128 = {"method": "prune_ffn", "intermediate_size": 128, "criterion": "activation", "data": "calib"}
PRUNE_64 = {"method": "prune_ffn", "intermediate_size": 64, "criterion": "activation", "data": "calib"}


def moefy(split: str) -> dict:
    return {"method": "moefy", "experts": 4, "top_k": 2, "split": split, "data": "calib"}


def distill(args: argparse.Namespace, lr: float, balance: float = 0.0) -> dict:
    return {"method": "distill", "data": "train", "steps": args.steps, "batch_size": args.batch_size, "lr": lr,
            "warmup": max(1, args.steps // 20), "schedule": "cosine",
            "loss": {"logits": 1.0, **({"balance": balance} if balance else {})}, "save_every": args.steps}


def run_recipe(root: Path, name: str, stages: list[dict], seq_len: int) -> dict:
    from transformers import AutoConfig

    from llmslim.methods.moefy import active_ffn_flops

    report, out = run_timed(root, name, stages, train_seq_len=seq_len)
    out["params"] = report["size"]["after"]["params"]
    out["ffn_flops"] = active_ffn_flops(AutoConfig.from_pretrained(report["output"]))
    train = next((s for s in report["stages"] if s["method"] == "distill"), None)
    if train:
        out["train_seconds"] = train["notes"]["train_seconds"]
    moe = next((s for s in report["stages"] if s["method"] == "moefy"), None)
    if moe:
        layers = moe["notes"]["layers"]
        out["moefy_relative_error"] = [layers[i]["relative_error"] for i in sorted(layers, key=int)]
        out["load_entropy"] = [s["load_entropy"] for _, s in sorted(moe["notes"]["routing"]["layers"].items())]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lrs", default="1e-3,3e-3", help="learning rates searched for both (the best kept)")
    parser.add_argument("--balance", type=float, default=0.01,
                        help="weight of the load-balancing term in the MoE's distillation (0: logits only)")
    args = parser.parse_args(argv)
    root = start("moe")
    if root is None:
        return 0
    lrs = [float(x) for x in args.lrs.split(",")]

    pruned = run_recipe(root, "ffn128", [PRUNE_128], args.seq_len)
    original = pruned["ppl_original"]
    splits = {s: run_recipe(root, f"moefy-{s}", [PRUNE_128, moefy(s)], args.seq_len)
              for s in ("balanced_cluster", "cluster", "random")}
    dense64 = run_recipe(root, "ffn64", [PRUNE_128, PRUNE_64], args.seq_len)
    trained = {}
    for lr in lrs:
        trained[("moe", lr)] = run_recipe(root, f"moefy-distill-lr{lr:g}",
                                          [PRUNE_128, moefy("balanced_cluster"), distill(args, lr, args.balance)],
                                          args.seq_len)
        trained[("dense64", lr)] = run_recipe(root, f"ffn64-distill-lr{lr:g}", [PRUNE_128, PRUNE_64, distill(args, lr)],
                                              args.seq_len)
    best_moe = min((trained[("moe", lr)] for lr in lrs), key=lambda r: r["ppl"])
    best_dense = min((trained[("dense64", lr)] for lr in lrs), key=lambda r: r["ppl"])
    all_runs = [pruned, dense64, *splits.values(), *trained.values()]
    slowest = max(r["seconds"] for r in all_runs)
    full = pruned["ffn_flops"]

    def row(label: str, r: dict) -> str:
        return (f"| {label} | {r['ppl']:.3f} | {r['ffn_flops'] / 1e3:.1f} K ({100 * r['ffn_flops'] / full:.0f} %) | "
                f"{r['params']:,} | {r['seconds']:.0f} |")

    lines = [f"stories260K, perplexity on the second half of TinyStories dev.txt (512-token windows); original "
             f"{original:.3f}. Training: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, logits KL "
             f"against the original (the MoE: + {args.balance:g} x load balance), best of lr "
             f"{', '.join(f'{lr:g}' for lr in lrs)}. FFN FLOPs: active per token, "
             "all layers (router included), % of FFN 128.", "",
             "| model | perplexity | active FFN FLOPs / token | parameters | run s |", "|---|---:|---:|---:|---:|",
             row("FFN 172 -> 128", pruned)]
    for s, r in splits.items():
        lines.append(row(f"  + moefy 4 x 32, top 2, {s} (no training)", r))
    lines.append(row(f"  + moefy balanced_cluster + distill (lr {best_moe['name'].rsplit('-lr', 1)[1]})", best_moe))
    lines.append(row("  + FFN 128 -> 64 (no training)", dense64))
    lines.append(row(f"  + FFN 128 -> 64 + distill (lr {best_dense['name'].rsplit('-lr', 1)[1]})", best_dense))
    for key, r in trained.items():
        lines.append(f"| {key[0]} lr {key[1]:g} | {r['ppl']:.3f} | | | {r['seconds']:.0f} |")
    checks = {"moefy + distill beats FFN 64 + distill (same active width, same budget)": best_moe["ppl"] < best_dense["ppl"],
              f"every run under {LIMIT_S} s": slowest < LIMIT_S}
    lines += ["", f"Slowest run: {slowest:.0f} s (whole recipe: cuts, conversion, training, export, evaluation)."]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["eval/bench_moe.py", *(argv or sys.argv[1:])]),
                                   "original": original, "runs": all_runs, "checks": checks,
                                   "table": "\n".join(lines)}, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
